"""Engines over quantized weights: GGUF blocks kept as they are (every family's layout, the real
SmolLM2 Q4_1 against the float32 engine), int8 weight-only, and the options refused."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
from conftest import TINY_ENGINE_OPTIONS, random_prompts
from gguf import GGMLQuantizationType as Q
from hf_compare import save_tiny
from test_gguf_families import FAMILIES, write_family_gguf

from jaxllm import Engine, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.model_source import resolve_model
from jaxllm.models.registry import get_family
from jaxllm.model_files import load_hf_config
from jaxllm.quantization import QuantizedWeight, dequantize, packed_by_default
from jaxllm.quantization.gguf_params import load_gguf_params

NEAR_TIE = 1e-3   # top-2 logprob gap under which float implementations may legitimately differ


def assert_greedy_equal_up_to_near_ties(outputs, reference_outputs, near_tie=NEAR_TIE):
    """Tokens equal until the first position where the reference's top two were within
    ``near_tie``; returns how many tokens were compared."""
    compared = 0
    for out, ref in zip(outputs, reference_outputs):
        got, expected = out.outputs[0].token_ids, ref.outputs[0].token_ids
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                top2 = sorted((lp.logprob for lp in ref.outputs[0].logprobs[i].values()), reverse=True)
                assert top2[0] - top2[1] < near_tie, f"token {i} differs: {got} vs {expected}"
                break
            compared += 1
    return compared


# ---- every family's GGUF layout, packed ----

@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_gguf_params_dequantize_to_the_float_conversion(arch, tmp_path):
    """Packed leaves (q/k permuted rows, fused q|k|v and gate|up, tied or untied head) hold
    exactly the file's blocks: dequantized, they equal the float conversion's params."""
    model_cls, make_config, _, _ = FAMILIES[arch]
    model = save_tiny(tmp_path / "hf", model_cls, make_config())
    path = tmp_path / f"{arch}.gguf"
    write_family_gguf(path, arch, model, Q.Q4_1)
    model_dir = resolve_model(str(path))
    hf_config = load_hf_config(model_dir)
    family = get_family(hf_config.architectures[0])
    config = family.config_from_hf(hf_config)
    floats = family.load_params(model_dir, config)
    packed = load_gguf_params(path, family, hf_config, config, np.float32, scan_layers=True,
                              implementation="reference")
    flat_float = dict(jax.tree_util.tree_leaves_with_path(floats))
    leaves = jax.tree_util.tree_leaves_with_path(packed, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    kinds = set()
    for key, leaf in leaves:
        if isinstance(leaf, QuantizedWeight):
            kinds.add(key[-1].key)
            value = np.asarray(dequantize(leaf))
            value = np.swapaxes(value, -1, -2) if key[-1].key == "kernel" else value
        else:
            value = leaf
        np.testing.assert_array_equal(value, flat_float[key], err_msg=jax.tree_util.keystr(key))
    assert len(leaves) == len(flat_float) and kinds == {"kernel", "embedding"}


TINY_GGUF_OPTIONS = dict(max_model_len=64, num_blocks=24, block_size=8, max_num_seqs=4,
                         max_num_batched_tokens=32)
TINY_PROMPTS = random_prompts([5, 20], seed=1, vocab=200)
LOGPROB_PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def tiny_q8_gguf(tmp_path_factory):
    """(a tiny untied Llama written as Q8_0 GGUF, the float32 engine's outputs on it)."""
    model_cls, make_config, _, _ = FAMILIES["llama"]
    path = tmp_path_factory.mktemp("q8") / "llama.gguf"
    write_family_gguf(path, "llama", save_tiny(path.parent / "hf", model_cls, make_config()), Q.Q8_0)
    with Engine(str(path), quantization=None, **TINY_GGUF_OPTIONS) as engine:
        return path, engine.generate(TINY_PROMPTS, LOGPROB_PARAMS, use_tqdm=False)


def _chosen_logprobs(output) -> list[float]:
    completion = output.outputs[0]
    return [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_engine_on_packed_gguf_equals_float_engine(scan_layers, tiny_q8_gguf):
    """An untied quantized head; unrolled layers and stacked packed leaves under lax.scan."""
    path, expected = tiny_q8_gguf
    with Engine(str(path), quantization="gguf", scan_layers=scan_layers, **TINY_GGUF_OPTIONS) as engine:
        got = engine.generate(TINY_PROMPTS, LOGPROB_PARAMS, use_tqdm=False)
    assert assert_greedy_equal_up_to_near_ties(got, expected) >= 12
    for out, ref in zip(got, expected):
        n = min(len(out.outputs[0].token_ids), len(ref.outputs[0].token_ids))
        np.testing.assert_allclose(_chosen_logprobs(out)[:n], _chosen_logprobs(ref)[:n], atol=1e-4)


# ---- the real SmolLM2 Q4_1 ----

SMOLLM2_OPTIONS = dict(max_num_seqs=4, max_model_len=128, num_blocks=40, max_num_batched_tokens=64)
SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):\n",
                   "Once upon a time, in a small village,"]


