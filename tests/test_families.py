"""Every family against transformers on tiny random float32 models, through the paged engine.

Each config exercises what makes its family different: odd head counts and GQA, sliding windows
shorter than the prompts (8 tokens, prompts of 17 and 45 with a 32-token prefill budget, so
windows cut through cached context and prefill chunks alike), global layers among local ones,
q/k norms, biases on q/k/v only, fused checkpoint tensors, partial rotary, two RoPE tables,
Gemma's (1 + w) norms, scaled embeddings, query_pre_attn_scalar and soft-capped logits.

Per family: every step's logits within 1e-4 of transformers' (unrolled layers, the CPU default;
scanned too where per-layer windows and rotary tables become traced values), and 32 greedy
tokens equal ``generate``'s through ``Engine.generate`` (the CPU attention kernel).
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_compare import hf_greedy, logits_match, save_tiny
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from jaxllm import Engine, SamplingParams

WINDOW = 8
COMMON = dict(vocab_size=256, intermediate_size=96, max_position_embeddings=256,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)

FAMILIES = {
    "mistral": (MistralForCausalLM, lambda: MistralConfig(
        **COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=WINDOW)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **COMMON, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(
        **COMMON, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        head_dim=32, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **COMMON, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
        head_dim=32, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=5.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(
        **COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=WINDOW, partial_rotary_factor=0.5)),
}
SCANNED = ("gemma3", "qwen2")
ENGINE_OPTIONS = dict(max_model_len=128, num_blocks=64, block_size=8, max_num_seqs=8,
                      max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (path, transformers model), saved once per module."""
    saved = {}

    def get(name: str):
        if name not in saved:
            model_cls, make_config = FAMILIES[name]
            path = tmp_path_factory.mktemp(name)
            saved[name] = path, save_tiny(path, model_cls, make_config())
        return saved[name]

    return get


@pytest.fixture(scope="module")
def engine_of(tiny):
    """name -> an engine (ENGINE_OPTIONS) over that family's tiny model, built once per module:
    the config, logits and greedy tests of a family share it (the logits check drives
    ``engine.model`` on a cache of its own, so it leaves the engine as it found it)."""
    engines = {}

    def get(name: str):
        if name not in engines:
            engines[name] = Engine(str(tiny(name)[0]), **ENGINE_OPTIONS)
        return engines[name]

    yield get
    for engine in engines.values():
        engine.shutdown()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_config_is_read_explicitly(engine_of, name):
    engine = engine_of(name)
    c = engine.model_config
    expected_windows = {"mistral": (8, 8), "qwen2": (0, 8, 8), "qwen3": (0, 0),
                        "gemma3": (8, 0, 8), "phi3": (8, 8)}[name]
    assert c.layer_windows == expected_windows
    assert engine.config.max_model_len == 128          # a window never caps the context
    if name == "gemma3":
        assert (c.norm_offset, c.qk_norm, c.sandwich_norms, c.hidden_act) == (1.0, True, True, "gelu_pytorch_tanh")
        assert c.layer_rope == (1, 0, 1) and [r.theta for r in c.rope] == [1e6, 1e4]
        assert c.softmax_scale == 24 ** -0.5 and c.embedding_scale == 48 ** 0.5
    if name == "phi3":
        assert c.rotary_dim == 8                         # half of head_dim 16
    if name == "qwen2":
        assert (c.qkv_bias, c.o_bias) == (True, False)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_logits_match_hf_at_every_step(tiny, engine_of, name):
    assert logits_match(engine_of(name), tiny(name)[1], (3, 17, 45), num_decodes=10) == 3 * 10


@pytest.mark.parametrize("name", SCANNED)
def test_scanned_layers_with_per_layer_windows_match_hf(tiny, name):
    """Under one lax.scan the window and rotary table of each layer are traced values; with
    the pure-JAX reference attention, as on platforms without a kernel."""
    path, hf_model = tiny(name)
    with Engine(str(path), scan_layers=True, attention="reference", **ENGINE_OPTIONS) as engine:
        assert logits_match(engine, hf_model, (3, 17, 45), num_decodes=10) == 3 * 10


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_engine_greedy_32_tokens_match_hf_generate(tiny, engine_of, name):
    hf_model = tiny(name)[1]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (1, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = engine_of(name).generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 32)
