"""ModelRunner.prepare_inputs without a model: buckets, padding layout, slots, sampling rows."""

from __future__ import annotations

import jax
import numpy as np

from jaxllm.model_runner import ModelRunner
from jaxllm.models.rope import RopeSpec, RotaryTables
from jaxllm.packing import pack, unpack
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import ScheduledBatch, ScheduledSequence
from jaxllm.sequence import Request, Sequence

BLOCK_SIZE = 4
VOCAB = 32
# Two rotary tables (as Gemma 3's global and local layers), a rotary head dim of 6; the second
# scaled linearly by 4.
ROPE = (RopeSpec(6, theta=100.0), RopeSpec(6, theta=10.0, scaling=(("factor", 4.0), ("rope_type", "linear"))))


def make_runner() -> ModelRunner:
    # prepare_inputs never touches the step, the params or the device cache.
    return ModelRunner(step=None, params=None, kv_cache=None, block_size=BLOCK_SIZE,
                       max_num_batched_tokens=16, max_num_seqs=4, max_blocks_per_seq=8,
                       max_model_len=128, vocab_size=VOCAB, rotary=RotaryTables(ROPE))


def make_seq(request_id, prompt, outputs=(), *, num_computed, block_ids, seed=0, **params) -> Sequence:
    request = Request(request_id=request_id, prompt=None, prompt_token_ids=tuple(prompt),
                      sampling_params=SamplingParams(**params), seed=seed,
                      eos_token_ids=frozenset(), arrival_time=0.0)
    seq = Sequence.from_request(request)
    seq.token_ids += list(outputs)
    seq.num_computed_tokens = num_computed
    seq.block_ids = list(block_ids)
    return seq


def three_row_batch() -> ScheduledBatch:
    # a: prefill chunk, tokens 4..5 of a 6-token prompt (4 cached in block 7).
    a = make_seq("a", range(10, 16), num_computed=4, block_ids=[7, 3], seed=5,
                 temperature=0.7, top_k=5, top_p=0.9)
    # b: decode of its 10th token (3 outputs so far), 9 cached in blocks 5, 2, 9.
    b = make_seq("b", range(20, 27), [27, 28, 29], num_computed=9, block_ids=[5, 2, 9],
                 seed=2**40 + 3, temperature=0.0)
    # c: a fresh 3-token prompt in block 6.
    c = make_seq("c", [40, 41, 42], num_computed=0, block_ids=[6], seed=11, top_k=-1)
    return ScheduledBatch([ScheduledSequence(a, 2), ScheduledSequence(b, 1), ScheduledSequence(c, 3)],
                          preempted=[])


def test_model_runner_prepare_inputs_layout():
    inputs, sampling, _ = make_runner().prepare_inputs(three_row_batch())
    get = lambda x: np.asarray(x).tolist()                              # noqa: E731
    # The policy of a 16-token, 4-row, 8-block runner: 6 tokens in 3 rows -> (8, 4, 8).
    assert get(inputs.token_ids) == [14, 15, 29, 40, 41, 42, 0, 0]
    assert get(inputs.attention.positions) == [4, 5, 9, 0, 1, 2, 0, 0]
    # slot = block_ids[pos // 4] * 4 + pos % 4; padding tokens write to block 0.
    assert get(inputs.attention.slot_mapping) == [3 * 4 + 0, 3 * 4 + 1, 9 * 4 + 1, 24, 25, 26, 0, 1]
    assert get(inputs.attention.token_rows) == [0, 0, 1, 2, 2, 2, -1, -1]
    # Tables hold the blocks of the cached context only; padding rows are all block 0.
    assert get(inputs.attention.block_tables) == [[7] + [0] * 7, [5, 2, 9] + [0] * 5, [0] * 8, [0] * 8]
    assert get(inputs.attention.context_lens) == [4, 9, 0, 0]
    assert get(inputs.logits_indices) == [1, 2, 5, 0]
    # Rotary cos | sin of each token's angles position x inv_freq, per table, in float32
    # (padding: position 0); inv_freq = theta ** -(0, 2, 4) / 6, the second divided by 4.
    positions = np.float32([4, 5, 9, 0, 1, 2, 0, 0])
    for table, (theta, factor) in enumerate([(100.0, 1.0), (10.0, 4.0)]):
        angles = np.multiply.outer(positions, theta ** -(np.arange(0, 6, 2) / 6) / factor)
        np.testing.assert_allclose(inputs.rotary[table], np.concatenate([np.cos(angles), np.sin(angles)], 1),
                                   rtol=1e-6, atol=1e-6)
    assert inputs.rotary.shape == (2, 8, 6) and inputs.rotary.dtype == np.float32
    assert all(np.asarray(x).dtype == np.int32 for x in (
        inputs.token_ids, inputs.attention.positions, inputs.attention.slot_mapping,
        inputs.attention.token_rows, inputs.attention.block_tables, inputs.attention.context_lens,
        inputs.logits_indices))

    np.testing.assert_allclose(sampling.temperature, [0.7, 0.0, 1.0, 0.0])
    assert get(sampling.top_k) == [5, 0, 0, 0]
    np.testing.assert_allclose(sampling.top_p, [0.9, 1.0, 1.0, 1.0])
    # A 64-bit seed is folded to 32 bits: (s ^ s >> 32) & 0xFFFFFFFF.
    assert get(sampling.seeds) == [5, 3 ^ 2**8, 11, 0]
    assert np.asarray(sampling.seeds).dtype == np.uint32
    assert get(sampling.output_index) == [0, 3, 0, 0]


