"""ModelRunner.prepare_inputs without a model: buckets, padding layout, slots, sampling rows."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxllm.model_runner import ModelRunner
from jaxllm.models.rope import RopeSpec, RotaryTables
from jaxllm.packing import pack, unpack
from jaxllm.sampling_params import SamplingParams
from jaxllm.sampling_rows import ROW_FIELDS, SamplingLimits, check_sampling_limits
from jaxllm.scheduler import ScheduledBatch, ScheduledSequence
from jaxllm.sequence import Request, Sequence
from jaxllm.step_layout import ARRAY_FIELDS

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
    prepared = make_runner().prepare_inputs(three_row_batch())
    inputs, sampling = prepared.inputs, prepared.sampling
    get = lambda x: np.asarray(x).tolist()                              # noqa: E731
    # The policy of a 16-token, 4-row, 8-block runner: 6 tokens in 3 rows -> (8, 4, 8).
    assert get(inputs.token_ids) == [14, 15, 29, 40, 41, 42, 0, 0]
    assert get(inputs.attention.positions) == [4, 5, 9, 0, 1, 2, 0, 0]
    # slot = block_ids[pos // 4] * 4 + pos % 4; padding token i writes to slot i % 4 of block 0.
    assert get(inputs.attention.slot_mapping) == [3 * 4 + 0, 3 * 4 + 1, 9 * 4 + 1, 24, 25, 26, 2, 3]
    assert get(inputs.attention.token_rows) == [0, 0, 1, 2, 2, 2, -1, -1]
    # Tables hold the blocks of the cached context only; padding rows are all block 0.
    assert get(inputs.attention.block_tables) == [[7] + [0] * 7, [5, 2, 9] + [0] * 5, [0] * 8, [0] * 8]
    assert get(inputs.attention.context_lens) == [4, 9, 0, 0]
    assert get(inputs.logits_indices) == [1, 2, 5, 0]
    # Rotary cos | sin of each token's angles position x inv_freq, per table, in float32
    # (padding: zeros); inv_freq = theta ** -(0, 2, 4) / 6, the second divided by 4.
    positions = np.float32([4, 5, 9, 0, 1, 2])
    for table, (theta, factor) in enumerate([(100.0, 1.0), (10.0, 4.0)]):
        angles = np.multiply.outer(positions, theta ** -(np.arange(0, 6, 2) / 6) / factor)
        np.testing.assert_allclose(inputs.rotary[table, :6], np.concatenate([np.cos(angles), np.sin(angles)], 1),
                                   rtol=1e-6, atol=1e-6)
        assert not inputs.rotary[table, 6:].any()
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
    prepared = runner.prepare_inputs(one_decode_batch())
    inputs, sampling = prepared.inputs, prepared.sampling
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
    prepared = runner.prepare_inputs(three_row_batch())
    layout = runner.layout.packed(prepared.key)
    buffers = pack(prepared.arrays, layout)
    snapshot = [b.copy() for b in buffers]
    runner.prepare_inputs(one_decode_batch())
    for buffer, before in zip(buffers, snapshot):
        np.testing.assert_array_equal(buffer, before)
    # And they hold exactly the prepared arrays.
    runner = make_runner()
    prepared = runner.prepare_inputs(three_row_batch())
    expected = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.copy, prepared.arrays))
    got = jax.tree_util.tree_leaves(unpack(buffers, layout))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert np.asarray(a).dtype == b.dtype and np.asarray(a).shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), b)


def test_model_runner_prepare_inputs_fills_the_largest_buckets():
    runner = make_runner()
    seqs = [make_seq(f"s{i}", range(4), num_computed=0, block_ids=[i + 1]) for i in range(4)]
    prepared = runner.prepare_inputs(ScheduledBatch([ScheduledSequence(s, 4) for s in seqs], preempted=[]))
    inputs, sampling = prepared.inputs, prepared.sampling
    assert np.asarray(inputs.token_ids).shape == (16,)
    assert np.asarray(inputs.attention.token_rows).tolist() == [r for r in range(4) for _ in range(4)]
    assert np.asarray(inputs.attention.block_tables).shape == (4, 8)
    assert np.asarray(sampling.temperature).shape == (4,)
    assert np.asarray(inputs.logits_indices).tolist() == [3, 7, 11, 15]


def test_prepared_padding_is_the_layouts_padding():
    """prepare_inputs and warm-up pad from one table: every array past the real tokens, rows
    and copies holds what StepLayout.padding holds."""
    prepared = make_runner().prepare_inputs(three_row_batch())
    arrays, padding = flat_arrays(prepared.arrays), flat_arrays(make_runner().layout.padding(prepared.key))
    assert arrays.keys() == padding.keys() == ARRAY_FIELDS.keys()
    real = {"T": 6, "S": 3, "C": 0}
    for name, field in ARRAY_FIELDS.items():
        axis = next((i for i, d in enumerate(field.dims) if d in real), None)
        if axis is not None:
            tail = (slice(None),) * axis + (slice(real[field.dims[axis]], None),)
            np.testing.assert_array_equal(arrays[name][tail], padding[name][tail], err_msg=name)


def flat_arrays(step_arrays) -> dict[str, np.ndarray]:
    """StepArrays as {ARRAY_FIELDS name: array}."""
    attention = step_arrays.inputs.attention
    named = {"token_ids": step_arrays.inputs.token_ids, "logits_indices": step_arrays.inputs.logits_indices,
             "rotary": step_arrays.inputs.rotary, "feedback_rows": step_arrays.feedback_rows,
             "prompt_next_ids": step_arrays.prompt_next_ids, "block_copies": step_arrays.block_copies,
             "draft_token_ids": step_arrays.draft_token_ids,
             "lora_slots": step_arrays.lora_slots,
             **{f.name: getattr(attention, f.name) for f in dataclasses.fields(attention)},
             **{name: getattr(step_arrays.sampling, name) for name in ROW_FIELDS}}
    return {name: np.asarray(value) for name, value in named.items()}


def test_sampling_rows_carry_token_lists_min_tokens_and_penalty_slots():
    eos = frozenset({2, 9})
    a = make_seq("a", [1, 2, 3], num_computed=0, block_ids=[1], logit_bias={5: 1.5, 7: -2.0},
                 min_tokens=3, stop_token_ids=[11], repetition_penalty=1.2)
    b = make_seq("b", [4, 5], [6], num_computed=2, block_ids=[2], allowed_token_ids=[3, 8, 12],
                 min_tokens=1, ignore_eos=True, logprobs=2)
    a.request = dataclasses.replace(a.request, eos_token_ids=eos)
    runner = make_runner()
    prepared = runner.prepare_inputs(ScheduledBatch([ScheduledSequence(a, 3), ScheduledSequence(b, 1)], []))
    s = prepared.sampling
    limits = SamplingLimits()
    assert s.bias_ids.shape == s.bias_values.shape == (4, limits.max_logit_bias)
    assert s.bias_ids[0, :3].tolist() == [5, 7, -1] and s.bias_values[0, :2].tolist() == [1.5, -2.0]
    assert (s.bias_ids[1:] == -1).all()
    assert s.allowed_ids.shape == (4, limits.max_allowed_token_ids)
    assert s.allowed_ids[1, :4].tolist() == [3, 8, 12, -1] and (s.allowed_ids[[0, 2, 3]] == -1).all()
    # min_tokens bans the stop ids and the EOS ids (unless ignore_eos) until reached.
    assert s.min_tokens.tolist() == [3, 1, 0, 0]
    assert s.min_tokens_stop_ids[0, :4].tolist() == [11, 2, 9, -1]
    assert s.min_tokens_stop_ids[1, 0] == -1                 # ignore_eos and no stop ids
    assert s.num_logprobs.tolist() == [-1, 2, -1, -1]
    assert s.samples.tolist() == [True, True, False, False]
    # Only the row with penalties gets a slot, seeded once with its tokens (prompt first).
    assert s.penalty_slots.tolist()[1:] == [-1, -1, -1] and s.penalty_slots[0] >= 0
    [(slot, tokens, num_prompt)] = prepared.penalty_seeds
    assert slot == s.penalty_slots[0] and num_prompt == 3
    assert tokens[:4].tolist() == [1, 2, 3, -1] and tokens.shape == (128,)


def test_penalty_slots_are_seeded_once_and_survive_the_step_in_flight():
    runner = make_runner()     # 4 rows: 8 slots
    seqs = [make_seq(f"p{i}", [i, i + 1], num_computed=1, block_ids=[i + 1], presence_penalty=0.5)
            for i in range(12)]

    def step(rows, previous=None):
        batch = ScheduledBatch([ScheduledSequence(s, 1) for s in rows], [])
        return batch, runner.prepare_inputs(batch, previous)

    first, prepared = step(seqs[:4])
    slots = prepared.sampling.penalty_slots.tolist()
    assert len(prepared.penalty_seeds) == 4 and len(set(slots)) == 4
    again, prepared = step(seqs[:4], first)
    assert prepared.penalty_seeds == [] and prepared.sampling.penalty_slots.tolist() == slots
    # 8 slots: the next 4 sequences take the free ones; 4 more must evict, but never the
    # slots of the step in flight (seqs 4..7) or of the step being prepared.
    second, prepared = step(seqs[4:8], again)
    in_flight = prepared.sampling.penalty_slots.tolist()
    assert not set(in_flight) & set(slots)
    _, prepared = step(seqs[8:12], second)
    assert sorted(prepared.sampling.penalty_slots.tolist()) == sorted(slots)
    assert len(prepared.penalty_seeds) == 4


def test_block_copies_ride_in_fixed_width_rows():
    runner = make_runner()
    batch = one_decode_batch()
    batch.block_copies = [(4, 7), (5, 6)]
    copies = runner.prepare_inputs(batch).arrays.block_copies
    assert copies.tolist() == [[4, 7], [5, 6], [0, 0], [0, 0]]     # 4 = max_num_seqs
    batch.block_copies = [(i, i + 10) for i in range(1, 6)]
    with pytest.raises(RuntimeError, match="5 copy-on-write block copies"):
        runner.prepare_inputs(batch)


def test_prompt_next_ids_score_the_prompt_tokens_a_row_computes():
    seq = make_seq("q", [10, 11, 12, 13, 14], num_computed=1, block_ids=[1, 2], prompt_logprobs=1)
    plain = make_seq("r", [20, 21], num_computed=0, block_ids=[3])
    runner = make_runner()
    batch = ScheduledBatch([ScheduledSequence(seq, 4), ScheduledSequence(plain, 2)], [])
    # Positions 1..4: the next prompt tokens of 1, 2, 3 (4 is the last prompt token).
    assert runner.prepare_inputs(batch).arrays.prompt_next_ids.tolist() == [12, 13, 14, -1, -1, -1, -1, -1]


def test_check_sampling_limits_refuses_over_wide_requests():
    limits = SamplingLimits(max_logit_bias=2, max_allowed_token_ids=3, max_min_tokens_stop_ids=2)
    check_sampling_limits(SamplingParams(logit_bias={1: 1.0, 2: 1.0}, allowed_token_ids=[1, 2, 3],
                                         min_tokens=1, stop_token_ids=[5]), limits, frozenset({7}))
    check_sampling_limits(SamplingParams(stop_token_ids=[1, 2, 3]), limits, frozenset({7}))  # min_tokens 0
    for params, message in ((SamplingParams(logit_bias={1: 1.0, 2: 1.0, 3: 1.0}), "logit_bias has 3"),
                            (SamplingParams(allowed_token_ids=[1, 2, 3, 4]), "max_allowed_token_ids"),
                            (SamplingParams(min_tokens=2, stop_token_ids=[5, 6]), "min_tokens")):
        with pytest.raises(ValueError, match=message):
            check_sampling_limits(params, limits, frozenset({7}))
    with pytest.raises(ValueError, match="at least 1"):
        SamplingLimits(max_logit_bias=0)
