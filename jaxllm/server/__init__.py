"""``jaxllm serve``: an OpenAI-compatible HTTP server (vLLM's endpoints) over one Engine.

The server's dependencies are the ``serve`` extra (FastAPI, uvicorn, prometheus_client); they
are imported only by the entry points (``require_serve_extra`` first), never by
``import jaxllm``.
"""

from __future__ import annotations

import importlib.util

SERVE_EXTRA_MODULES = ("fastapi", "uvicorn", "prometheus_client")
INSTALL_SERVE_EXTRA = 'pip install "jaxllm[serve]"'

DEFAULT_MAX_WAITING_REQUESTS = 256
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def require_serve_extra() -> None:
    """Raises ImportError naming the install command when a server dependency is missing."""
    missing = [name for name in SERVE_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"jaxllm serve needs {', '.join(missing)}: {INSTALL_SERVE_EXTRA}")
