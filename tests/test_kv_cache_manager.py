"""KVCacheManager: the host block pool (block 0 reserved, ref counts, prefix caching,
copy-on-write), hand-computed unit tests and a hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.sampling_params import SamplingParams
from jaxllm.sequence import Request, Sequence


def make_seq(tokens: int | list[int], request_id: str = "r", cache_salt: str | None = None) -> Sequence:
    """A sequence whose prompt is ``tokens``, or ``range(tokens)`` when it is an int."""
    prompt = tuple(range(tokens)) if isinstance(tokens, int) else tuple(tokens)
    request = Request(request_id=request_id, prompt=None, prompt_token_ids=prompt,
                      sampling_params=SamplingParams(), seed=0, eos_token_ids=frozenset(),
                      arrival_time=0.0, cache_salt=cache_salt)
    return Sequence.from_request(request)


def advance(kv: KVCacheManager, seq: Sequence, num_new_tokens: int) -> None:
    """Allocates for, then 'computes', the next ``num_new_tokens`` tokens of ``seq``."""
    kv.allocate(seq, num_new_tokens)
    seq.num_computed_tokens += num_new_tokens


def compute(kv: KVCacheManager, seq: Sequence, num_new_tokens: int) -> None:
    """``advance``, then what the executor does after a step: name the blocks now full."""
    advance(kv, seq, num_new_tokens)
    kv.cache_full_blocks(seq)


def admit(kv: KVCacheManager, seq: Sequence, num_new_tokens: int | None = None) -> list[int]:
    """What the scheduler does on admission, then computes: returns the prefix hit's blocks."""
    cached = kv.get_cached_prefix(seq)
    if num_new_tokens is None:
        num_new_tokens = seq.num_tokens - len(cached) * kv.block_size
    kv.allocate(seq, num_new_tokens, cached)
    seq.num_computed_tokens += num_new_tokens
    kv.cache_full_blocks(seq)
    return cached


def test_kv_cache_manager_rejects_fewer_than_two_blocks():
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=1, block_size=4)


def test_kv_cache_manager_starts_with_every_block_but_zero_free():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.num_free_blocks == 4
    assert kv.num_usable_blocks == 4
    assert kv.num_used_blocks == 0
    assert [kv.ref_count(b) for b in range(5)] == [0] * 5


