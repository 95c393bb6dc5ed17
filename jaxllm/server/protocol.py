"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI's fields and
vLLM's extras) and their mapping onto SamplingParams.

Types are checked strictly by pydantic (``"n": "2"`` or ``"n": true`` is a 400, as a wrong
type from a client is a bug to report, not to guess around); values are checked by
SamplingParams and the engine's input processor, whose messages the client gets.

Unknown fields are ignored, as vLLM does (and logged by the app): clients written for OpenAI or
vLLM send fields that do not change the result (``metadata``, ``store``,
``parallel_tool_calls``...) and refusing them would break those clients. Fields that *would*
change the result and this server cannot honour (tools, ``echo``, ``suffix``, ``best_of`` > n,
vLLM's old ``guided_*``) are refused with a 400 naming them, so nobody silently gets output
that ignored what they asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams

# Request fields known to OpenAI or vLLM that this server cannot honour -> why.
_REFUSED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "suffix": "insertion (suffix) is not supported",
    "echo": "echo is not supported",
    "best_of": "best_of other than n is not supported",
    "guided_json": "use structured_outputs={'json': ...} or response_format",
    "guided_regex": "use structured_outputs={'regex': ...}",
    "guided_choice": "use structured_outputs={'choice': [...]}",
    "guided_grammar": "use structured_outputs={'grammar': ...}",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
}
_HARMLESS = (None, False, "", "none", "auto", "text", ["text"])

_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_OPTIONAL_NUMBERS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _GenerationRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    priority: int = 0
    structured_outputs: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def ignored_fields(self) -> list[str]:
        """The unknown fields this request carried (and the server ignores)."""
        return sorted(set(self.model_extra or {}) - set(_REFUSED))

    def field_names(self) -> dict[str, str]:
        """SamplingParams / engine name -> this request's field, for naming errors' ``param``."""
        names = {name: name for name in (*type(self).model_fields, *_REFUSED)}
        names.update(beam_width="n", penalties="use_beam_search", sampling_params="n")
        return names

    def sampling_params(self, default_max_tokens: int, output_kind: RequestOutputKind) -> SamplingParams:
        """The SamplingParams this request asks for (ValueError naming a field otherwise).

        Args:
            default_max_tokens: used when the request leaves max_tokens unset.
            output_kind: DELTA for streaming, FINAL_ONLY otherwise.
        """
        self._refuse_unsupported()
        kwargs: dict[str, Any] = dict(
            n=self.n, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, use_beam_search=self.use_beam_search,
            max_tokens=default_max_tokens if self._max_tokens() is None else self._max_tokens(),
            logprobs=self._logprobs(),
            output_kind=output_kind)
        kwargs.update({name: getattr(self, name) for name in _OPTIONAL_NUMBERS
                       if getattr(self, name) is not None})
        if self.use_beam_search:  # vLLM: n beams are kept and returned, deterministically
            kwargs.setdefault("temperature", 0.0)
            kwargs.update(beam_width=self.n, length_penalty=self.length_penalty)
        if self.logit_bias:
            kwargs["logit_bias"] = _logit_bias(self.logit_bias)
        structured = self._structured_outputs()
        if structured is not None:
            kwargs["structured_outputs"] = structured
        return SamplingParams(**kwargs)

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def _logprobs(self) -> int | None:
        raise NotImplementedError

    def _refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            harmless = value in _HARMLESS or (name == "best_of" and value in (1, self.n))
            if name in _REFUSED and not harmless:
                raise ValueError(f"{name} is not supported by jaxllm: {_REFUSED[name]}")

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """response_format or structured_outputs as StructuredOutputsParams; refused (naming
        the field) while this engine build's SamplingParams cannot take them."""
        given = [name for name in ("response_format", "structured_outputs")
                 if getattr(self, name) is not None
                 and not (name == "response_format" and self.response_format.type == "text")]
        if not given:
            return None
        if len(given) > 1:
            raise ValueError("response_format and structured_outputs are alternatives: give one")
        field = given[0]
        if field == "response_format":
            params = _from_response_format(self.response_format)
        else:
            try:
                params = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise ValueError(f"structured_outputs: {exc}") from None
        if "structured_outputs" not in _SAMPLING_FIELDS:
            raise ValueError(f"{field} is not supported by this engine build (its SamplingParams "
                             "has no structured_outputs yet)")
        return params


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt or several (strings or token id lists)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt (a str or a list of token ids); ValueError when empty."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ValueError("prompt is empty")
        return list(prompt)

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: one conversation through the model's chat template."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens; both work
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def field_names(self) -> dict[str, str]:
        names = super().field_names()
        names.update(prompt="messages", logprobs="top_logprobs" if self.top_logprobs else "logprobs",
                     max_tokens="max_completion_tokens" if self.max_completion_tokens else "max_tokens")
        return names

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings)."""
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise ValueError(f"logit_bias keys must be token ids, got {sorted(bias)[:5]}") from None


def _from_response_format(fmt: ResponseFormat) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ValueError("response_format.json_schema.schema is required with type json_schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_)
