"""IncrementalDetokenizer with fake tokenizers: byte-level pieces and SentencePiece-like words."""

from __future__ import annotations

from jaxllm.detokenizer import IncrementalDetokenizer

BYTES = [b"<s>", b"ab", b"\xe4\xb8", b"\x96", b"\xf0\x9f", b"\x98\x80", b"c"]


class BytePieces:
    """Token i is BYTES[i]; a multi-byte character may span tokens (byte-level BPE); 0 is special."""

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(BYTES[i] for i in ids if not (skip_special_tokens and i == 0))
        return data.decode("utf-8", errors="replace")


WORDS = ["<s>", "\u2581Hello", "\u2581world", "!", "\u2581again"]


class SentencePieceLike:
    """Token i is WORDS[i] with U+2581 for a space; decoding drops the text's leading space."""

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(WORDS[i] for i in ids if not (skip_special_tokens and i == 0)).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


def _deltas(detokenizer, ids):
    return [detokenizer.add(i) for i in ids]


def test_a_character_split_over_tokens_comes_out_whole_once_complete():
    detokenizer = IncrementalDetokenizer(BytePieces(), [1], skip_special_tokens=True)
    assert _deltas(detokenizer, [1, 2, 3, 4, 5, 6]) == ["ab", "", "\u4e16", "", "\U0001f600", "c"]


def test_flush_emits_what_is_held_back_even_if_incomplete():
    detokenizer = IncrementalDetokenizer(BytePieces(), [], skip_special_tokens=True)
    assert _deltas(detokenizer, [6, 2]) == ["c", ""]
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.flush() == ""


def test_prompt_context_keeps_the_first_output_tokens_leading_space():
    detokenizer = IncrementalDetokenizer(SentencePieceLike(), [0, 1], skip_special_tokens=True)
    assert "".join(_deltas(detokenizer, [2, 3, 4])) == " world! again"
    # Without the prompt, the first token starts the text and its space is dropped.
    alone = IncrementalDetokenizer(SentencePieceLike(), [], skip_special_tokens=True)
    assert "".join(_deltas(alone, [2, 3])) == "world!"


def test_special_tokens_are_shown_only_when_not_skipped():
    shown = IncrementalDetokenizer(BytePieces(), [6], skip_special_tokens=False)
    skipped = IncrementalDetokenizer(BytePieces(), [6], skip_special_tokens=True)
    assert "".join(_deltas(shown, [0, 6])) == "<s>c"
    assert "".join(_deltas(skipped, [0, 6])) == "c"


def test_long_outputs_decode_a_small_window_per_token():
    calls = []

    class Counting(BytePieces):
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    detokenizer = IncrementalDetokenizer(Counting(), list(range(1, 7)) * 10, skip_special_tokens=True)
    text = "".join(_deltas(detokenizer, [1, 6] * 200))
    assert text == "abc" * 200
    assert max(calls) <= 6