@pytest.mark.parametrize("num_tokens, expected", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_kv_cache_manager_num_blocks_for_rounds_up(num_tokens, expected):
    assert KVCacheManager(num_blocks=8, block_size=4).num_blocks_for(num_tokens) == expected


def test_kv_cache_manager_allocate_adds_only_the_blocks_the_new_tokens_need():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    seq = make_seq(5)
    assert kv.num_new_blocks_needed(seq, 5) == 2
    advance(kv, seq, 5)                       # tokens 0..4 -> blocks 0, 1
    assert len(seq.block_ids) == 2
    assert kv.num_new_blocks_needed(seq, 3) == 0
    advance(kv, seq, 3)                       # tokens 5..7 fill block 1
    assert len(seq.block_ids) == 2
    assert kv.num_new_blocks_needed(seq, 1) == 1
    advance(kv, seq, 1)                       # token 8 opens block 2
    assert len(seq.block_ids) == 3
    assert kv.num_used_blocks == 3 and kv.num_free_blocks == 6
    assert all(kv.ref_count(b) == 1 for b in seq.block_ids)
    assert len(set(seq.block_ids)) == 3


def test_kv_cache_manager_allocate_never_hands_out_block_zero():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    seq = make_seq(10)
    advance(kv, seq, 10)
    assert sorted(seq.block_ids) == [1, 2, 3, 4, 5]
    assert kv.num_free_blocks == 0
    assert kv.ref_count(0) == 0


def test_kv_cache_manager_allocate_out_of_blocks_raises_and_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    holder = make_seq(8, "holder")
    advance(kv, holder, 8)                    # 2 of the 3 usable blocks
    seq = make_seq(8, "seq")
    assert kv.can_allocate(seq, 4)
    assert not kv.can_allocate(seq, 5)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        kv.allocate(seq, 5)
    assert seq.block_ids == []
    assert kv.num_free_blocks == 1


def test_kv_cache_manager_free_returns_blocks_and_clears_the_sequence():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_seq(9, "a"), make_seq(4, "b")
    advance(kv, a, 9)
    advance(kv, b, 4)
    held_by_a = list(a.block_ids)
    kv.free(a)
    assert a.block_ids == []
    assert kv.num_free_blocks == 7 - 1
    assert all(kv.ref_count(block) == 0 for block in held_by_a)
    assert kv.ref_count(b.block_ids[0]) == 1
    kv.free(a)                                # freeing an empty sequence is a no-op
    assert kv.num_free_blocks == 6


def test_kv_cache_manager_freed_blocks_are_handed_out_again():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_seq(8, "a")
    advance(kv, a, 8)
    blocks = set(a.block_ids)
    kv.free(a)
    b = make_seq(8, "b")
    advance(kv, b, 8)
    assert set(b.block_ids) == blocks == {1, 2}


# ---- prefix caching ----

def test_kv_cache_manager_prefix_hit_shares_full_blocks_and_counts_the_hit_rate():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_seq(10, "a")                               # blocks [0..3] [4..7] [8, 9]
    assert admit(kv, a) == []
    assert [kv.block_hash(b) is not None for b in a.block_ids] == [True, True, False]
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (10, 0)
    b = make_seq([0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52], "b")
    cached = kv.get_cached_prefix(b)
    assert cached == a.block_ids[:2]
    assert kv.num_new_blocks_needed(b, 3, cached) == 1  # hit blocks are not new
    kv.allocate(b, 3, cached)
    assert b.block_ids[:2] == a.block_ids[:2] and b.num_computed_tokens == 8
    assert [kv.ref_count(x) for x in b.block_ids] == [2, 2, 1]
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (21, 8)
    assert kv.prefix_cache_hit_rate == pytest.approx(8 / 21)
    assert kv.num_used_blocks == 4 and kv.num_free_blocks == 5 and kv.num_cached_blocks == 0


def test_kv_cache_manager_hit_rate_is_zero_before_any_lookup():
    assert KVCacheManager(num_blocks=4, block_size=4).prefix_cache_hit_rate == 0.0


def test_kv_cache_manager_never_hits_the_whole_sequence():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_seq(9, "a")
    admit(kv, a)
    # 8 tokens all cached: only 1 block may hit, so the last token is still computed.
    assert kv.get_cached_prefix(make_seq(8, "same")) == a.block_ids[:1]
    assert kv.get_cached_prefix(make_seq(9, "longer")) == a.block_ids[:2]
    assert kv.get_cached_prefix(make_seq(4, "one_block")) == []


def test_kv_cache_manager_hash_chains_every_earlier_token_and_the_salt():
    kv = KVCacheManager(num_blocks=10, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    admit(kv, a)
    # Same second block after a different first one: a different K/V, no hit.
    assert kv.get_cached_prefix(make_seq([9, 9, 3, 4, 5], "b")) == []
    assert kv.get_cached_prefix(make_seq([1, 2, 9, 4, 5], "c")) == a.block_ids[:1]
    assert kv.get_cached_prefix(make_seq([1, 2, 3, 4, 5], "salted", cache_salt="x")) == []
    salted = make_seq([1, 2, 3, 4, 5], "salted", cache_salt="x")
    admit(kv, salted)
    assert kv.get_cached_prefix(make_seq([1, 2, 3, 4, 0], "same_salt", cache_salt="x")) == salted.block_ids[:2]
    assert kv.get_cached_prefix(make_seq([1, 2, 3, 4, 0], "no_salt")) == a.block_ids[:2]


def test_kv_cache_manager_freed_named_blocks_stay_cached_and_are_evicted_tail_first():
    kv = KVCacheManager(num_blocks=5, block_size=2)    # free list [1, 2, 3, 4]
    a = make_seq([1, 2, 3, 4, 5], "a")
    admit(kv, a)
    assert a.block_ids == [1, 2, 3]                   # 1 and 2 are full and named
    kv.free(a)                                        # 3 -> free list; LRU: 2, then 1
    assert (kv.num_free_blocks, kv.num_cached_blocks, kv.num_used_blocks) == (4, 2, 0)
    b = make_seq([7, 7, 7, 7, 7], "b")
    admit(kv, b)
    assert b.block_ids == [4, 3, 2]                   # free list first, then the prefix's tail
    assert kv.block_hash(2) is None and kv.num_cached_blocks == 1
    assert kv.get_cached_prefix(make_seq([1, 2, 3, 4, 5], "again")) == [1]


def test_kv_cache_manager_evicts_the_least_recently_freed_sequence_first():
    kv = KVCacheManager(num_blocks=5, block_size=2)
    first, second = make_seq([1, 1, 0], "first"), make_seq([2, 2, 0], "second")
    admit(kv, first)                                  # blocks 1 (named), 2
    admit(kv, second)                                 # blocks 3 (named), 4
    kv.free(first)
    kv.free(second)                                   # free list [2, 4]; LRU [1, 3]
    assert kv.num_cached_blocks == 2
    taker = make_seq([3, 3, 3, 3, 3], "taker")
    admit(kv, taker)
    assert taker.block_ids == [2, 4, 1]
    assert kv.get_cached_prefix(make_seq([1, 1, 0], "first_again")) == []
    assert kv.get_cached_prefix(make_seq([2, 2, 0], "second_again")) == [3]


def test_kv_cache_manager_a_hit_takes_the_block_out_of_the_lru():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3], "a")
    admit(kv, a)
    kv.free(a)
    assert (kv.num_free_blocks, kv.num_cached_blocks) == (5, 1)
    b = make_seq([1, 2, 9], "b")
    assert admit(kv, b) == [1]
    # the hit block and b's new last block both leave the allocatable pool
    assert (kv.num_free_blocks, kv.num_cached_blocks, kv.ref_count(1)) == (3, 0, 1)