@pytest.fixture(scope="session")
def smollm2_engines():
    """(quantization="gguf" engine, float32 engine) over the default SmolLM2 Q4_1 file."""
    with (Engine(quantization="gguf", **SMOLLM2_OPTIONS) as packed,
          Engine(quantization=None, **SMOLLM2_OPTIONS) as dense):
        yield packed, dense


def test_smollm2_gguf_keeps_q4_1_blocks(smollm2_engines):
    packed, dense = smollm2_engines
    assert packed.config.quantization == "gguf" and dense.config.quantization is None
    params = packed.model_runner.params
    qkv = params["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
    assert qkv.qtype == "Q4_1" and qkv.shape == (576 + 2 * 192, 576)
    from jaxllm.kernels import cpu_int_dot_matmul

    assert qkv.implementation == ("cpu_int_dot" if cpu_int_dot_matmul.is_available() else "cpu")
    assert params["embed_tokens"]["embedding"].qtype == "Q8_0"   # the file's, also the tied head
    nbytes = lambda p: sum(x.nbytes for x in jax.tree_util.tree_leaves(p))  # noqa: E731
    assert nbytes(params) < 0.2 * nbytes(dense.model_runner.params)


def test_smollm2_gguf_greedy_equals_float32_engine(smollm2_engines):
    packed, dense = smollm2_engines
    got = packed.generate(SMOLLM2_PROMPTS, LOGPROB_PARAMS, use_tqdm=False)
    expected = dense.generate(SMOLLM2_PROMPTS, LOGPROB_PARAMS, use_tqdm=False)
    assert assert_greedy_equal_up_to_near_ties(got, expected) >= 24


# ---- int8 ----

def test_tiny_int8_engine_close_to_float(tiny, tiny_llama_dir):
    float_engine, _ = tiny
    path, _ = tiny_llama_dir
    prompts = random_prompts([4, 17, 30], seed=5)
    params = LOGPROB_PARAMS
    with Engine(str(path), quantization="int8", **TINY_ENGINE_OPTIONS) as engine:
        weights = engine.model_runner.params["layers_0"]["mlp"]["down_proj"]["kernel"]
        assert weights.qtype == "int8" and weights.data.dtype == np.int8 and weights.shape == (64, 128)
        assert engine.model_runner.params["embed_tokens"]["embedding"].qtype == "int8"
        got = engine.generate(prompts, params, use_tqdm=False)
    expected = float_engine.generate(prompts, params, use_tqdm=False)
    assert assert_greedy_equal_up_to_near_ties(got, expected, near_tie=0.05) >= 12
    for out, ref in zip(got, expected):
        first = out.outputs[0].logprobs[0]
        ref_first = ref.outputs[0].logprobs[0]
        common = set(first) & set(ref_first)
        assert common and all(abs(first[t].logprob - ref_first[t].logprob) < 0.05 for t in common)


# ---- refused ----

def test_quantization_options_refused_at_engine(tiny_llama_dir):
    path, _ = tiny_llama_dir
    with pytest.raises(ValueError, match=r"quantization must be one of .*'fp4'"):
        Engine(str(path), quantization="fp4", **TINY_ENGINE_OPTIONS)
    with pytest.raises(ValueError, match="is not one: use quantization='int8' or None"):
        Engine(str(path), quantization="gguf", **TINY_ENGINE_OPTIONS)
    with pytest.raises(ValueError, match="tensor_parallel_size=1, or quantization=None"):
        EngineConfig(quantization="int8", tensor_parallel_size=2)
    # "auto" packs a .gguf file's blocks where a kernel runs them, one device only.
    model = get_family("LlamaForCausalLM").config_from_hf(load_hf_config(path))
    auto = EngineConfig(num_blocks=8)
    assert auto.resolve(model, "cpu", gguf=True).quantization == ("gguf" if packed_by_default("cpu") else None)
    assert auto.resolve(model, "cpu", gguf=False).quantization is None
    assert EngineConfig(num_blocks=8, tensor_parallel_size=2).resolve(model, "cpu", gguf=True).quantization is None


def test_gguf_package_types_match_the_formats_table():
    from jaxllm.quantization.ggml import GGML_TYPES

    for name, (block, size, _) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[Q[name]] == (block, size)


def test_cli_quantization_flag():
    from jaxllm.cli_options import Parser, add_engine_options, engine_options

    parser = Parser(prog="jaxllm")
    add_engine_options(parser, warmup=False)
    assert engine_options(parser.parse_args([]))["quantization"] == "auto"
    assert engine_options(parser.parse_args(["--quantization", "none"]))["quantization"] is None
    assert engine_options(parser.parse_args(["--quantization", "int8"]))["quantization"] == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "fp4"])
