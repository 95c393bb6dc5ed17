"""The FastAPI app: routes, the bearer key, the body limit and OpenAI-shaped errors.

``build_app(engine, ...)`` serves one Engine. Every error leaves as OpenAI's error body (also
FastAPI's own 404/405s and anything unexpected, as a 500), so the server answers every bad
request and keeps serving.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import jaxllm
from jaxllm.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING_REQUESTS
from jaxllm.server.admission import AdmissionGate
from jaxllm.server.errors import APIError, engine_dead, from_pydantic
from jaxllm.server.generation import Generator
from jaxllm.server.metrics import ServerMetrics
from jaxllm.server.responses import TokenTexts

logger = logging.getLogger("jaxllm.server")


def build_app(engine: Any, *, served_model_name: str, api_key: str | None = None,
              max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, retry_after_s: int = 1,
              lora_modules: dict[str, Any] | None = None) -> FastAPI:
    """An OpenAI-compatible app over ``engine`` (which the caller starts and shuts down).

    Args:
        engine: a jaxllm Engine (anything with its ``generate_async``, ``stats``, ``config``,
            ``tokenizer`` and ``input_processor``).
        served_model_name: the ``model`` requests must name (404 otherwise; omitted is fine).
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>`` (401).
        max_waiting_requests: requests that may wait beyond the engine's ``max_num_seqs``;
            more are refused with 503 and ``Retry-After: retry_after_s``.
        max_body_bytes: larger request bodies are refused with 413.
        lora_modules: adapter name -> ``LoRARequest`` (engine built with ``enable_lora``): a
            request whose ``model`` is an adapter's name runs under it; /v1/models lists them.
    """
    lora_modules = dict(lora_modules or {})
    gate = AdmissionGate(engine.config.max_num_seqs, max_waiting_requests)
    metrics = ServerMetrics(lambda: engine.stats(), lambda: gate.waiting)
    generator = Generator(engine, served_model_name, gate, metrics, TokenTexts(engine.tokenizer),
                          retry_after_s, lora_modules)
    created = int(time.time())
    app = FastAPI(title="jaxllm", version=jaxllm.__version__)
    app.state.gate, app.state.metrics = gate, metrics
    _add_error_handlers(app)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large(max_body_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise _too_large(max_body_bytes)
        return bytes(body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        await authorize(request)
        return await generator.completions(request, await read_body(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        await authorize(request)
        return await generator.chat(request, await read_body(request))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        await authorize(request)
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": created,
            "owned_by": "jaxllm", "root": str(getattr(engine, "model_dir", served_model_name)),
            "max_model_len": engine.config.max_model_len}] + [{
            "id": name, "object": "model", "created": created, "owned_by": "jaxllm",
            "root": lora.lora_path, "parent": served_model_name,
            "max_model_len": engine.config.max_model_len} for name, lora in lora_modules.items()]}

    @app.get("/health")
    async def health() -> Response:
        stats = engine.stats()
        if stats["engine_dead"]:
            raise engine_dead(stats["error"])
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": jaxllm.__version__}

    return app


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the server's limit of {limit} bytes "
                    "(--max-body-bytes)", code="request_too_large")


def _add_error_handlers(app: FastAPI) -> None:
    def respond(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(from_pydantic(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return respond(APIError(exc.status_code, str(exc.detail), type=error_type))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return respond(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                type="server_error"))
