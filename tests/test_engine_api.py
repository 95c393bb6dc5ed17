"""Engine behaviour on a tiny random model: API forms, stop conditions, bad input, the loop."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from conftest import TINY_ENGINE_OPTIONS as OPTIONS
from conftest import random_prompts

from jaxllm import Engine, EngineDeadError, SamplingParams
from jaxllm.models.registry import UnsupportedArchitectureError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def engine(tiny):
    return tiny[0]


def test_engine_generate_accepts_every_prompt_form(engine):
    prompt = random_prompts([6])[0]
    single = engine.generate(prompt, GREEDY)
    as_dict = engine.generate({"prompt_token_ids": prompt}, GREEDY)
    batch = engine.generate([prompt, {"prompt_token_ids": prompt}], [GREEDY, GREEDY], use_tqdm=False)
    assert single.outputs[0].token_ids == as_dict.outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in batch] == [single.outputs[0].token_ids] * 2
    assert single.finished and single.outputs[0].finish_reason == "length"
    assert len(single.outputs[0].token_ids) == 8
    assert single.metrics.time_to_first_token > 0
    assert single.metrics.time_per_output_token > 0
    assert single.metrics.num_prompt_tokens == 6 and single.metrics.num_generated_tokens == 8


def test_engine_batch_independence_greedy_and_seeded(engine):
    """8 prompts of different lengths together give exactly what each gives alone."""
    prompts = random_prompts([1, 3, 7, 12, 20, 33, 50, 64], seed=1)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=i, max_tokens=12,
                             ignore_eos=True) for i in range(8)]
    together = engine.generate(prompts, params, use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, together):
        alone = engine.generate(prompt, sp)
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(alone.outputs[0].cumulative_logprob, abs=1e-4)


def test_engine_seed_reproducible_and_seeds_differ(engine):
    prompt = random_prompts([5], seed=2)[0]
    make = lambda seed: SamplingParams(temperature=1.5, seed=seed, max_tokens=16, ignore_eos=True)
    a = engine.generate(prompt, make(7)).outputs[0].token_ids
    b = engine.generate(prompt, make(7)).outputs[0].token_ids
    others = {tuple(engine.generate(prompt, make(s)).outputs[0].token_ids) for s in range(8, 12)}
    assert a == b
    assert len(others | {tuple(a)}) > 1


def test_engine_stop_token_ids_end_generation(engine):
    prompt = random_prompts([9], seed=3)[0]
    full = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    tokens = full.outputs[0].token_ids
    stop = tokens[4]
    first = tokens.index(stop)
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))
    assert out.outputs[0].token_ids == tokens[:first + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop


def test_engine_eos_list_from_generation_config_and_ignore_eos(tiny_llama_dir, tmp_path):
    src, _ = tiny_llama_dir
    path = tmp_path / "model"
    shutil.copytree(src, path)
    prompt = random_prompts([9], seed=3)[0]
    with Engine(str(path), **OPTIONS) as eng:
        tokens = eng.generate(prompt, GREEDY).outputs[0].token_ids
    eos = tokens[3]
    gen_config = path / "generation_config.json"
    config = json.loads(gen_config.read_text()) if gen_config.exists() else {}
    config["eos_token_id"] = [255 if eos != 255 else 254, eos]
    gen_config.write_text(json.dumps(config))
    with Engine(str(path), **OPTIONS) as eng:
        assert eos in eng.eos_token_ids and len(eng.eos_token_ids) == 2
        stopped = eng.generate(prompt, SamplingParams(temperature=0, max_tokens=8))
        ignored = eng.generate(prompt, GREEDY)
    assert stopped.outputs[0].token_ids == tokens[:tokens.index(eos) + 1]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason is None
    assert ignored.outputs[0].token_ids == tokens


@pytest.mark.parametrize("bad_prompt, message", [
    ([], "empty"),
    ({"prompt_token_ids": []}, "empty"),
    (list(range(96)), "max_model_len"),
    ([1, 2, 999], "token ids"),
    ({"tokens": [1]}, "prompt_token_ids"),
])
def test_engine_bad_prompt_raises_then_serves(engine, bad_prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(bad_prompt, GREEDY)
    assert len(engine.generate([1, 2, 3], GREEDY).outputs[0].token_ids) == 8


def test_engine_text_prompt_without_tokenizer_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate("hello", GREEDY)


def test_engine_prompt_plus_max_tokens_beyond_max_model_len_rejected(engine):
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        engine.generate(list(range(90)), SamplingParams(max_tokens=10))


def test_engine_invalid_sampling_values_raise_then_serve(engine):
    for kwargs, field in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                          ({"top_k": -3}, "top_k"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="sampling_params"):
        engine.generate([[1, 2], [3, 4]], [GREEDY])
    assert engine.generate([5, 6], GREEDY).finished


def test_engine_missing_path_raises(tmp_path):
    from jaxllm.model_source import ModelNotFoundError

    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError, match="no_such_model"):
        Engine(str(missing))


def test_engine_unsupported_architecture_names_it(tiny_llama_dir, tmp_path):
    src, _ = tiny_llama_dir
    path = tmp_path / "model"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["LlamaForTokenClassification"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForTokenClassification") as err:
        Engine(str(path), **OPTIONS)
    assert "LlamaForCausalLM" in str(err.value) and "MistralForCausalLM" in str(err.value)


def test_engine_loop_error_reaches_every_caller(tiny_llama_dir):
    path, _ = tiny_llama_dir
    eng = Engine(str(path), **OPTIONS)
    def broken(*args):
        raise RuntimeError("device on fire")
    eng.model_runner.dispatch = broken
    errors = []
    def call():
        try:
            eng.generate([1, 2, 3], GREEDY)
        except EngineDeadError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 4 and all("device on fire" in str(e) for e in errors)
    with pytest.raises(EngineDeadError):
        eng.generate([1, 2, 3], GREEDY)
    eng.shutdown()


def test_engine_shutdown_stops_thread_and_refuses_work(tiny_llama_dir):
    path, _ = tiny_llama_dir
    with Engine(str(path), **OPTIONS) as eng:
        assert eng.generate([1, 2], GREEDY).finished
    assert not eng._executor.is_alive
    with pytest.raises(EngineDeadError, match="shut down"):
        eng.generate([1, 2], GREEDY)


def test_engine_steady_state_does_not_recompile(engine):
    lengths = [4, 9, 17, 30]
    engine.generate(random_prompts(lengths, seed=5), GREEDY, use_tqdm=False)
    before = engine.stats()["num_compilations"]
    # Same shapes, new content (and no prefix-cache hits, which would change the shapes).
    engine.generate(random_prompts(lengths, seed=6), GREEDY, use_tqdm=False)
    stats = engine.stats()
    assert stats["num_compilations"] == before
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0


def test_engine_runs_an_hf_dir_without_the_gguf_package(tiny_llama_dir):
    """GPU images ship without ``gguf``: only GGUF files may need it."""
    import subprocess
    import sys

    path, _ = tiny_llama_dir
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "from jaxllm import Engine, SamplingParams\n"
        f"with Engine({str(path)!r}, max_model_len=64, num_blocks=16) as e:\n"
        "    print(len(e.generate([1, 2, 3], SamplingParams(max_tokens=3)).outputs[0].token_ids))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("3")


def test_engine_interrupted_generate_aborts_its_requests(engine):
    """A KeyboardInterrupt while waiting (a notebook's stop button) frees the engine."""
    import jaxllm.executor as executor_module

    original = executor_module.RequestHandle.result
    calls = []

    def interrupted(self):
        calls.append(self)
        raise KeyboardInterrupt

    executor_module.RequestHandle.result = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.generate(random_prompts([5, 6, 7], seed=9),
                            SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
                            use_tqdm=False)
    finally:
        executor_module.RequestHandle.result = original
    assert len(calls) == 1
    # The aborted requests leave the engine idle with every block free.
    assert engine.generate([1, 2, 3], GREEDY).finished
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0