def test_kv_cache_manager_can_allocate_reserves_the_evictable_blocks_of_a_hit():
    kv = KVCacheManager(num_blocks=4, block_size=2)    # 3 usable
    a = make_seq([1, 2, 3], "a")
    admit(kv, a)
    kv.free(a)                                        # 1 cached, 2 free: 3 allocatable
    b = make_seq([1, 2, 7, 8, 9, 10, 11], "b")
    cached = kv.get_cached_prefix(b)
    assert cached == [1]
    # 5 more tokens need 3 new blocks, and the hit block leaves the evictable pool: 4 > 3.
    assert kv.num_new_blocks_needed(b, 5, cached) == 3
    assert not kv.can_allocate(b, 5, cached)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        kv.allocate(b, 5, cached)
    assert b.block_ids == [] and b.num_computed_tokens == 0 and kv.num_cached_blocks == 1
    assert kv.num_queried_tokens == 3                 # a failed admission is not a lookup
    assert kv.can_allocate(b, 3, cached)              # 2 new + 1 reserved
    kv.allocate(b, 3, cached)
    assert b.block_ids[0] == 1 and kv.num_free_blocks == 0


def test_kv_cache_manager_allocate_rejects_a_stale_prefix():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_seq([1, 2, 3], "a")
    admit(kv, a)
    kv.free(a)
    b = make_seq([1, 2, 3], "b")
    cached = kv.get_cached_prefix(b)
    evictor = make_seq([5, 5, 5, 5], "evictor")
    admit(kv, evictor)                                # evicts block 1 and names it anew
    assert evictor.block_ids == [2, 1]
    kv.free(evictor)
    with pytest.raises(ValueError, match="not its cached block"):
        kv.allocate(b, 1, cached)
    assert b.block_ids == [] and kv.num_used_blocks == 0
    c = make_seq([5, 5, 5, 5], "c")                   # both of evictor's blocks are cached
    with pytest.raises(ValueError, match="leave a token"):
        kv.allocate(c, 0, [2, 1])


def test_kv_cache_manager_a_duplicate_full_block_stays_unnamed():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a, b = make_seq([1, 2, 3], "a"), make_seq([1, 2, 3], "b")
    for seq in (a, b):                                # both computed before either was named
        kv.allocate(seq, 3, kv.get_cached_prefix(seq))
    for seq in (a, b):
        seq.num_computed_tokens = 3
        kv.cache_full_blocks(seq)
    assert kv.block_hash(a.block_ids[0]) is not None and kv.block_hash(b.block_ids[0]) is None
    kv.free(b)
    assert kv.num_cached_blocks == 0                  # b's duplicate went to the free list
    assert kv.get_cached_prefix(make_seq([1, 2, 0], "c")) == a.block_ids[:1]


def test_kv_cache_manager_disabled_caching_names_and_reuses_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5], "a")
    assert admit(kv, a) == []
    assert all(kv.block_hash(x) is None for x in range(8)) and a.block_hashes == []
    kv.free(a)
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 7
    assert kv.get_cached_prefix(make_seq([1, 2, 3, 4, 5], "b")) == []
    assert (kv.num_queried_tokens, kv.num_hit_tokens, kv.prefix_cache_hit_rate) == (0, 0, 0.0)


