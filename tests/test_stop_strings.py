"""Stop strings in the OutputProcessor, with a fake byte-level tokenizer of multi-character pieces.

``_generate`` runs the real host path token by token: the scheduler schedules and advances the
sequence, the Postprocessor takes the scripted token and decides whether it stops (EOS, stop
token ids, stop strings, max_tokens), then the OutputProcessor makes the output (the executor
sends outputs one step later, which changes nothing here).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.executor import Executor
from jaxllm.groups import new_sequence
from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.output_processor import OutputProcessor
from jaxllm.postprocess import Postprocessor
from jaxllm.row_results import RowResults
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scheduler import Scheduler
from jaxllm.sequence import Request

from conftest import FakeModelRunner

EOS = 0
PIECES = [b"</s>", b"<p>", b"a", b"bc", b"d", b"ef", b"Hel", b"lo", b" wor", b"ld", b"!", b"Hi. there",
          b"xa", b"b", b"ST", b"OP", b"x", b"caf\xc3", b"\xa9!", b"\xe4\xb8", b"\x96\xe7",
          b"\x95\x8c", b"bcdef", b"Z"]
SPECIAL = {0, 1}
ID = {piece.decode("latin-1"): i for i, piece in enumerate(PIECES)}


class PieceTokenizer:
    """Token i decodes to PIECES[i]; a multi-byte character may span tokens (byte-level BPE)."""

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(PIECES[i] for i in ids if not (skip_special_tokens and i in SPECIAL))
        return data.decode("utf-8", errors="replace")


def _ids(*pieces: str) -> list[int]:
    return [ID[p] for p in pieces]


def _generate(token_ids, kind=RequestOutputKind.CUMULATIVE, **params):
    """Runs token_ids through the scheduler, Postprocessor and OutputProcessor; returns every output."""
    params = SamplingParams(temperature=0, **{"max_tokens": len(token_ids), **params})
    request = Request("r", None, (1,), params, 0, frozenset({EOS}), 0.0)
    processor = OutputProcessor(PieceTokenizer())
    processor.add(request, kind)
    scheduler = Scheduler(KVCacheManager(16, 4, enable_prefix_caching=False), 1, 16)
    postprocessor = Postprocessor(scheduler, processor, max_model_len=64)
    seq = new_sequence(request)
    scheduler.add(seq)
    outputs = []
    for token_id in token_ids:
        batch = scheduler.schedule()
        scheduler.advance(batch)
        postprocessor.process(batch, RowResults([token_id], [-0.25], {}, {}))
        output = processor.make_output([seq], seq.is_finished)
        if output is not None:
            outputs.append(output)
        if seq.is_finished:
            break
    assert outputs[-1].finished and processor.make_output([seq], seq.is_finished) is None
    assert not scheduler.has_unfinished and scheduler.kv_cache_manager.num_used_blocks == 0
    return outputs


def _final(token_ids, **params):
    return _generate(token_ids, **params)[-1].outputs[0]


def test_stop_string_spanning_two_tokens():
    out = _final(_ids("Hel", "lo", " wor", "ld", "!"), stop="lo w")
    assert (out.text, out.finish_reason, out.stop_reason) == ("Hel", "stop", "lo w")
    assert out.token_ids == _ids("Hel", "lo", " wor")


def test_stop_string_spanning_three_tokens():
    out = _final(_ids("a", "bc", "d", "ef", "a"), stop=["cde"])
    assert (out.text, out.stop_reason) == ("ab", "cde")
    assert out.token_ids == _ids("a", "bc", "d", "ef")


def test_include_stop_str_in_output_keeps_it_and_cuts_what_follows():
    out = _final(_ids("a", "bc", "d", "ef"), stop="cd", include_stop_str_in_output=True)
    assert (out.text, out.stop_reason, out.token_ids) == ("abcd", "cd", _ids("a", "bc", "d"))


@pytest.mark.parametrize("stop", [["ef", "cd"], ["cd", "ef"], ["bcd", "bc"], ["f", "de", "cdef"]])
def test_several_stop_strings_earliest_wins(stop):
    out = _final(_ids("a", "bcdef", "a"), stop=stop)
    expected = min(stop, key=lambda s: ("abcdef".index(s), len(s)))
    assert (out.text, out.stop_reason) == ("abcdef"[:"abcdef".index(expected)], expected)
    assert out.token_ids == _ids("a", "bcdef")


def test_stop_string_inside_the_first_token():
    out = _final(_ids("Hi. there", "a"), stop=".")
    assert (out.text, out.stop_reason, out.token_ids) == ("Hi", ".", _ids("Hi. there"))


def test_no_stop_string_runs_to_length_with_all_text():
    out = _final(_ids("Hel", "lo", " wor"), stop=["low", "xyz"])
    assert (out.text, out.finish_reason, out.stop_reason) == ("Hello wor", "length", None)


def test_stop_string_completed_by_the_last_allowed_token_wins_over_length():
    out = _final(_ids("Hel", "lo"), stop="llo", max_tokens=2)
    assert (out.text, out.finish_reason, out.stop_reason) == ("He", "stop", "llo")


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_streamed_text_never_shows_a_stop_string_prefix_it_withdraws(kind):
    # "ST" looks like the start of "STOP" twice: once it is withdrawn, once it is released.
    tokens = _ids("x", "ST", "x", "ST", "OP", "x")
    outputs = _generate(tokens, kind, stop=["STOP", "zz"])
    texts = [o.outputs[0].text for o in outputs]
    final = "xSTx"
    assert outputs[-1].outputs[0].stop_reason == "STOP"
    if kind is RequestOutputKind.DELTA:
        assert "".join(texts) == final
        assert [t for o in outputs for t in o.outputs[0].token_ids] == tokens[:5]
    else:
        assert texts[-1] == final and all(final.startswith(t) for t in texts)
        # Running outputs hold back len("STOP") - 1 = 3 characters.
        assert texts[:-1] == ["", "", "x", "xST"]


def test_held_back_text_is_released_when_the_request_finishes_otherwise():
    outputs = _generate(_ids("a", "bc", "ST"), RequestOutputKind.DELTA, stop="STOP")
    assert [o.outputs[0].text for o in outputs] == ["", "", "abcST"]
    assert outputs[-1].outputs[0].finish_reason == "length"


def test_include_stop_str_in_output_holds_nothing_back():
    outputs = _generate(_ids("a", "ST", "OP", "x"), stop="STOP", include_stop_str_in_output=True)
    assert [o.outputs[0].text for o in outputs] == ["a", "aST", "aSTOP"]


def test_min_tokens_delays_stop_matching():
    tokens = _ids("a", "b", "a", "b", "x")
    assert _final(tokens, stop="ab", min_tokens=1).token_ids == tokens[:2]
    out = _final(tokens, stop="ab", min_tokens=2)
    assert (out.text, out.token_ids) == ("ab", tokens[:4])
    # A match that starts within the first min_tokens tokens but ends after them counts.
    out = _final(_ids("xa", "b", "x"), stop="ab", min_tokens=1)
    assert (out.text, out.token_ids) == ("x", _ids("xa", "b"))


def test_multi_byte_stop_strings():
    out = _final(_ids("caf\xc3", "\xa9!", "x"), stop="é")
    assert (out.text, out.token_ids) == ("caf", _ids("caf\xc3", "\xa9!"))
    # "世界" is e4 b8 96 e7 95 8c: both characters span tokens.
    tokens = _ids("x", "\xe4\xb8", "\x96\xe7", "\x95\x8c", "x")
    outputs = _generate(tokens, RequestOutputKind.DELTA, stop=["界", "y世界"])
    assert "".join(o.outputs[0].text for o in outputs) == "x世"
    assert outputs[-1].outputs[0].stop_reason == "界"
    assert not any("\ufffd" in o.outputs[0].text for o in outputs)


def test_stop_token_text_is_hidden_unless_asked():
    tokens = _ids("a", "Z", "x")
    out = _final(tokens, stop_token_ids=[ID["Z"]])
    assert (out.text, out.token_ids, out.stop_reason) == ("a", tokens[:2], ID["Z"])
    out = _final(tokens, stop_token_ids=[ID["Z"]], include_stop_str_in_output=True)
    assert out.text == "aZ"


def test_final_only_checks_stop_strings_every_step():
    outputs = _generate(_ids("Hel", "lo", " wor", "ld"), RequestOutputKind.FINAL_ONLY, stop="o w")
    assert len(outputs) == 1
    assert (outputs[0].outputs[0].text, len(outputs[0].outputs[0].token_ids)) == ("Hell", 3)


def test_cumulative_logprob_counts_each_kept_token_once():
    outputs = _generate(_ids("a", "bc", "d", "ef", "a"), stop="de")
    assert [o.outputs[0].cumulative_logprob for o in outputs] == [-0.25, -0.5, -0.75, -1.0]


def _reference(token_ids, stop):
    """Decodes every prefix from scratch; the first that contains a stop string ends it."""
    tokenizer = PieceTokenizer()
    for k in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:k])
        found = [(text.index(s), s) for s in stop if s in text]
        if found:
            return text[:min(found)[0]], token_ids[:k]
    return tokenizer.decode(token_ids), token_ids


@pytest.mark.parametrize("seed", range(40))
def test_stop_strings_match_a_from_scratch_reference(seed):
    rng = np.random.default_rng(seed)
    # Not the pieces that end a character and start the next one: the detokenizer (as vLLM's)
    # holds a token's text back until its last character is complete, so a stop string in
    # such a token is found one token later than in a from-scratch decode.
    pool = [i for i in range(2, len(PIECES)) if PIECES[i] not in (b"caf\xc3", b"\x96\xe7")]
    token_ids = [int(t) for t in rng.choice(pool, 12)]
    text = PieceTokenizer().decode(token_ids)
    stop = []
    for _ in range(int(rng.integers(1, 4))):
        start = int(rng.integers(0, len(text)))
        piece = text[start:start + int(rng.integers(1, 5))].replace("\ufffd", "")
        stop.append(piece or "zz")
    outputs = _generate(token_ids, RequestOutputKind.DELTA, stop=stop)
    expected_text, expected_tokens = _reference(token_ids, stop)
    assert "".join(o.outputs[0].text for o in outputs) == expected_text
    assert [t for o in outputs for t in o.outputs[0].token_ids] == expected_tokens


class ScriptedRunner(FakeModelRunner):
    """Stands in for ModelRunner: each request's n-th output token is SCRIPTS[request id][n]."""

    def __init__(self, scripts):
        self.scripts = scripts

    def dispatch(self, batch, inputs):
        # The output index of the token each row samples counts the pending ones before it.
        return [self.scripts[item.seq.request_id][item.seq.num_output_tokens + item.seq.num_pending_tokens]
                for item in batch.scheduled]


