"""Request bodies of the server (pydantic), the server's limits and the error format.

Every body model forbids unknown fields, so a misspelt option is a 422 naming it rather than silently ignored
(the OpenAI bodies accept and ignore a documented list of harmless ones, ``IGNORED_OPENAI_FIELDS``). Types are
strict (``"3"`` is not a number, ``"yes"`` not a boolean) and numbers finite.
Errors use the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` on every endpoint; ``param``
is the dotted path of the offending field (``options.max_new_tokens``, ``messages.2.role``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import TypeAliasType

from ..generation import GenerationOptions

__all__ = [
    "IGNORED_OPENAI_FIELDS",
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "CpmBeeData",
    "GenerateRequest",
    "Limits",
    "check_input",
    "error_body",
]

MAX_INPUT_DEPTH = 8  # nesting of a CPM-Bee input accepted by the server

# A CPM-Bee input value: a string or a nested object of them (see docs/prompt-format.md).
CpmBeeData = TypeAliasType("CpmBeeData", "str | dict[str, CpmBeeData]")


@dataclass(frozen=True)
class Limits:
    """Abuse limits of one server; every one is checked before a request reaches the queue."""

    max_body_bytes: int = 1 << 20
    """Request bodies larger than this get 413."""
    max_new_tokens: int = 512
    """Upper bound of ``max_new_tokens`` / ``max_tokens`` (422 above it)."""
    max_input_tokens: int = 2048
    """Upper bound of one encoded prompt."""
    max_rows: int = 16
    """Inputs of one request (a ``/v1/generate`` list, or prompts × ``n``)."""
    max_beam_size: int = 8
    """Upper bound of ``beam_size``."""
    body_timeout_s: float = 15.0
    """A request body not received this long after the request arrived gets 408."""
    max_buffered_bytes: int = 64 << 20
    """Bytes of request bodies the server holds at once, all requests together (503 beyond)."""


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``; ``param`` names the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, kind=self.kind, code=self.status)


def error_body(
    message: str, *, param: str | None = None, kind: str = "invalid_request_error", code: Any = None
) -> dict[str, Any]:
    """The JSON error object shared by every endpoint (OpenAI's layout)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _check_value(value: Any, where: str, depth: int) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a string or an object of them, got {type(value).__name__}")
    if depth > MAX_INPUT_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_INPUT_DEPTH} levels")
    for key, item in value.items():
        _check_value(item, f"{where}[{key!r}]", depth + 1)


def check_input(value: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """``value`` if it is a CPM-Bee object or a non-empty list of them; else ValueError naming the place."""
    if isinstance(value, list):
        if not value:
            raise ValueError("input: an empty list has nothing to generate")
        for i, row in enumerate(value):
            if not isinstance(row, dict):
                raise ValueError(
                    f"input[{i}]: expected an object with an '<ans>' key, got {type(row).__name__}"
                )
            _check_value(row, f"input[{i}]", 1)
        return value
    if not isinstance(value, dict):
        raise ValueError(
            f"input: expected an object with an '<ans>' key or a list of them, got {type(value).__name__}"
        )
    _check_value(value, "input", 1)
    return value


_INPUT_TYPE = dict[str, CpmBeeData] | list[dict[str, CpmBeeData]]


class GenerateRequest(_Body):
    """``POST /v1/generate``: fill the ``<ans>`` slots of one CPM-Bee input or a list of them."""

    input: _INPUT_TYPE = Field(
        description="a CPM-Bee object with an '<ans>' key, or a list of them (answered as one batch)",
        examples=[{"input": "今天天气不错", "question": "天气怎么样？", "<ans>": ""}],
    )
    options: GenerationOptions = Field(
        default_factory=GenerationOptions.parse,
        description="generation options (beam_size defaults to 3, or to 1 when streaming)",
    )
    stream: bool = Field(False, description="answer with Server-Sent Events as the text is generated")

    @field_validator("input", mode="plain", json_schema_input_type=_INPUT_TYPE)
    @classmethod
    def _valid_input(cls, value: Any) -> Any:
        return check_input(value)


# ------------------------------------------------------------------------------------------------- OpenAI
IGNORED_OPENAI_FIELDS = ("model", "user", "store", "metadata", "parallel_tool_calls", "service_tier")
"""Accepted and ignored: they change nothing about the answer (the server has one model, stores nothing,
has no tools and no tiers)."""

INT64 = 2**63


class _OpenAISampling(_Body):
    """Fields shared by the OpenAI-compatible endpoints (and the CPM-Bee extensions they accept)."""

    model: str | None = Field(None, description="ignored: the server has one model (see GET /v1/models)")
    user: str | None = Field(None, description="ignored")
    store: bool | None = Field(None, description="ignored: nothing is stored")
    metadata: dict[str, str] | None = Field(None, description="ignored")
    parallel_tool_calls: bool | None = Field(None, description="ignored: there are no tools")
    service_tier: str | None = Field(None, description="ignored: there is one tier")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy, > 0 = sampling")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="choices per prompt (each a row of the same batch)")
    stream: bool = False
    stream_options: dict[str, bool] | None = Field(None, description="{'include_usage': true} adds usage")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="an int64")
    presence_penalty: float = Field(0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (null or {})")
    # CPM-Bee extensions
    top_k: int = Field(0, ge=0, description="extension: sample among the k most likely tokens (0 = all)")
    repetition_penalty: float = Field(1.0, ge=1.0, description="extension: CTRL repetition penalty")
    min_tokens: int = Field(0, ge=0, description="extension: tokens before the answer may end")
    beam_size: int = Field(1, ge=1, description="extension: > 1 = CPM-Bee beam search (temperature 0)")


class CompletionRequest(_OpenAISampling):
    """``POST /v1/completions``: each prompt becomes ``{"input": prompt, "<ans>": ""}``."""

    prompt: str | list[str] = Field(description="a text or a list of texts")
    max_tokens: int | None = Field(16, ge=1, description="generated tokens per choice (OpenAI's default 16)")
    logprobs: int | None = Field(None, description="not supported (null)")
    echo: bool = Field(False, description="not supported (false)")
    suffix: str | None = Field(None, description="not supported (null)")
    best_of: int | None = Field(None, description="only 1 (or null)")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description="a text, or a list of {'type': 'text', 'text': …}"
    )
    name: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    """``POST /v1/chat/completions``: the conversation becomes a CPM-Bee object (see docs/serving.md)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="generated tokens per choice")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="the newer name of max_tokens; wins when both are given"
    )
    logprobs: bool = Field(False, description="not supported (false)")
    top_logprobs: int | None = Field(None, description="not supported (null)")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (null or [])")
    tool_choice: str | dict[str, Any] | None = Field(None, description="not supported (null or 'none')")