def one_decode_batch() -> ScheduledBatch:
    d = make_seq("d", [1, 2, 3, 4, 5], [6], num_computed=5, block_ids=[8, 4], seed=1)
    return ScheduledBatch([ScheduledSequence(d, 1)], preempted=[])


def test_model_runner_prepare_inputs_leaves_no_stale_values_from_a_bigger_step():
    runner = make_runner()
    runner.prepare_inputs(three_row_batch())
    inputs, sampling, _ = runner.prepare_inputs(one_decode_batch())
    assert np.asarray(inputs.token_ids).tolist() == [6]
    assert np.asarray(inputs.attention.positions).tolist() == [5]
    assert np.asarray(inputs.attention.slot_mapping).tolist() == [4 * 4 + 1]
    assert np.asarray(inputs.attention.token_rows).tolist() == [0]
    assert np.asarray(inputs.attention.block_tables).tolist() == [[8, 4] + [0] * 6]
    assert np.asarray(inputs.attention.context_lens).tolist() == [5]
    assert np.asarray(inputs.logits_indices).tolist() == [0]
    np.testing.assert_allclose(sampling.temperature, [1.0])
    assert np.asarray(sampling.top_k).tolist() == [0]
    np.testing.assert_allclose(sampling.top_p, [1.0])
    assert np.asarray(sampling.seeds).tolist() == [1]
    assert np.asarray(sampling.output_index).tolist() == [1]


def test_packed_step_buffers_do_not_change_when_the_next_step_is_prepared():
    """The step ships ``pack(prepare_inputs(...))``: those buffers must not alias the host
    arrays the next step refills (on CPU a transfer may share an aligned array's memory, and
    the step may still be running when the next one is prepared)."""
    runner = make_runner()
    buffers, layout = pack(runner.prepare_inputs(three_row_batch()))
    snapshot = [b.copy() for b in buffers]
    runner.prepare_inputs(one_decode_batch())
    for buffer, before in zip(buffers, snapshot):
        np.testing.assert_array_equal(buffer, before)
    # And they hold exactly the prepared arrays.
    runner = make_runner()
    prepared = runner.prepare_inputs(three_row_batch())
    expected = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.copy, prepared))
    got = jax.tree_util.tree_leaves(unpack(buffers, layout))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert np.asarray(a).dtype == b.dtype and np.asarray(a).shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), b)


def test_model_runner_prepare_inputs_fills_the_largest_buckets():
    runner = make_runner()
    seqs = [make_seq(f"s{i}", range(4), num_computed=0, block_ids=[i + 1]) for i in range(4)]
    inputs, sampling, _ = runner.prepare_inputs(
        ScheduledBatch([ScheduledSequence(s, 4) for s in seqs], preempted=[]))
    assert np.asarray(inputs.token_ids).shape == (16,)
    assert np.asarray(inputs.attention.token_rows).tolist() == [r for r in range(4) for _ in range(4)]
    assert np.asarray(inputs.attention.block_tables).shape == (4, 8)
    assert np.asarray(sampling.temperature).shape == (4,)
    assert np.asarray(inputs.logits_indices).tolist() == [3, 7, 11, 15]
