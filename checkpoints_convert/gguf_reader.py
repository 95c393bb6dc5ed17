"""GGUF files opened with their size checked against their header (see ``file_checks``).

The gguf package's reader maps each tensor's bytes as it parses the header; on a truncated file
it fails reshaping a short slice (``cannot reshape array of size 66784 into shape (576,360)``).
``open_gguf`` checks, before that, that the file holds every tensor's bytes, and names the file,
the expected and actual sizes and the first incomplete tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from .file_checks import CheckpointFileError

# What a corrupt header makes the gguf reader raise while it parses fields and tensor infos.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError)


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A GGUFReader over ``path``, once its header is readable and every tensor's data fits.

    Raises:
        CheckpointFileError: the file is empty, its header is corrupt or truncated, or it ends
            before the tensor data its header describes (expected and actual sizes named).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"{path} is empty (0 bytes), not a GGUF file")
    try:
        return _SizeCheckedGGUFReader(path)
    except CheckpointFileError:
        raise
    except _PARSE_ERRORS as e:
        raise CheckpointFileError(f"{path} ({size} bytes) is not a readable GGUF file: its header "
                                  f"is truncated or corrupt ({type(e).__name__}: {e})") from e


class _SizeCheckedGGUFReader(GGUFReader):
    """The gguf package's reader, checking that the file holds every tensor's bytes before it
    maps them (the reader itself would fail reshaping a short slice of the memory map).

    It hooks ``_build_tensors``, which ``GGUFReader.__init__`` calls once the header (fields and
    tensor infos) is parsed, with the data section's offset and the tensor info fields.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(path)

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        file_size = int(self.data.size)
        extents = [_tensor_extent(start_offs, field) for field in fields]
        expected = max((end for _, _, end in extents), default=start_offs)
        if expected > file_size:
            name, nbytes, end = next(e for e in extents if e[2] > file_size)
            raise CheckpointFileError(
                f"{self.path} is truncated: its tensor data should be {expected - start_offs} bytes "
                f"(a file of {expected} bytes) but the file is {file_size} bytes, holding "
                f"{max(0, file_size - start_offs)}; the first incomplete tensor is {name!r} "
                f"({nbytes} bytes ending at byte {end})")
        super()._build_tensors(start_offs, fields)


def _tensor_extent(start_offs: int, field: Any) -> tuple[str, int, int]:
    """(name, data bytes, end offset in the file) of one tensor info field of a GGUF header."""
    _, name_data, _, dims, raw_type, offset = field.parts
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
    nbytes = int(np.prod(dims, dtype=np.int64)) * type_size // block_size
    return bytes(name_data).decode("utf-8", "replace"), nbytes, start_offs + int(offset[0]) + nbytes