def test_kv_cache_manager_reset_prefix_cache_forgets_every_name():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a, b = make_seq([1, 2, 3], "a"), make_seq([4, 5, 6], "b")
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 5
    assert all(kv.block_hash(x) is None for x in range(8))
    assert kv.get_cached_prefix(make_seq([1, 2, 0], "a2")) == []
    assert kv.get_cached_prefix(make_seq([4, 5, 0], "b2")) == []
    kv.free(b)
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 7


# ---- fork and copy-on-write ----

def test_kv_cache_manager_fork_shares_blocks_and_copies_the_partial_one_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4, 5, 6], "parent")
    admit(kv, parent)                                 # [1..4] full, [5, 6] partial
    p0, p1 = parent.block_ids
    child = make_seq([1, 2, 3, 4, 5, 6, 9], "child")
    kv.fork(parent, child)
    assert child.block_ids == [p0, p1] and child.num_computed_tokens == 6
    assert (kv.ref_count(p0), kv.ref_count(p1)) == (2, 2)
    assert kv.num_new_blocks_needed(child, 1) == 1    # its copy of the shared partial block
    compute(kv, child, 1)
    new = child.block_ids[1]
    assert child.block_ids[0] == p0 and new not in (p0, p1)
    assert kv.take_block_copies() == [(p1, new)]
    assert kv.take_block_copies() == []
    assert (kv.ref_count(p0), kv.ref_count(p1), kv.ref_count(new)) == (2, 1, 1)
    parent.token_ids.append(8)
    assert kv.num_new_blocks_needed(parent, 1) == 0   # parent is now the only holder of p1
    compute(kv, parent, 1)
    assert parent.block_ids == [p0, p1] and kv.take_block_copies() == []
    kv.free(parent)
    kv.free(child)
    assert kv.num_used_blocks == 0


def test_kv_cache_manager_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    parent = make_seq([1, 2, 3, 4], "parent")
    admit(kv, parent)
    child = make_seq([1, 2, 3, 4, 7], "child")
    kv.fork(parent, child)
    compute(kv, child, 1)
    assert child.block_ids[:2] == parent.block_ids and len(child.block_ids) == 3
    assert kv.take_block_copies() == []


