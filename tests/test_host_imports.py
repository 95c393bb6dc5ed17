"""The host side imports without jax: ``import jaxllm`` is cheap and lazy, and the executor
loop, scheduler, KV manager, sequences, input processing and post-processing never pull in jax,
flax or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

HOST_MODULES = ("jaxllm", "jaxllm.scheduler", "jaxllm.kv_cache_manager", "jaxllm.sequence",
                "jaxllm.input_processor", "jaxllm.output_processor", "jaxllm.detokenizer",
                "jaxllm.sampling_params", "jaxllm.outputs", "jaxllm.beam_search",
                "jaxllm.executor", "jaxllm.postprocess", "jaxllm.groups", "jaxllm.request_handle")
HEAVY = ("jax", "flax", "transformers", "torch")


def _loaded_after(code: str) -> set[str]:
    """Top-level packages in sys.modules after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_host_modules_import_without_jax():
    loaded = _loaded_after("\n".join(f"import {m}" for m in HOST_MODULES)
                           + "\nfrom jaxllm import SamplingParams, RequestOutput, EngineDeadError")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_engine_is_resolved_on_first_use():
    loaded = _loaded_after("import jaxllm\nassert 'Engine' in dir(jaxllm)\nengine_cls = jaxllm.Engine")
    assert "jax" in loaded and "flax" in loaded


def test_unknown_public_name_is_an_attribute_error():
    import jaxllm

    with pytest.raises(AttributeError, match="NoSuchThing"):
        jaxllm.NoSuchThing  # noqa: B018
