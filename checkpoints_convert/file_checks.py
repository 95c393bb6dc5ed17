"""Cheap integrity checks of checkpoint files, from their headers alone (safetensors here;
GGUF in ``gguf_reader``, as the ``gguf`` package is optional).

A truncated, empty or corrupt file (an interrupted download, a full disk) must fail where the
engine opens it, naming the file and what is wrong with it, instead of deep inside a reader
(``cannot reshape array of size 66784 into shape (576,360)``). Each check reads only the header
and the file's size: the tensor data is read once, later, by the loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

_SAFETENSORS_LENGTH_BYTES = 8


class CheckpointFileError(ValueError):
    """A checkpoint file is truncated, empty or corrupt; the message names it."""


def open_safetensors(path: str | os.PathLike) -> Any:
    """``safe_open(path)`` (numpy), once the header is checked against the file's size.

    Raises:
        CheckpointFileError: the file is empty or too short for its header, the header is not a
            valid safetensors header, or the file ends before the tensor data it lists.
    """
    path = Path(path)
    check_safetensors(path)
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise CheckpointFileError(f"{path} is not a readable safetensors file: {e}") from e


def check_safetensors(path: Path) -> None:
    """Reads the 8-byte header length and the JSON header; the data must cover every tensor."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length_bytes = f.read(_SAFETENSORS_LENGTH_BYTES)
        if len(length_bytes) < _SAFETENSORS_LENGTH_BYTES:
            what = "empty (0 bytes)" if size == 0 else f"only {size} bytes"
            raise CheckpointFileError(f"{path} is {what}: a safetensors file starts with an "
                                      "8-byte header length")
        header_len = int.from_bytes(length_bytes, "little")
        if _SAFETENSORS_LENGTH_BYTES + header_len > size:
            raise CheckpointFileError(
                f"{path} is truncated or corrupt: its header should be {header_len} bytes but "
                f"the file holds {size - _SAFETENSORS_LENGTH_BYTES} after the header length")
        raw = f.read(header_len)
    data_bytes = _safetensors_data_bytes(path, raw)
    actual = size - _SAFETENSORS_LENGTH_BYTES - header_len
    if actual < data_bytes:
        raise CheckpointFileError(
            f"{path} is truncated: its header lists {data_bytes} bytes of tensor data (a file of "
            f"{size - actual + data_bytes} bytes) but the file is {size} bytes, holding {actual}")


def _safetensors_data_bytes(path: Path, raw_header: bytes) -> int:
    """The end of the last tensor's data, as the JSON header lists it."""
    try:
        header = json.loads(raw_header)
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items()
                if name != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointFileError(f"{path} is corrupt: its header is not a valid safetensors "
                                  f"header ({type(e).__name__}: {e})") from e
    return max(ends, default=0)
