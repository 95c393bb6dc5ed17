"""Scheduler driven by a fake, hand-calculable step: no model, no jax.

The fake step keeps a fake KV cache written through each sequence's block ids, exactly where
the model would write K/V; what it writes for position p is every token up to p, since real K/V
depends on all of them. When a step completes a sequence's prefill, the fake model reads the
whole context back out of that cache through the block ids (so a block freed or handed to
someone else too early, or a prefix hit on a block with other contents, shows up as a wrong
context) and "samples" ``(last token + 1) % 100``. The scheduler then advances the batch and
the real Postprocessor takes the sampled tokens, as the executor does (it finishes sequences at
max_tokens and names the blocks that became full, for prefix caching).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.output_processor import OutputProcessor
from jaxllm.postprocess import Postprocessor
from jaxllm.row_results import RowResults
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import ScheduledBatch, ScheduledSequence, Scheduler
from jaxllm.sequence import Request, Sequence, SequenceStatus


def make_seq(request_id: str, prompt: list[int], max_tokens: int = 4, priority: int = 0) -> Sequence:
    request = Request(request_id=request_id, prompt=None, prompt_token_ids=tuple(prompt),
                      sampling_params=SamplingParams(max_tokens=max_tokens), seed=0,
                      eos_token_ids=frozenset(), arrival_time=0.0, priority=priority)
    return Sequence.from_request(request)


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    return list(prompt) + [(prompt[-1] + 1 + i) % 100 for i in range(max_tokens)]


class FakeEngine:
    """A scheduler plus a fake step and the real postprocessing, checking invariants."""

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool = True,
                 prefill_first: bool = False) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, prefill_first)
        self.postprocessor = Postprocessor(self.scheduler, OutputProcessor(None), max_model_len=10_000)
        self.cache: dict[int, tuple[int, ...]] = {}  # slot -> the K/V stand-in written there
        self.finished: list[Sequence] = []
        self.batches: list[list[tuple[str, int]]] = []
        self.completes: list[list[bool]] = []

    def add(self, seq: Sequence) -> Sequence:
        self.scheduler.add(seq)
        return seq

    def place_running(self, seq: Sequence, num_computed_tokens: int) -> Sequence:
        """Puts ``seq`` straight into the running queue with its first tokens already cached."""
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)
        self.kv.allocate(seq, num_computed_tokens)
        for pos in range(num_computed_tokens):
            self.cache[self._slot(seq, pos)] = self._kv_of(seq, pos)
        seq.num_computed_tokens = num_computed_tokens
        self.kv.cache_full_blocks(seq)
        return seq

    @staticmethod
    def _kv_of(seq: Sequence, position: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[:position + 1])

    def _slot(self, seq: Sequence, position: int) -> int:
        bs = self.kv.block_size
        return seq.block_ids[position // bs] * bs + position % bs

    def step(self) -> ScheduledBatch:
        sched = self.scheduler
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        batch = sched.schedule()
        self.batches.append([(item.seq.request_id, item.num_new_tokens) for item in batch.scheduled])
        self.check_invariants(batch, running_before, waiting_before)
        completes = [item.completes_prefill for item in batch.scheduled]
        self.completes.append(completes)
        sampled = []
        bs = self.kv.block_size
        copied = {dst: [self.cache.get(src * bs + i) for i in range(bs)] for src, dst in batch.block_copies}
        for dst, values in copied.items():  # copy-on-write copies come before the writes
            for i, value in enumerate(values):
                self.cache[dst * bs + i] = value
        for item in batch.scheduled:  # the fake "forward": write K/V of the new tokens
            seq = item.seq
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens):
                self.cache[self._slot(seq, pos)] = self._kv_of(seq, pos)
        for item, done in zip(batch.scheduled, completes):
            sampled.append(-1)  # rows that do not sample: ignored
            if done:  # the fake "attention": read the whole context back through the blocks
                seq = item.seq
                context = [self.cache[self._slot(seq, p)] for p in range(seq.num_tokens)]
                expected = [self._kv_of(seq, p) for p in range(seq.num_tokens)]
                assert context == expected, f"{seq.request_id}: corrupted context"
                sampled[-1] = (context[-1][-1] + 1) % 100
        sched.advance(batch)
        news = self.postprocessor.process(batch, RowResults(sampled, [0.0] * len(sampled), {}, {}))
        self.finished += [seq for seq in news.seqs if seq.is_finished]
        return batch

    def check_invariants(self, batch: ScheduledBatch, running_before: list[Sequence],
                         waiting_before: list[Sequence]) -> None:
        sched, kv = self.scheduler, self.kv
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(batch.scheduled) <= sched.max_num_seqs
        assert len(sched.running) <= sched.max_num_seqs
        seqs = [item.seq for item in batch.scheduled]
        assert len({id(s) for s in seqs}) == len(seqs)
        for item in batch.scheduled:
            seq = item.seq
            assert item.num_new_tokens >= 1
            assert seq.status is SequenceStatus.RUNNING and seq in sched.running
            assert seq.num_computed_tokens + item.num_new_tokens <= seq.num_tokens
            assert len(seq.block_ids) * kv.block_size >= seq.num_computed_tokens + item.num_new_tokens
        # Running decodes, then running prefill chunks, then newly admitted sequences taken
        # from the head of the waiting queue in order.
        was_running = [any(s is seq for s in running_before) for seq in seqs]
        num_running = sum(was_running)
        assert was_running == [True] * num_running + [False] * (len(seqs) - num_running)
        kinds = [seq.num_uncomputed_tokens > 1 for seq in seqs[:num_running]]
        assert kinds == sorted(kinds), "a prefill chunk was scheduled before a decode"
        admitted = seqs[num_running:]
        assert admitted == waiting_before[:len(admitted)]
        for seq in admitted:  # a prefix hit is whole blocks and leaves a token to compute
            assert seq.num_computed_tokens % kv.block_size == 0
            assert seq.num_computed_tokens < seq.num_tokens
            if not kv.enable_prefix_caching:
                assert seq.num_computed_tokens == 0
            if seq.num_preemptions == 0:
                assert seq.metrics.num_cached_tokens == seq.num_computed_tokens
        if batch.preempted:
            assert not admitted, "admitted a waiting sequence in a step that preempted"
        for seq in batch.preempted:
            assert seq.status is SequenceStatus.WAITING and seq in sched.waiting
            assert seq.block_ids == [] and seq.num_computed_tokens == 0
            assert seq not in seqs
        held = [b for seq in sched.running for b in seq.block_ids]
        assert 0 not in held
        assert all(kv.ref_count(b) == held.count(b) for b in range(kv.num_blocks))
        assert kv.num_used_blocks == len(set(held))
        assert batch.block_copies == []  # nothing forks here
        assert all(seq.block_ids == [] for seq in sched.waiting)

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished:
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps")


def test_scheduled_sequence_completes_prefill_only_on_the_last_uncomputed_token():
    seq = make_seq("a", [1, 2, 3, 4, 5])
    assert not ScheduledSequence(seq, 4).completes_prefill
    assert ScheduledSequence(seq, 5).completes_prefill
    seq.num_computed_tokens = 3
    assert ScheduledSequence(seq, 2).completes_prefill
    assert not ScheduledSequence(seq, 1).completes_prefill


def test_scheduled_batch_counts_tokens_and_emptiness():
    a, b = make_seq("a", [1, 2, 3]), make_seq("b", [4])
    batch = ScheduledBatch([ScheduledSequence(a, 3), ScheduledSequence(b, 1)], preempted=[])
    assert batch.num_tokens == 4 and not batch.is_empty
    assert ScheduledBatch([], []).is_empty


def test_scheduler_empty_queue_schedules_nothing():
    engine = FakeEngine(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    batch = engine.step()
    assert batch.is_empty and batch.preempted == []
    assert not engine.scheduler.has_unfinished


def test_scheduler_prefills_then_decodes_one_sequence():
    engine = FakeEngine(num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    seq = engine.add(make_seq("a", [5, 6, 7], max_tokens=3))
    engine.run()
    assert engine.batches == [[("a", 3)], [("a", 1)], [("a", 1)]]
    assert seq.token_ids == [5, 6, 7, 8, 9, 10]
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "length"


def test_scheduler_decodes_are_never_starved_by_a_long_prefill():
    engine = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    engine.add(make_seq("a", [1, 2], max_tokens=5))
    engine.add(make_seq("b", list(range(20)), max_tokens=2))
    for _ in range(4):
        engine.step()
    # a's 2 tokens then b's chunk; a decodes first on every later step, b takes the rest.
    assert engine.batches == [[("a", 2), ("b", 6)], [("a", 1), ("b", 7)],
                              [("a", 1), ("b", 7)], [("a", 1), ("b", 1)]]


def test_scheduler_prefill_first_runs_admissions_without_decodes():
    engine = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=2, max_num_batched_tokens=8,
                        prefill_first=True)
    engine.add(make_seq("a", [1, 2], max_tokens=3))
    engine.step()
    engine.add(make_seq("b", list(range(10)), max_tokens=2))
    engine.add(make_seq("c", [7, 8], max_tokens=2))
    engine.run()
    # b is admitted alone (a's decode waits); then the seats are full, so a decodes beside
    # b's last chunk; c gets a seat when one frees. Everyone finishes with the expected tokens.
    assert engine.batches[:3] == [[("a", 2)], [("b", 8)], [("a", 1), ("b", 2)]]
    assert ("c", 2) in [item for batch in engine.batches for item in batch]
    assert all(seq.token_ids == expected_tokens(seq.token_ids[:len(seq.token_ids) - n], n)
               for seq, n in ((s, s.request.sampling_params.max_tokens) for s in engine.finished))
    assert len(engine.finished) == 3


def test_scheduler_puts_running_decodes_before_running_prefill_chunks():
    engine = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    prefill = make_seq("prefill", list(range(20)))
    decode = make_seq("decode", [1, 2, 3])
    engine.place_running(prefill, 8)  # the prefill is older; the decode still goes first
    engine.place_running(decode, 2)
    batch = engine.step()
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.scheduled] == [("decode", 1), ("prefill", 7)]


def test_scheduler_chunks_a_long_prompt_to_the_token_budget():
    engine = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    seq = engine.add(make_seq("a", list(range(20)), max_tokens=2))
    for _ in range(3):
        engine.step()
    assert engine.batches == [[("a", 8)], [("a", 8)], [("a", 4)]]
    assert engine.completes == [[False], [False], [True]]
    assert seq.token_ids == list(range(20)) + [20]
    assert len(seq.block_ids) == 5
    engine.run()
    assert engine.batches[3:] == [[("a", 1)]]
    assert seq.token_ids == expected_tokens(list(range(20)), 2)


def test_scheduler_chunked_prefill_shares_the_budget_with_a_second_prompt():
    engine = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    engine.add(make_seq("a", list(range(10)), max_tokens=1))
    engine.add(make_seq("b", list(range(30, 36)), max_tokens=1))
    engine.run()
    # a: 8 then 2 (+ b's first 6); both finish on their first token.
    assert engine.batches == [[("a", 8)], [("a", 2), ("b", 6)]]
    assert [s.request_id for s in engine.finished] == ["a", "b"]


def test_scheduler_respects_max_num_seqs():
    engine = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [engine.add(make_seq(f"s{i}", [i, i + 1], max_tokens=3)) for i in range(5)]
    batch = engine.step()
    assert [i.seq.request_id for i in batch.scheduled] == ["s0", "s1"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["s2", "s3", "s4"]
    engine.run()
    assert all(len(b) <= 2 for b in engine.batches)
    assert [s.token_ids for s in seqs] == [expected_tokens([i, i + 1], 3) for i in range(5)]


def test_scheduler_admits_waiting_sequences_first_come_first_served():
    engine = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    for name in ["c", "a", "b"]:
        engine.add(make_seq(name, [1], max_tokens=1))
    engine.run()
    assert [s.request_id for s in engine.finished] == ["c", "a", "b"]
    assert engine.batches == [[("c", 1)], [("a", 1)], [("b", 1)]]


def test_scheduler_does_not_let_a_small_request_overtake_a_blocked_head():
    # 4 usable blocks of 2: "big" (8 tokens) cannot start while "holder" holds 1 block.
    engine = FakeEngine(num_blocks=5, block_size=2, max_num_seqs=4, max_num_batched_tokens=64)
    engine.add(make_seq("holder", [1], max_tokens=2))
    engine.step()
    engine.add(make_seq("big", list(range(8)), max_tokens=1))
    engine.add(make_seq("small", [7], max_tokens=1))
    engine.run()
    assert [s.request_id for s in engine.finished] == ["holder", "big", "small"]


def test_scheduler_finish_frees_blocks_of_running_and_waiting_sequences():
    engine = FakeEngine(num_blocks=8, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    running = engine.add(make_seq("running", list(range(9)), max_tokens=4))
    waiting = engine.add(make_seq("waiting", [1], max_tokens=4))
    engine.step()
    assert len(running.block_ids) == 3 and engine.kv.num_free_blocks == 4
    engine.scheduler.finish(running, "abort")
    assert running.block_ids == [] and engine.kv.num_free_blocks == 7
    assert running.is_finished and running.finish_reason == "abort"
    assert engine.scheduler.running == []
    assert engine.scheduler.find("running") == []
    assert engine.scheduler.find("waiting") == [waiting]
    engine.scheduler.finish(waiting, "abort")
    assert not engine.scheduler.has_unfinished
    assert engine.kv.num_free_blocks == engine.kv.num_usable_blocks


def test_scheduler_preempts_the_newest_running_sequence_and_resumes_it():
    # 4 usable blocks of 2 tokens. a and b take 2 blocks each for their 3-token prompts; at
    # a's 5th token there is no block left, so b (the newest) is preempted.
    engine = FakeEngine(num_blocks=5, block_size=2, max_num_seqs=4, max_num_batched_tokens=16,
                        enable_prefix_caching=False)
    a = engine.add(make_seq("a", [10, 11, 12], max_tokens=4))
    b = engine.add(make_seq("b", [20, 21, 22], max_tokens=4))
    engine.step()
    engine.step()
    assert engine.batches == [[("a", 3), ("b", 3)], [("a", 1), ("b", 1)]]
    assert engine.kv.num_free_blocks == 0
    batch = engine.step()
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.scheduled] == [("a", 1)]
    assert batch.preempted == [b]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.token_ids == [20, 21, 22, 23, 24]           # its outputs are kept for recompute
    assert engine.scheduler.running == [a] and list(engine.scheduler.waiting) == [b]
    assert engine.kv.num_free_blocks == 1
    engine.run()
    # a finishes first (b cannot fit back in while a holds 3 blocks); b recomputes all 5
    # tokens in one step, which samples its 3rd output, then decodes its 4th.
    assert engine.batches[3:] == [[("a", 1)], [("b", 5)], [("b", 1)]]
    assert a.token_ids == expected_tokens([10, 11, 12], 4)
    assert b.token_ids == expected_tokens([20, 21, 22], 4)
    assert engine.scheduler.num_preemptions == 1
    assert engine.kv.num_free_blocks == engine.kv.num_usable_blocks


def test_scheduler_preempted_sequence_goes_back_ahead_of_later_arrivals():
    engine = FakeEngine(num_blocks=5, block_size=2, max_num_seqs=4, max_num_batched_tokens=16,
                        enable_prefix_caching=False)
    engine.add(make_seq("a", [10, 11, 12], max_tokens=4))
    b = engine.add(make_seq("b", [20, 21, 22], max_tokens=4))
    engine.step()
    engine.step()
    late = engine.add(make_seq("late", [30], max_tokens=1))
    batch = engine.step()
    assert batch.preempted == [b]
    assert list(engine.scheduler.waiting) == [b, late]
    engine.run()
    # a holds 3 of the 4 blocks until it finishes; then b is admitted before late.
    assert engine.batches[3:5] == [[("a", 1)], [("b", 5), ("late", 1)]]


def test_scheduler_preempting_an_already_scheduled_sequence_returns_its_tokens_to_the_budget():
    # 5 usable blocks of 2, 1 free; budget 4. running = [old, third, new] (new is newest).
    # Decodes first: "new" takes 1 token and the free block. "old" (prefill, needs a block
    # for tokens 4-5) finds none: "new" is preempted, leaves the batch, and its token goes
    # back to the budget, so "third" gets 2 tokens, not 1.
    engine = FakeEngine(num_blocks=6, block_size=2, max_num_seqs=4, max_num_batched_tokens=4)
    old = engine.place_running(make_seq("old", [1, 2, 3, 4, 5, 6], max_tokens=2), 4)
    third = engine.place_running(make_seq("third", list(range(30, 38)), max_tokens=1), 2)
    new = engine.place_running(make_seq("new", [7, 8, 9], max_tokens=4), 2)
    assert engine.kv.num_free_blocks == 1
    batch = engine.step()
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch.scheduled] == [("old", 2), ("third", 2)]
    assert batch.preempted == [new]
    assert new.block_ids == [] and list(engine.scheduler.waiting) == [new]
    assert engine.kv.num_free_blocks == 0
    engine.run()
    assert old.token_ids == expected_tokens([1, 2, 3, 4, 5, 6], 2)
    assert third.token_ids == expected_tokens(list(range(30, 38)), 1)
    assert new.token_ids == expected_tokens([7, 8, 9], 4)


# ---- prefix caching ----

SHARED = [40, 41, 42, 43, 44, 45, 46, 47]  # two blocks of 4


def test_scheduler_prefix_hit_schedules_only_the_uncached_tokens():
    engine = FakeEngine(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    a = engine.add(make_seq("a", SHARED + [50, 51, 52], max_tokens=2))
    engine.run()
    b = engine.add(make_seq("b", SHARED + [60, 61], max_tokens=2))
    engine.run()
    # b attaches a's 2 full prompt blocks (a is finished: they sat in the evictable LRU) and
    # computes only its own 2 prompt tokens, then decodes.
    assert engine.batches == [[("a", 11)], [("a", 1)], [("b", 2)], [("b", 1)]]
    assert b.token_ids == expected_tokens(SHARED + [60, 61], 2)
    assert (a.metrics.num_cached_tokens, b.metrics.num_cached_tokens) == (0, 8)
    assert (engine.kv.num_queried_tokens, engine.kv.num_hit_tokens) == (11 + 10, 8)
    assert engine.kv.prefix_cache_hit_rate == 8 / 21


def test_scheduler_prefix_hit_on_blocks_a_running_sequence_still_holds():
    engine = FakeEngine(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    a = engine.add(make_seq("a", SHARED + [50], max_tokens=3))
    engine.step()
    b = engine.add(make_seq("b", SHARED + [60, 61, 62], max_tokens=2))
    engine.step()
    assert engine.batches == [[("a", 9)], [("a", 1), ("b", 3)]]
    assert b.block_ids[:2] == a.block_ids[:2]
    assert [engine.kv.ref_count(x) for x in a.block_ids[:2]] == [2, 2]
    engine.run()
    assert a.token_ids == expected_tokens(SHARED + [50], 3)
    assert b.token_ids == expected_tokens(SHARED + [60, 61, 62], 2)
    assert b.metrics.num_cached_tokens == 8 and engine.kv.num_used_blocks == 0


def test_scheduler_a_fully_cached_prompt_still_computes_its_last_block():
    engine = FakeEngine(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    engine.add(make_seq("a", SHARED, max_tokens=1))
    engine.run()
    b = engine.add(make_seq("b", SHARED, max_tokens=1))
    engine.run()
    assert engine.batches[-1] == [("b", 4)]  # 1 block of 2 hits; the step needs logits
    assert b.metrics.num_cached_tokens == 4
    assert b.token_ids == expected_tokens(SHARED, 1)


def test_scheduler_prefix_caching_off_computes_every_token():
    engine = FakeEngine(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                        enable_prefix_caching=False)
    engine.add(make_seq("a", SHARED + [50, 51, 52], max_tokens=2))
    engine.run()
    b = engine.add(make_seq("b", SHARED + [60, 61], max_tokens=2))
    engine.run()
    assert engine.batches[2:] == [[("b", 10)], [("b", 1)]]
    assert b.metrics.num_cached_tokens == 0 and engine.kv.prefix_cache_hit_rate == 0.0


def test_scheduler_preempted_sequence_resumes_from_its_cached_blocks():
    # As test_scheduler_preempts_the_newest_running_sequence_and_resumes_it, with caching on.
    # b's two full blocks [20, 21] [22, 23] are named before it is preempted, freed tail first
    # into the LRU; a's next block evicts [22, 23]. When b resumes, [20, 21] is still cached:
    # it computes 3 of its 5 tokens instead of 5.
    engine = FakeEngine(num_blocks=5, block_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    a = engine.add(make_seq("a", [10, 11, 12], max_tokens=4))
    b = engine.add(make_seq("b", [20, 21, 22], max_tokens=4))
    engine.step()
    engine.step()
    batch = engine.step()
    assert batch.preempted == [b]
    assert engine.kv.num_cached_blocks == 1
    engine.run()
    assert engine.batches[3:] == [[("a", 1)], [("b", 3)], [("b", 1)]]
    assert a.token_ids == expected_tokens([10, 11, 12], 4)
    assert b.token_ids == expected_tokens([20, 21, 22], 4)
    # The resume's hit counts in the hit rate but not in b's num_cached_tokens (prompt tokens
    # cached at its first admission).
    assert b.metrics.num_cached_tokens == 0
    assert (engine.kv.num_queried_tokens, engine.kv.num_hit_tokens) == (3 + 3 + 5, 2)


# ---- priority ----

def test_scheduler_serves_lower_priority_values_first_then_arrival_order():
    engine = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    for name, priority in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", -1)]:
        engine.add(make_seq(name, [1], max_tokens=1, priority=priority))
    assert [s.request_id for s in engine.scheduler.waiting] == ["e", "b", "d", "a", "c"]
    engine.run()
    assert [s.request_id for s in engine.finished] == ["e", "b", "d", "a", "c"]


def test_scheduler_equal_nonzero_priorities_stay_first_come_first_served():
    engine = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    for name in ["c", "a", "b"]:
        engine.add(make_seq(name, [1], max_tokens=1, priority=5))
    engine.run()
    assert [s.request_id for s in engine.finished] == ["c", "a", "b"]


def test_scheduler_a_later_urgent_request_is_admitted_before_earlier_ones():
    engine = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    engine.add(make_seq("first", [1], max_tokens=2))
    engine.step()                                 # first is running: priority does not preempt
    engine.add(make_seq("normal", [2], max_tokens=1))
    engine.add(make_seq("urgent", [3], max_tokens=1, priority=-1))
    engine.run()
    assert [s.request_id for s in engine.finished] == ["first", "urgent", "normal"]


def test_scheduler_preempted_sequence_goes_ahead_of_its_priority_only():
    engine = FakeEngine(num_blocks=5, block_size=2, max_num_seqs=4, max_num_batched_tokens=16,
                        enable_prefix_caching=False)
    a = engine.add(make_seq("a", [10, 11, 12], max_tokens=4, priority=1))
    b = engine.add(make_seq("b", [20, 21, 22], max_tokens=4, priority=1))
    engine.step()
    engine.step()
    late = engine.add(make_seq("late", [30], max_tokens=1, priority=1))
    lower = engine.add(make_seq("lower", [31], max_tokens=1, priority=2))
    urgent = engine.add(make_seq("urgent", [32], max_tokens=1, priority=0))
    batch = engine.step()
    assert batch.preempted == [b]
    assert list(engine.scheduler.waiting) == [urgent, b, late, lower]
    engine.run()
    # urgent is admitted as soon as a block frees up; b then comes before late, late before lower.
    assert engine.batches[3:] == [[("a", 1), ("urgent", 1)], [("b", 5), ("late", 1)],
                                  [("b", 1), ("lower", 1)]]
    for seq, prompt in [(a, [10, 11, 12]), (b, [20, 21, 22])]:
        assert seq.token_ids == expected_tokens(prompt, 4)


def test_scheduler_finish_removes_a_waiting_sequence_from_the_priority_queue():
    engine = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    seqs = [engine.add(make_seq(n, [1], max_tokens=1, priority=p)) for n, p in [("x", 1), ("y", 0), ("z", 1)]]
    engine.scheduler.finish(seqs[1], "abort")
    engine.add(make_seq("w", [1], max_tokens=1, priority=0))
    assert [s.request_id for s in engine.scheduler.waiting] == ["w", "x", "z"]
    engine.run()
    assert [s.request_id for s in engine.finished] == ["w", "x", "z"]


@settings(max_examples=60, deadline=None)
@given(
    workload=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(0, 1)),
                      min_size=1, max_size=6),
    shared_prefix_len=st.integers(0, 9),
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 4),
    budget_extra=st.integers(0, 12),
    spare_blocks=st.integers(0, 6),
    caching=st.booleans(),
)
def test_scheduler_small_pool_gives_the_same_tokens_as_a_big_pool(
        workload, shared_prefix_len, block_size, max_num_seqs, budget_extra, spare_blocks, caching):
    """Whatever preemption, chunking and prefix hits happen, every sequence ends with the same
    tokens (prompts share a prefix, so later ones and resumed ones hit cached blocks)."""
    shared = [90 + j % 10 for j in range(shared_prefix_len)]
    prompts = [shared + [(7 * i + j) % 90 for j in range(n)] for i, (n, _, _) in enumerate(workload)]
    longest = max(len(p) + m for p, (_, m, _) in zip(prompts, workload))
    # Just enough blocks for the longest sequence alone, plus a few.
    num_blocks = 1 + -(-longest // block_size) + spare_blocks
    engine = FakeEngine(num_blocks, block_size, max_num_seqs, max_num_seqs + budget_extra, caching)
    seqs = [engine.add(make_seq(f"s{i}", p, m, priority))
            for i, (p, (_, m, priority)) in enumerate(zip(prompts, workload))]
    engine.run(max_steps=2000)
    for seq, prompt, (_, max_tokens, _) in zip(seqs, prompts, workload):
        assert seq.token_ids == expected_tokens(prompt, max_tokens)
        assert seq.is_finished and seq.block_ids == []
    kv = engine.kv
    assert kv.num_free_blocks == kv.num_usable_blocks and kv.num_used_blocks == 0
    assert kv.num_hit_tokens <= kv.num_queried_tokens
    # One at a time, sequences finish in (priority, arrival) order.
    if max_num_seqs == 1:
        assert engine.finished == sorted(seqs, key=lambda s: s.request.priority)
