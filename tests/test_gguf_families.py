"""GGUF round trips for every family: a tiny random transformers model written as llama.cpp
writes that family, converted, compared with the original weights and with transformers' own
GGUF loader, then served by the engine from the file.

The writer below spells out llama.cpp's conventions per family independently of the
converter's maps: tensor names, the Llama q/k row permutation, Gemma's norms stored as 1 + w,
Phi-3's fused q|k|v and gate|up, and the metadata keys (Gemma 3's layer pattern, one global
layer in six, is implied, not written).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_blocks import quantize
from hf_compare import hf_greedy, save_tiny
from test_checkpoints_convert import TOKENS, _llama_cpp_permute, _transformers_gguf_state
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from jaxllm import Engine, SamplingParams
from jaxllm.checkpoints_convert import gguf_to_hf

V = len(TOKENS)
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)
LLAMA_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}

# family: (transformers classes, config, GGUF layer names (GGUF -> HF), extra metadata)
FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(
        **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False), LLAMA_LAYER, {"rope.dimension_count": 16}),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True), LLAMA_LAYER, {}),
    # head_dim 128 (every real Qwen3's): transformers' GGUF loader ignores key_length for qwen3.
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(
        **COMMON, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        tie_word_embeddings=False), {**LLAMA_LAYER, **QK_NORMS},
        {"attention.key_length": 128, "attention.value_length": 128}),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **COMMON, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=8,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        {**LLAMA_LAYER, **QK_NORMS, "ffn_norm": "pre_feedforward_layernorm",
         "post_attention_norm": "post_attention_layernorm",
         "post_ffw_norm": "post_feedforward_layernorm"},
        {"attention.key_length": 32, "attention.value_length": 32, "attention.sliding_window": 8}),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(
        **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        sliding_window=8, partial_rotary_factor=0.5),
        {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj",
         "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
        {"rope.dimension_count": 8, "attention.sliding_window": 8}),
}


def write_family_gguf(path: Path, arch: str, model, qtype: Q) -> None:
    """Writes ``model`` (a transformers model of family ``arch``) as llama.cpp would: matrices
    as ``qtype``, 1-D tensors as F32."""
    _, _, layer_names, extra = FAMILIES[arch]
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    for key, value in {"context_length": c.max_position_embeddings, "block_count": c.num_hidden_layers,
                       "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                       "attention.head_count": c.num_attention_heads,
                       "attention.head_count_kv": c.num_key_value_heads, **extra}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    theta = c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"]
    writer.add_float32(f"{arch}.rope.freq_base", theta)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * 257 + [3, 3])
    writer.add_token_merges(["h e"])
    writer.add_eos_token_id(258)
    writer.add_pad_token_id(0)  # transformers would default Phi-3 to 32000, past this vocabulary

    hf_to_gguf = {hf: g for g, hf in layer_names.items()}
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{hf_to_gguf[module]}.{leaf}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if "q_proj" in module else c.num_key_value_heads
                w = _llama_cpp_permute(w, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0
        qt = qtype if w.ndim == 2 else Q.F32
        writer.add_tensor(gguf_name, quantize(w, qt, rng), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """arch -> (GGUF path, transformers model), written once per module (F32)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model_cls, make_config, _, _ = FAMILIES[arch]
            path = tmp_path_factory.mktemp(f"gguf_{arch}")
            model = save_tiny(path / "hf", model_cls, make_config())
            write_family_gguf(path / f"{arch}.gguf", arch, model, Q.F32)
            cache[arch] = path / f"{arch}.gguf", model
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_gguf_round_trip_equals_original_and_transformers_loader(written, arch, tmp_path):
    gguf_path, model = written(arch)
    out = gguf_to_hf(gguf_path, tmp_path / "hf")

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(converted) is type(model)
    state = {k: v.numpy() for k, v in converted.state_dict().items()}
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(state[name], value.numpy(), rtol=0, atol=1e-6, err_msg=name)
    reference = _transformers_gguf_state(gguf_path)
    for name, value in reference.items():
        np.testing.assert_allclose(state[name], value, rtol=0, atol=1e-6, err_msg=name)
    if arch == "gemma3":  # llama.cpp's implied pattern: one global layer in six, local base 10k
        assert converted.config.layer_types == model.config.layer_types
        assert converted.config.rope_parameters == model.config.rope_parameters


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_engine_serves_family_gguf_like_transformers(written, arch):
    gguf_path, model = written(arch)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, V, n).tolist() for n in (5, 30)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with Engine(str(gguf_path), max_model_len=128, num_blocks=32, block_size=8,
                max_num_seqs=4, max_num_batched_tokens=16) as engine:
        outputs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, 16)


def test_gemma3_gguf_q8_0_equals_transformers_loader(written, tmp_path):
    """Quantized matrices beside F32 norms stored as 1 + w."""
    _, model = written("gemma3")
    write_family_gguf(tmp_path / "q8.gguf", "gemma3", model, Q.Q8_0)
    out = gguf_to_hf(tmp_path / "q8.gguf", tmp_path / "hf")
    state = {k: v.numpy() for k, v in AutoModelForCausalLM.from_pretrained(out).state_dict().items()}
    for name, value in _transformers_gguf_state(tmp_path / "q8.gguf").items():
        np.testing.assert_allclose(state[name], value, rtol=0, atol=1e-6, err_msg=name)