def test_executor_finishes_on_a_stop_string_and_frees_its_blocks():
    scripts = {"stop": _ids("Hel", "lo", " wor", "ld", "!", "x"),
               "delta": _ids("x", "ST", "x", "ST", "OP", "x"),
               "length": _ids("a", "bc", "d")}
    scheduler = Scheduler(KVCacheManager(16, 4, enable_prefix_caching=False), 4, 16)
    executor = Executor(scheduler, ScriptedRunner(scripts), OutputProcessor(PieceTokenizer()),
                        max_model_len=64)

    def request(request_id, **params):
        params = SamplingParams(temperature=0, **{"max_tokens": 6, **params})
        return Request(request_id, None, (1, 2, 3), params, 0, frozenset({EOS}), 0.0)

    try:
        stop = executor.submit(request("stop", stop=["lo w"]))
        delta = executor.submit(request("delta", stop="STOP"), RequestOutputKind.DELTA)
        length = executor.submit(request("length", stop="zz", max_tokens=3), RequestOutputKind.CUMULATIVE)
        deltas, final = list(delta), stop.result()
        cumulative = list(length)
        free = scheduler.kv_cache_manager.num_free_blocks
    finally:
        executor.shutdown()
    out = final.outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("Hel", "stop", "lo w")
    assert out.token_ids == scripts["stop"][:3]
    assert "".join(o.outputs[0].text for o in deltas) == "xSTx"
    assert [t for o in deltas for t in o.outputs[0].token_ids] == scripts["delta"][:5]
    assert deltas[-1].outputs[0].stop_reason == "STOP"
    assert [o.outputs[0].text for o in cumulative] == ["", "ab", "abcd"]
    assert free == 15
