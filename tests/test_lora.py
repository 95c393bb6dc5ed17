"""LoRA serving against peft's PeftModel on the same random adapters (tiny models of each
family), adapters mixed in one batch, slot reuse without recompiling, prefix-cache keys, and
the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_ENGINE_OPTIONS, random_prompts
from hf_compare import save_tiny
from peft_adapters import save_random_adapter
from test_families import FAMILIES

from jaxllm import Engine, LoRARequest, SamplingParams

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
OPTIONS = dict(max_model_len=64, num_blocks=64, block_size=8, max_num_seqs=4,
               max_num_batched_tokens=32, max_logprobs=2)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Argmax decoding by full forwards: transformers' cached ``generate`` under peft was seen
    to differ from its own full forward by ~1e-2 in a logit on these near-flat tiny models."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(num_tokens):
            tokens.append(int(model(torch.tensor([prompt + tokens])).logits[0, -1].argmax()))
    return tokens


def _peft_logprobs(peft_model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    logprobs = torch.log_softmax(logits.double(), -1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].numpy()


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3", "gemma3", "gemma3-scanned"])
def test_lora_family_greedy_and_logprobs_match_peft(tmp_path, tiny_llama_dir, name):
    """Per family (Llama: the mixed-batch test below); "-scanned": under one lax.scan (the slab
    sliced per layer like the params)."""
    name, scanned = name.removesuffix("-scanned"), name.endswith("-scanned")
    options = dict(scan_layers=True, attention="reference") if scanned else {}
    if name == "llama":
        path, model = tiny_llama_dir
    else:
        model_cls, make_config = FAMILIES[name]
        path = tmp_path / name
        model = save_tiny(path, model_cls, make_config())
    targets = PHI3_TARGETS if name == "phi3" else ALL_TARGETS
    peft_model = save_random_adapter(model, tmp_path / "adapter", targets, rank=4, alpha=8,
                                     seed=1, use_rslora=name == "qwen3")
    prompts = random_prompts((5, 19), seed=4)
    lora = LoRARequest("a", 1, str(tmp_path / "adapter"))
    with Engine(str(path), enable_lora=True, max_lora_rank=8, **OPTIONS, **options) as engine:
        outs = engine.generate(prompts, GREEDY, lora_request=lora, use_tqdm=False)
    changed = False
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(peft_model, prompt, 8)
        got = [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(tokens)]
        np.testing.assert_allclose(got, _peft_logprobs(peft_model, prompt, tokens), atol=2e-4)
        with peft_model.disable_adapter():
            changed |= tokens != hf_greedy(peft_model, prompt, 8)
    assert changed, "the adapter should change the greedy continuation"


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    """Two adapters of the tiny Llama (different targets and ranks) and their PeftModels."""
    _, model = tiny_llama_dir
    root = tmp_path_factory.mktemp("adapters")
    a = save_random_adapter(model, root / "a", ["q_proj", "v_proj", "down_proj"], rank=4, seed=1)
    b = save_random_adapter(model, root / "b", ALL_TARGETS, rank=8, alpha=16, seed=2, use_rslora=True)
    return {"a": (LoRARequest("a", 1, str(root / "a")), a),
            "b": (LoRARequest("b", 2, str(root / "b")), b)}


@pytest.fixture(scope="module")
def lora_engine(tiny_llama_dir):
    """The tiny Llama with two LoRA slots (a third adapter must wait for one)."""
    with Engine(str(tiny_llama_dir[0]), enable_lora=True, max_loras=2, max_lora_rank=8,
                **TINY_ENGINE_OPTIONS) as engine:
        yield engine


def test_lora_batch_of_base_and_two_adapters_equals_separate_runs(lora_engine, adapters, tiny_llama_dir):
    prompts = random_prompts((7, 20, 13), seed=5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    (ra, peft_a), (rb, peft_b) = adapters["a"], adapters["b"]
    mixed = lora_engine.generate(prompts * 2, params, lora_request=[None, ra, rb, rb, None, ra],
                                 use_tqdm=False)
    compiled = lora_engine.stats()["num_compilations"]
    # Other adapters on the same rows (other slot contents, another mix): the same steps.
    lora_engine.generate(prompts * 2, params, lora_request=[rb, None, ra, None, ra, rb], use_tqdm=False)
    assert lora_engine.stats()["num_compilations"] == compiled
    alone = [lora_engine.generate(p, params, lora_request=r, use_tqdm=False)
             for p, r in zip(prompts * 2, [None, ra, rb, rb, None, ra])]
    assert [o.outputs[0].token_ids for o in mixed] == [o.outputs[0].token_ids for o in alone]
    expected = [hf_greedy(m, p, 12) for m, p in zip(
        [tiny_llama_dir[1], peft_a, peft_b, peft_b, tiny_llama_dir[1], peft_a], prompts * 2)]
    assert [o.outputs[0].token_ids for o in mixed] == expected
    for out, m, p in zip(mixed[1:3], (peft_a, peft_b), prompts[1:3]):
        tokens = out.outputs[0].token_ids
        got = [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(tokens)]
        np.testing.assert_allclose(got, _peft_logprobs(m, p, tokens), atol=2e-4)


def test_lora_more_adapters_than_slots_wait_and_evict(lora_engine, adapters, tiny_llama_dir, tmp_path):
    _, model = tiny_llama_dir
    peft_c = save_random_adapter(model, tmp_path / "c", ["o_proj", "up_proj"], rank=2, seed=3)
    rc = LoRARequest("c", 3, str(tmp_path / "c"))
    (ra, peft_a), (rb, peft_b) = adapters["a"], adapters["b"]
    prompts = random_prompts((6, 9, 11), seed=6)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = lora_engine.generate(prompts, params, lora_request=[ra, rb, rc], use_tqdm=False)
    for out, m, p in zip(outs, (peft_a, peft_b, peft_c), prompts):
        assert out.outputs[0].token_ids == hf_greedy(m, p, 6)


def test_lora_prefix_cache_is_keyed_by_adapter(lora_engine, adapters):
    (ra, _), (rb, _) = adapters["a"], adapters["b"]
    prompt = random_prompts((40,), seed=7)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run(lora):
        before = lora_engine.stats()["prefix_cache_hit_tokens"]
        out = lora_engine.generate(prompt, params, lora_request=lora, use_tqdm=False)
        return out.outputs[0].token_ids, lora_engine.stats()["prefix_cache_hit_tokens"] - before

    tokens_a, _ = run(ra)
    tokens_b, hits_b = run(rb)
    assert hits_b == 0                          # the same prompt under another adapter
    assert tokens_b != tokens_a
    tokens_a2, hits_a2 = run(ra)
    assert hits_a2 > 0 and tokens_a2 == tokens_a   # its own cached blocks are reused


def test_lora_streaming_and_chat_carry_the_adapter(lora_engine, adapters, tiny_llama_dir):
    ra, peft_a = adapters["a"]
    prompt = random_prompts((9,), seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    *_, last = lora_engine.generate_stream(prompt, params, lora_request=ra)
    assert last.outputs[0].token_ids == hf_greedy(peft_a, prompt, 5)


def _edit_adapter(src, dst, config=None, rename=None):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = load_file(src / "adapter_model.safetensors")
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    save_file(tensors, dst / "adapter_model.safetensors")


def test_lora_refusals(lora_engine, tiny_engine, adapters, tmp_path):
    from pathlib import Path

    ra, _ = adapters["a"]
    b_dir = Path(adapters["b"][0].lora_path)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="enable_lora=True"):
        tiny_engine.generate([1, 2, 3], params, lora_request=ra)
    _edit_adapter(b_dir, tmp_path / "big", config={"r": 32})
    with pytest.raises(ValueError, match="rank 32 is over max_lora_rank=8"):
        lora_engine.generate([1, 2, 3], params, lora_request=LoRARequest("big", 10, str(tmp_path / "big")))
    _edit_adapter(b_dir, tmp_path / "unknown", rename=("up_proj", "side_proj"))
    with pytest.raises(ValueError, match="unknown target module 'side_proj'"):
        lora_engine.generate([1, 2, 3], params, lora_request=LoRARequest("u", 11, str(tmp_path / "unknown")))
    _edit_adapter(b_dir, tmp_path / "dora", config={"use_dora": True})
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora_engine.generate([1, 2, 3], params, lora_request=LoRARequest("d", 12, str(tmp_path / "dora")))
    with pytest.raises(ValueError, match="lora_int_id 1 is already adapter"):
        lora_engine.generate([1, 2, 3], params, lora_request=LoRARequest("a2", 1, str(b_dir)))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        lora_engine.generate([1, 2, 3], params, lora_request=LoRARequest("x", 13, str(tmp_path)))
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("x", 0, str(tmp_path))
    with pytest.raises(ValueError, match="2 lora_requests for 1 prompts"):
        lora_engine.generate([[1, 2, 3]], params, lora_request=[ra, ra])
    assert lora_engine.stats()["num_running"] == 0


def test_lora_refuses_an_adapter_of_another_base_model(lora_engine, tmp_path):
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    save_random_adapter(other, tmp_path / "other_adapter", ["q_proj"], copy_model=False)
    with pytest.raises(ValueError, match=r"the base model needs \(4, 64\)"):
        lora_engine.generate([1, 2, 3], SamplingParams(max_tokens=2),
                             lora_request=LoRARequest("o", 20, str(tmp_path / "other_adapter")))


@pytest.mark.slow
def test_lora_smollm2_matches_peft(tmp_path):
    """The real default model under a random adapter: every served token is peft's argmax (up
    to a near-tie of 1e-3) with its logprob, and the base rows in the same batch stay base.
    Scanned layers and the reference attention: a third of the unrolled model's compile time."""
    from transformers import AutoModelForCausalLM

    with Engine(enable_lora=True, max_lora_rank=8, max_num_seqs=2, max_model_len=128, scan_layers=True,
                attention="reference", num_blocks=64, max_num_batched_tokens=16, max_logprobs=2) as engine:
        hf_model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
        peft_model = save_random_adapter(hf_model, tmp_path / "a", ["q_proj", "v_proj", "o_proj", "down_proj"],
                                         rank=8, alpha=16, std=0.05, copy_model=False)
        prompt = engine.tokenizer.encode("The capital of France is")
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
        base, adapted = engine.generate([prompt, prompt], params, use_tqdm=False,
                                        lora_request=[None, LoRARequest("a", 1, str(tmp_path / "a"))])
    for out, adapter_on in ((adapted, True), (base, False)):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            if adapter_on:
                logits = peft_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            else:
                with peft_model.disable_adapter():
                    logits = peft_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        logprobs = torch.log_softmax(logits.double(), -1).numpy()
        chosen = logprobs[np.arange(len(tokens)), tokens]
        np.testing.assert_array_less(logprobs.max(-1) - chosen, 1e-3)
        got = [out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(tokens)]
        np.testing.assert_allclose(got, chosen, atol=2e-3)
    assert adapted.outputs[0].token_ids != base.outputs[0].token_ids


def test_lora_server_serves_adapters_by_model_name(lora_engine, adapters, tiny_llama_dir):
    from fastapi.testclient import TestClient

    from jaxllm.server.app import build_app
    from jaxllm.server.cli import lora_requests

    ra, peft_a = adapters["a"]
    modules = lora_requests([f"a={ra.lora_path}"])
    assert modules == {"a": ra}
    client = TestClient(build_app(lora_engine, served_model_name="tiny", lora_modules=modules))
    listed = client.get("/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in listed] == [("tiny", None), ("a", "tiny")]
    prompt = random_prompts((6,), seed=9)[0]
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 1}
    for model, reference in (("a", peft_a), ("tiny", tiny_llama_dir[1])):
        reply = client.post("/v1/completions", json={**body, "model": model}).json()
        assert reply["model"] == model
        tokens = [int(t.removeprefix("token_id:")) for t in reply["choices"][0]["logprobs"]["tokens"]]
        assert tokens == hf_greedy(reference, prompt, 5)
    assert client.post("/v1/completions", json={**body, "model": "b"}).status_code == 404
    with pytest.raises(ValueError, match="NAME=PATH"):
        lora_requests(["a"])
