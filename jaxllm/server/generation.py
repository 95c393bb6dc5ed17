"""The two generation endpoints: ``/v1/completions`` and ``/v1/chat/completions``.

Each request is checked whole before any work starts: the model name (404), the body's types,
every prompt through the engine's own input processor and the SamplingParams (400, the
engine's message naming the field), a dead engine (503), the waiting limit (503 with
Retry-After). Only then are its prompts submitted through ``Engine.generate_async``, streamed as
SSE or collected into one body; a client that disconnects cancels them, which aborts them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.server.admission import AdmissionGate, QueueFull
from jaxllm.server.concurrency import ClientDisconnected, gather_all, unless_disconnected
from jaxllm.server.errors import APIError, engine_dead, from_engine, from_pydantic, invalid_request
from jaxllm.server.metrics import ServerMetrics
from jaxllm.server.protocol import ChatCompletionRequest, CompletionRequest
from jaxllm.server.responses import ResponseBuilder, TokenTexts, usage
from jaxllm.server.streaming import EventStreamResponse, events

logger = logging.getLogger("jaxllm.server")


@dataclasses.dataclass
class Generator:
    """What the endpoints share: the engine and the server's limits and counters."""

    engine: Any
    served_model_name: str
    gate: AdmissionGate
    metrics: ServerMetrics
    texts: TokenTexts
    retry_after_s: int = 1
    lora_modules: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> LoRARequest

    async def completions(self, request: Request, body: bytes) -> Response:
        req = _parse(CompletionRequest, body)
        self._check_model(req.model)
        prompts = _validated(req, lambda: req.prompts())
        return await self._generate(request, req, "completion", prompts)

    async def chat(self, request: Request, body: bytes) -> Response:
        req = _parse(ChatCompletionRequest, body)
        self._check_model(req.model)
        prompts = _validated(req, lambda: self._chat_prompt(req.messages))
        return await self._generate(request, req, "chat", prompts)

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from jinja2 import TemplateError

        try:
            return self.engine.input_processor.chat_prompts(messages)[1]
        except TemplateError as exc:  # the template's own checks (e.g. roles must alternate)
            raise ValueError(f"messages: the chat template refused them: {exc}") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name and model not in self.lora_modules:
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")

    async def _generate(self, request: Request, req: Any, kind: str, prompts: list[Any]) -> Response:
        if req.ignored_fields():
            logger.warning("ignored unknown request fields: %s", ", ".join(req.ignored_fields()))
        stream = req.stream
        kind_out = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        inputs = _validated(req, lambda: [self._input(req, p, kind_out) for p in prompts])
        stats = self.engine.stats()
        if stats["engine_dead"]:
            raise engine_dead(stats["error"])
        top = req.top_logprobs if kind == "chat" else None
        lora = self.lora_modules.get(req.model)      # ``model`` names a LoRA adapter
        builder = ResponseBuilder(kind, req.model if lora else self.served_model_name, req.n,
                                  self.texts, top)
        try:
            self.gate.acquire(len(inputs))
        except QueueFull as exc:
            raise APIError(503, str(exc), type="server_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)}) from None
        streams = [self._observed(self.engine.generate_async(
            prompt, params, request_id=f"{builder.id}-{i}", priority=req.priority, lora_request=lora))
            for i, (prompt, params) in enumerate(inputs)]
        if stream:
            return EventStreamResponse(events(builder, streams, req.include_usage),
                                       on_close=lambda: self.gate.release(len(inputs)))
        try:
            finals = await unless_disconnected(request.receive, gather_all([_last(s) for s in streams]))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed")
        except Exception as exc:  # noqa: BLE001 - the engine failed the accepted request
            raise from_engine(exc) from exc
        finally:
            self.gate.release(len(inputs))
        choices = [builder.choice(i, c, delta=False) for i, out in enumerate(finals) for c in out.outputs]
        tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        prompt_tokens = sum(len(out.prompt_token_ids) for out in finals)
        return JSONResponse(builder.body(choices, usage(prompt_tokens, tokens)))

    def _input(self, req: Any, prompt: Any, output_kind: RequestOutputKind
               ) -> tuple[dict[str, Any], SamplingParams]:
        """One prompt tokenized and checked as the engine checks it at submission, so a bad one
        is a 400 before any prompt of the request runs; its default max_tokens is the context
        left (vLLM's default)."""
        processor = self.engine.input_processor
        text, token_ids = processor.tokenize(prompt)
        params = req.sampling_params(self.engine.config.max_model_len - len(token_ids), output_kind)
        processor.validate_prompt(token_ids, params)
        processor.validate_sampling(params)
        return {"prompt": text, "prompt_token_ids": token_ids}, params

    async def _observed(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """The engine stream, recording each request's end in the metrics (cancelled: abort)."""
        finished = False
        try:
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    if output.finished:
                        finished = True
                        self.metrics.observe(output)
                    yield output
        finally:
            if not finished:
                self.metrics.finished.labels(finished_reason="abort").inc()


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async with contextlib.aclosing(stream) as outputs:
        async for last in outputs:
            pass
    assert last is not None and last.finished
    return last


def _parse(model: type, body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_pydantic(exc.errors()) from None


def _validated(req: Any, check: Any) -> Any:
    """``check()``, its ValueError/TypeError answered as a 400 naming the field."""
    try:
        return check()
    except (ValueError, TypeError) as exc:
        raise invalid_request(exc, req.field_names()) from None
