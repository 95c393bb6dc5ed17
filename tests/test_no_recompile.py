"""After ``Engine(warmup=True)``, traffic using every SamplingParams field but Python logits
processors compiles nothing: not a step variant (the compile counter), and nothing at all that
JAX traces or compiles (counted through ``jax.monitoring``), copy-on-write block copies and
penalty-slot seeding included."""

from __future__ import annotations

import jax.monitoring
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, random_prompts

from jaxllm import Engine, RequestOutputKind, SamplingParams
from jaxllm.step_inputs import StepKey

OPTIONS = dict(max_model_len=64, num_blocks=40, block_size=8, max_num_seqs=4,
               max_num_batched_tokens=16, max_logprobs=8, warmup=True)
EOS = 3


def save_word_tokenizer(path) -> None:
    """A word-level tokenizer "t0" .. "t255" beside the model, so stop strings have text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=f"t{EOS}").save_pretrained(path)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A tied-head model: its prompt logprobs take step.head_logits' tied path."""
    path = tmp_path_factory.mktemp("tiny_llama_words")
    hf_model = make_tiny_llama(path, eos_token_id=EOS, tie_word_embeddings=True)
    save_word_tokenizer(path)
    with Engine(str(path), **OPTIONS) as engine:
        assert engine.model_config.tie_word_embeddings
        yield engine, hf_model


class CompileEvents:
    """Counts JAX's tracing and compiling events (any jit cache miss) while active."""

    def __enter__(self) -> "CompileEvents":
        self.names: list[str] = []
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def _record(self, name: str, duration: float, **kwargs) -> None:
        if name.startswith("/jax/core/compile/"):
            self.names.append(name)

    def __exit__(self, *exc_info) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)


def every_feature() -> list[SamplingParams]:
    """One request per sampling feature the engine serves without a host callback."""
    return [
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1, max_tokens=12, logprobs=3),
        SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=8, repetition_penalty=1.3,
                       frequency_penalty=0.5, presence_penalty=0.4),
        SamplingParams(use_beam_search=True, beam_width=3, n=2, temperature=0, max_tokens=8,
                       length_penalty=0.8, early_stopping=True),
        SamplingParams(temperature=0.7, seed=3, logit_bias={7: 5.0, 9: -100.0},
                       allowed_token_ids=[5, 7, 9, 11, EOS], max_tokens=10),
        SamplingParams(temperature=0, min_tokens=5, stop_token_ids=[11], max_tokens=12, prompt_logprobs=2,
                       stop=["t40"], include_stop_str_in_output=True),
        SamplingParams(temperature=1.0, seed=4, strategy="typical", strategy_args={"mass": 0.8},
                       max_tokens=6, ignore_eos=True, skip_special_tokens=False),
        SamplingParams(temperature=0.9, seed=5, strategy="eta", presence_penalty=-1.0, max_tokens=9,
                       logprobs=0, prompt_logprobs=0),
    ]


def test_mixed_features_after_warmup_compile_nothing(warmed):
    engine, hf_model = warmed
    compiled = engine.stats()["num_compilations"]
    assert compiled == len(engine.bucket_policy)
    copies = []
    prepare = engine.model_runner.prepare_inputs
    engine.model_runner.prepare_inputs = lambda batch, previous=None: (
        copies.append(len(batch.block_copies)), prepare(batch, previous))[1]
    params = every_feature()
    with CompileEvents() as events:
        for wave in range(3):
            prompts = random_prompts([5 + 3 * i + wave for i in range(len(params))], seed=wave)
            outputs = engine.generate(prompts, params, use_tqdm=False)
            assert all(o.finished for o in outputs)
            stream = SamplingParams(temperature=0.5, seed=wave, max_tokens=5, repetition_penalty=1.1,
                                    output_kind=RequestOutputKind.DELTA)
            assert list(engine.generate_stream(random_prompts([9])[0], stream))[-1].finished
    assert events.names == []
    assert engine.stats()["num_compilations"] == compiled
    assert sum(copies) > 0                       # n > 1 and beam forks copied blocks in steps
    beams = outputs[2].outputs
    assert len(beams) == 2
    prompt = prompts[4]
    with torch.no_grad():
        expected = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].double(), -1).numpy()
    got = [entry[prompt[p]].logprob for p, entry in enumerate(outputs[4].prompt_logprobs) if p > 0]
    np.testing.assert_allclose(got, expected[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
    assert set(outputs[3].outputs[0].token_ids) <= {5, 7, 11, EOS}


def test_python_logits_processors_are_the_one_variant(warmed):
    engine, _ = warmed
    compiled = engine.stats()["num_compilations"]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                            logits_processors=[lambda ids, logits: logits])
    with CompileEvents() as events:
        engine.generate(random_prompts([6])[0], params)
    assert "/jax/core/compile/jaxpr_trace_duration" in events.names    # the counter sees it
    assert engine.stats()["num_compilations"] > compiled
    assert all(key.host_processors for key in engine.model_runner.step.keys
               if key not in {StepKey(*k) for k in engine.bucket_policy.keys()})
