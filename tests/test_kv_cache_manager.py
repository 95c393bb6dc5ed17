"""KVCacheManager: the host block pool (block 0 reserved, ref counts), unit and stateful tests."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.sampling_params import SamplingParams
from jaxllm.sequence import Request, Sequence


def make_seq(num_prompt_tokens: int, request_id: str = "r") -> Sequence:
    request = Request(request_id=request_id, prompt=None,
                      prompt_token_ids=tuple(range(num_prompt_tokens)),
                      sampling_params=SamplingParams(), seed=0, eos_token_ids=frozenset(),
                      arrival_time=0.0)
    return Sequence.from_request(request)


def advance(kv: KVCacheManager, seq: Sequence, num_new_tokens: int) -> None:
    """Allocates for, then 'computes', the next ``num_new_tokens`` tokens of ``seq``."""
    kv.allocate(seq, num_new_tokens)
    seq.num_computed_tokens += num_new_tokens


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


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Random sequences allocate, grow and free; the pool's books must balance after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.kv: KVCacheManager
        self.live: list[Sequence] = []
        self.num_created = 0

    @initialize(num_blocks=st.integers(2, 12), block_size=st.sampled_from([1, 2, 4]))
    def init_pool(self, num_blocks, block_size):
        self.kv = KVCacheManager(num_blocks, block_size)

    @rule(num_prompt_tokens=st.integers(1, 20), chunk=st.integers(1, 20))
    def add_sequence(self, num_prompt_tokens, chunk):
        seq = make_seq(num_prompt_tokens, f"s{self.num_created}")
        self.num_created += 1
        self._grow(seq, min(chunk, num_prompt_tokens))
        if seq.block_ids:
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), num_new_tokens=st.integers(1, 9))
    def append_tokens(self, data, num_new_tokens):
        seq = data.draw(st.sampled_from(self.live))
        self._grow(seq, num_new_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_sequence(self, data):
        seq = data.draw(st.sampled_from(self.live))
        num_free = self.kv.num_free_blocks
        num_held = len(seq.block_ids)
        self.kv.free(seq)
        self.live.remove(seq)
        assert seq.block_ids == []
        assert self.kv.num_free_blocks == num_free + num_held

    @rule()
    def exhaust_pool(self):
        """Takes every free block at once: they are distinct, not held by anyone, never 0."""
        kv = self.kv
        num_free = kv.num_free_blocks
        if num_free == 0:
            return
        probe = make_seq(num_free * kv.block_size, "probe")
        advance(kv, probe, num_free * kv.block_size)
        held = {b for seq in self.live for b in seq.block_ids}
        assert len(probe.block_ids) == len(set(probe.block_ids)) == num_free
        assert 0 not in probe.block_ids
        assert not held & set(probe.block_ids)
        assert kv.num_free_blocks == 0
        assert not kv.can_allocate(make_seq(1, "one_more"), 1)
        kv.free(probe)
        assert kv.num_free_blocks == num_free

    @rule()
    def drain(self):
        for seq in self.live:
            self.kv.free(seq)
        self.live.clear()
        assert self.kv.num_free_blocks == self.kv.num_usable_blocks
        assert self.kv.num_used_blocks == 0
        assert all(self.kv.ref_count(b) == 0 for b in range(self.kv.num_blocks))

    def _grow(self, seq: Sequence, num_new_tokens: int) -> None:
        kv = self.kv
        needed = kv.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        assert kv.num_new_blocks_needed(seq, num_new_tokens) == max(0, needed)
        before = (list(seq.block_ids), kv.num_free_blocks)
        if kv.can_allocate(seq, num_new_tokens):
            assert max(0, needed) <= kv.num_free_blocks
            advance(kv, seq, num_new_tokens)
            assert seq.block_ids[:len(before[0])] == before[0]
            assert kv.num_free_blocks == before[1] - max(0, needed)
        else:
            assert needed > kv.num_free_blocks
            with pytest.raises(RuntimeError):
                kv.allocate(seq, num_new_tokens)
            assert (seq.block_ids, kv.num_free_blocks) == before

    @invariant()
    def books_balance(self):
        kv = self.kv
        held = [b for seq in self.live for b in seq.block_ids]
        assert 0 not in held
        assert all(1 <= b < kv.num_blocks for b in held)
        assert len(held) == len(set(held)), "a block is held by two sequences"
        # free + used partition blocks 1..N-1
        assert kv.num_used_blocks == len(held)
        assert kv.num_free_blocks + len(held) == kv.num_blocks - 1
        for block in range(kv.num_blocks):
            assert kv.ref_count(block) == held.count(block)
        for seq in self.live:
            assert len(seq.block_ids) == kv.num_blocks_for(seq.num_computed_tokens)

    def teardown(self):
        self.drain()


KVCacheManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                                   deadline=None)
test_kv_cache_manager_state_machine = KVCacheManagerMachine.TestCase