def test_kv_cache_manager_fork_shares_only_the_blocks_of_the_common_computed_tokens():
    """n > 1 forks children off a first completion that a step in flight has already moved
    past its prompt: the children share the prompt's blocks, not the first's newer one."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4, 5, 6, 7, 8], "parent")
    admit(kv, parent)                                 # two full blocks
    parent.token_ids.append(9)                        # its first sampled token ...
    compute(kv, parent, 1)                            # ... computed by the next step: a 3rd block
    child = make_seq([1, 2, 3, 4, 5, 6, 7, 8], "child")
    kv.fork(parent, child)
    assert child.block_ids == parent.block_ids[:2] and child.num_computed_tokens == 8
    assert [kv.ref_count(b) for b in parent.block_ids] == [2, 2, 1]
    assert child.num_registered_blocks == 2 and len(child.block_hashes) == 2
    kv.free(parent)
    kv.free(child)
    assert kv.num_used_blocks == 0


def test_kv_cache_manager_fork_rejects_a_child_with_other_tokens_or_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    parent = make_seq([1, 2, 3], "parent")
    admit(kv, parent)
    with pytest.raises(ValueError, match="differ"):
        kv.fork(parent, make_seq([1, 2, 4], "child"))
    holder = make_seq([1], "holder")
    admit(kv, holder)
    with pytest.raises(ValueError, match="already holds"):
        kv.fork(parent, holder)


def test_kv_cache_manager_drops_a_copy_into_a_block_freed_before_the_step():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3], "parent")
    admit(kv, parent)
    child = make_seq([1, 2, 3, 4], "child")
    kv.fork(parent, child)
    kv.allocate(child, 1)                             # records a copy into a fresh block
    kv.free(child)                                    # e.g. preempted in the same schedule()
    assert kv.take_block_copies() == []
    assert kv.ref_count(parent.block_ids[0]) == 1


# ---- the state machine ----

TOKENS = st.integers(0, 2)  # a tiny vocabulary so different histories share block contents


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Sequences are admitted (with prefix hits), grow, fork, get preempted and freed.

    The test keeps its own picture of the device cache: ``content[block]`` holds, per slot, a
    stand-in for the K/V written there: (cache salt, every token up to and including that
    position), since real K/V depends on all of them. After every step each live sequence must
    read its own K/V back through its blocks, and every prefix hit must hand over blocks whose
    content is exactly what the hitting sequence would have computed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kv: KVCacheManager
        self.live: list[Sequence] = []
        self.histories: list[list[int]] = []  # token lists of every admitted sequence (they grow)
        self.content: dict[int, list] = {}
        self.num_created = 0
        self.num_queried = self.num_hits = 0

    @initialize(num_blocks=st.integers(2, 16), block_size=st.sampled_from([1, 2, 4]),
                caching=st.booleans())
    def init_pool(self, num_blocks, block_size, caching):
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)

    # ---- rules ----
    @rule(data=st.data(), tail=st.lists(TOKENS, max_size=10), chunk=st.integers(1, 20),
          salt=st.sampled_from([None, None, "x"]))
    def add_sequence(self, data, tail, chunk, salt):
        prefix: list[int] = []
        if self.histories:
            source = data.draw(st.sampled_from(self.histories))
            prefix = source[:data.draw(st.integers(0, len(source)))]
        tokens = (prefix + tail) or [0]
        seq = make_seq(tokens, f"s{self.num_created}", cache_salt=salt)
        self.num_created += 1
        if self._admit(seq, chunk):
            self.histories.append(seq.token_ids)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), num_new_tokens=st.integers(1, 9))
    def append_tokens(self, data, num_new_tokens):
        seq = data.draw(st.sampled_from(self.live))
        missing = seq.num_computed_tokens + num_new_tokens - seq.num_tokens
        if missing > 0:  # "generated" tokens
            seq.token_ids.extend(data.draw(st.lists(TOKENS, min_size=missing, max_size=missing)))
        self._grow(seq, num_new_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tail=st.lists(TOKENS, min_size=1, max_size=3), num_new_tokens=st.integers(0, 3))
    def fork_sequence(self, data, tail, num_new_tokens):
        """Forks (as n > 1 or beam search will), then the child may compute some of its tail."""
        parent = data.draw(st.sampled_from(self.live))
        tokens = parent.token_ids[:parent.num_computed_tokens] + tail
        child = make_seq(tokens, f"s{self.num_created}", cache_salt=parent.request.cache_salt)
        self.num_created += 1
        refs = [self.kv.ref_count(b) for b in parent.block_ids]
        self.kv.fork(parent, child)
        assert child.block_ids == parent.block_ids
        assert child.num_computed_tokens == parent.num_computed_tokens
        assert [self.kv.ref_count(b) for b in parent.block_ids] == [r + 1 for r in refs]
        self.live.append(child)
        if num_new_tokens:
            self._grow(child, min(num_new_tokens, len(tail)))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_sequence(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self._free(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 20))
    def preempt_and_resume(self, data, chunk):
        """Recompute preemption: freed, then admitted again, hitting its own cached blocks."""
        seq = data.draw(st.sampled_from(self.live))
        self._free(seq)
        seq.num_computed_tokens = 0
        self._admit(seq, chunk)

    @rule()
    def exhaust_pool(self):
        """Takes every allocatable block at once, evicting every cached one, then gives them back."""
        kv = self.kv
        num_free = kv.num_free_blocks
        if num_free == 0:
            return
        held = {b for seq in self.live for b in seq.block_ids}
        probe = make_seq([99] * (num_free * kv.block_size), "probe")
        advance(kv, probe, num_free * kv.block_size)
        assert len(probe.block_ids) == len(set(probe.block_ids)) == num_free
        assert 0 not in probe.block_ids and not held & set(probe.block_ids)
        assert kv.num_free_blocks == 0 and kv.num_cached_blocks == 0
        assert set(kv._block_id_by_hash.values()) <= held
        assert not kv.can_allocate(make_seq(1, "one_more"), 1)
        kv.free(probe)
        assert kv.num_free_blocks == num_free and kv.num_cached_blocks == 0

    @rule()
    def drain(self):
        for seq in list(self.live):
            self._free(seq)
        kv = self.kv
        assert kv.num_used_blocks == 0
        assert kv.num_free_blocks == kv.num_usable_blocks
        assert all(kv.ref_count(b) == 0 for b in range(kv.num_blocks))
        assert kv.num_cached_blocks == len(kv._block_id_by_hash)

    # ---- helpers ----
    def _kv_of(self, seq: Sequence, position: int) -> tuple:
        return seq.request.cache_salt, tuple(seq.token_ids[:position + 1])

    def _block_content(self, seq: Sequence, index: int) -> list[tuple]:
        bs = self.kv.block_size
        return [self._kv_of(seq, p) for p in range(index * bs, (index + 1) * bs)]

    def _admit(self, seq: Sequence, chunk: int) -> bool:
        kv, bs = self.kv, self.kv.block_size
        cached = kv.get_cached_prefix(seq)
        max_hit = (seq.num_tokens - 1) // bs
        assert len(cached) <= max_hit
        if not kv.enable_prefix_caching:
            assert cached == []
        for i, block in enumerate(cached):
            assert self.content[block] == self._block_content(seq, i), "a hit with other K/V"
        if len(cached) < max_hit:  # the hit is the longest: no named block holds the next one
            wanted = self._block_content(seq, len(cached))
            assert not any(self.content.get(b) == wanted for b in kv._block_id_by_hash.values())
        num_new = min(chunk, seq.num_tokens - len(cached) * bs)
        needed = kv.num_blocks_for(len(cached) * bs + num_new) - len(cached)
        assert kv.num_new_blocks_needed(seq, num_new, cached) == needed
        reserved = sum(1 for b in cached if kv.ref_count(b) == 0)
        num_free, num_cached = kv.num_free_blocks, kv.num_cached_blocks
        refs = [kv.ref_count(b) for b in cached]
        if not kv.can_allocate(seq, num_new, cached):
            assert needed + reserved > num_free
            with pytest.raises(RuntimeError, match="out of KV blocks"):
                kv.allocate(seq, num_new, cached)
            assert seq.block_ids == [] and seq.num_computed_tokens == 0
            assert (kv.num_free_blocks, kv.num_cached_blocks) == (num_free, num_cached)
            return False
        lru = [b for b in kv._evictable if b not in cached]
        kv.allocate(seq, num_new, cached)
        self._check_evicted_least_recent_first(lru)
        assert seq.block_ids[:len(cached)] == cached
        assert seq.num_computed_tokens == len(cached) * bs
        assert [kv.ref_count(b) for b in cached] == [r + 1 for r in refs]
        assert kv.num_free_blocks == num_free - needed - reserved
        if kv.enable_prefix_caching:
            self.num_queried += seq.num_tokens
            self.num_hits += len(cached) * bs
        self._compute(seq, num_new, kv.take_block_copies())
        self.live.append(seq)
        return True

    def _grow(self, seq: Sequence, num_new_tokens: int) -> None:
        kv, bs = self.kv, self.kv.block_size
        start = seq.num_computed_tokens
        first, end = start // bs, min(len(seq.block_ids), kv.num_blocks_for(start + num_new_tokens))
        shared = [i for i in range(first, end) if kv.ref_count(seq.block_ids[i]) > 1]
        needed = max(0, kv.num_blocks_for(start + num_new_tokens) - len(seq.block_ids)) + len(shared)
        assert kv.num_new_blocks_needed(seq, num_new_tokens) == needed
        before = (list(seq.block_ids), kv.num_free_blocks, kv.num_cached_blocks)
        if not kv.can_allocate(seq, num_new_tokens):
            assert needed > kv.num_free_blocks
            with pytest.raises(RuntimeError, match="out of KV blocks"):
                kv.allocate(seq, num_new_tokens)
            assert (seq.block_ids, kv.num_free_blocks, kv.num_cached_blocks) == before
            return
        old_refs = {i: kv.ref_count(seq.block_ids[i]) for i in shared}
        snapshots = {i: list(self.content.get(seq.block_ids[i], [])) for i in shared}
        lru = list(kv._evictable)
        kv.allocate(seq, num_new_tokens)
        self._check_evicted_least_recent_first(lru)
        assert kv.num_free_blocks == before[1] - needed
        copies = kv.take_block_copies()
        unshared = [i for i in range(len(before[0])) if i not in shared]
        assert [seq.block_ids[i] for i in unshared] == [before[0][i] for i in unshared]
        for i in shared:  # copy-on-write: a fresh block, a copy when it held computed tokens
            src, dst = before[0][i], seq.block_ids[i]
            assert dst != src and kv.ref_count(src) == old_refs[i] - 1 and kv.ref_count(dst) == 1
            assert ((src, dst) in copies) == (i * bs < start)
        assert len(copies) == sum(1 for i in shared if i * bs < start)
        self._compute(seq, num_new_tokens, copies)
        for i in shared:
            assert self.content.get(before[0][i], []) == snapshots[i], "wrote into a shared block"

    def _check_evicted_least_recent_first(self, lru: list[int]) -> None:
        evicted = [b for b in lru if b not in self.kv._evictable]
        assert evicted == lru[:len(evicted)], "evicted a cached block out of LRU order"
        assert all(self.kv.block_hash(b) is None for b in evicted)

    def _compute(self, seq: Sequence, num_new_tokens: int, copies: list[tuple[int, int]]) -> None:
        """The device: block copies first, then this step's K/V writes; then name full blocks."""
        kv, bs = self.kv, self.kv.block_size
        for src, dst in copies:
            self.content[dst] = list(self.content[src])
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens):
            block = seq.block_ids[p // bs]
            assert kv.ref_count(block) == 1, "writes into a block someone else holds"
            assert kv.block_hash(block) is None, "writes into a named block"
            self.content.setdefault(block, [None] * bs)[p % bs] = self._kv_of(seq, p)
        seq.num_computed_tokens += num_new_tokens
        kv.cache_full_blocks(seq)
        assert seq.num_registered_blocks == (seq.num_computed_tokens // bs if kv.enable_prefix_caching else 0)

    def _free(self, seq: Sequence) -> None:
        kv = self.kv
        released = [b for b in seq.block_ids if kv.ref_count(b) == 1]
        named = [b for b in released if kv.block_hash(b) is not None]
        num_free, num_cached = kv.num_free_blocks, kv.num_cached_blocks
        kv.free(seq)
        self.live.remove(seq)
        assert seq.block_ids == []
        assert kv.num_free_blocks == num_free + len(released)
        assert kv.num_cached_blocks == num_cached + len(named)
        if named:  # most recently freed last, and a sequence's tail before its head
            assert list(kv._evictable)[-len(named):] == named[::-1]

    # ---- invariants ----
    @invariant()
    def books_balance(self):
        kv = self.kv
        usable = list(range(1, kv.num_blocks))
        free, cached = list(kv._free_block_ids), list(kv._evictable)
        used = [b for b in usable if kv.ref_count(b) > 0]
        assert sorted(free + cached + used) == usable, "free / cached / used must partition 1..N-1"
        assert kv.num_free_blocks == len(free) + len(cached)
        assert kv.num_cached_blocks == len(cached)
        assert kv.num_used_blocks == len(used)
        assert kv.ref_count(0) == 0 and kv.block_hash(0) is None
        held = [b for seq in self.live for b in seq.block_ids]
        assert 0 not in held
        for block in range(kv.num_blocks):
            assert kv.ref_count(block) == held.count(block)
        for seq in self.live:
            assert len(set(seq.block_ids)) == len(seq.block_ids)
            assert len(seq.block_ids) == kv.num_blocks_for(seq.num_computed_tokens)

    @invariant()
    def names_are_consistent(self):
        kv = self.kv
        mapping = kv._block_id_by_hash
        for block_hash, block in mapping.items():
            assert kv.block_hash(block) == block_hash
            assert None not in self.content[block], "a named block is not full"
        named = [b for b in range(kv.num_blocks) if kv.block_hash(b) is not None]
        assert len(named) == len(mapping)
        assert all(kv.block_hash(b) is not None for b in kv._evictable)
        assert all(kv.block_hash(b) is None for b in kv._free_block_ids)
        if not kv.enable_prefix_caching:
            assert not mapping
        assert (kv.num_queried_tokens, kv.num_hit_tokens) == (self.num_queried, self.num_hits)

    @invariant()
    def every_sequence_reads_back_its_own_kv(self):
        bs = self.kv.block_size
        for seq in self.live:
            for p in range(seq.num_computed_tokens):
                assert self.content[seq.block_ids[p // bs]][p % bs] == self._kv_of(seq, p), \
                    f"{seq.request_id}: position {p} corrupted"

    def teardown(self):
        if hasattr(self, "kv"):
            self.drain()


KVCacheManagerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40,
                                                   deadline=None)
test_kv_cache_manager_state_machine = KVCacheManagerMachine.TestCase
