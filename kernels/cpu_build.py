"""Builds the C++ XLA FFI kernels of ``jaxllm.kernels`` for this CPU and loads them.

A kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``) for
this machine (``-march=native``) and kept in ``cache_dir() / "kernels"`` under a name that
hashes the source and every header of this directory, the flags, the compiler's
target (its predefined macros: version and ISA) and the jax version, so a shared cache never
serves a binary built for another CPU or FFI ABI. Several processes may build at once: each
compiles to a temporary file and renames it into place atomically.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

from jaxllm.model_source import cache_dir

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC")
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))  # what the kernels may include


def compiler() -> str:
    """The C++ compiler to build with; RuntimeError when there is none."""
    found = shutil.which(os.environ.get("CXX", "g++"))
    if found is None:
        raise RuntimeError(f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on PATH")
    return found


@functools.cache
def _target_macros(cxx: str) -> str:
    """The compiler's predefined macros for this machine (version and ISA), once per process."""
    return subprocess.run([cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                          capture_output=True, check=True, text=True).stdout


def has_macros(names: tuple[str, ...]) -> bool:
    """Whether the compiler targets this machine with every macro of ``names`` defined (ISA
    extensions such as "__AVX512VNNI__"); False without a compiler."""
    try:
        macros = _target_macros(compiler())
    except (RuntimeError, subprocess.SubprocessError, OSError):
        return False
    return all(f"#define {name} " in macros for name in names)


def build(source: Path) -> Path:
    """Compiles ``source`` into the cache unless a build with the same key is there; its path."""
    cxx = compiler()
    key = hashlib.sha256(b"\0".join(
        [source.read_bytes(), *(h.read_bytes() for h in HEADERS), " ".join(FLAGS).encode(),
         _target_macros(cxx).encode(), jax.__version__.encode()]))
    library = cache_dir() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=library.stem, suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run(
            [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(source), "-o", tmp],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {source.name}:\n{result.stderr[-4000:]}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("built %s: %s", source.name, library)
    return library


def register(source: Path, symbols: dict[str, str], what: str) -> bool:
    """Builds ``source`` (or finds its build) and registers each handler symbol -> XLA custom
    call target name with XLA:CPU. False, with the reason logged as a warning naming ``what``,
    when it cannot be built or loaded; never raises for that."""
    try:
        library = ctypes.CDLL(str(build(source)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("the %s is unavailable: %s", what, error)
        return False
    for symbol, target in symbols.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True


def num_threads() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
