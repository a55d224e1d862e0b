"""OpenAI-compatible adapters: completion prompts and chat conversations as CPM-Bee inputs, and back.

User text is literal: ``<`` is escaped (``cpmbee.tokenizer.escape``), so ``"is 1 < 2 ?"`` works and
``"<mask_0>"`` in a message is text, not a control token. A completion prompt ``p`` becomes
``{"input": escape(p), "<ans>": ""}``. A conversation becomes::

    {
      "system": "<every system/developer message, joined by newlines>",      # only if there is one
      "history": {"1": {"user": "...", "assistant": "..."}, "2": {...}},     # earlier turns, if any
      "input": "<the last user message(s)>",
      "<ans>": ""
    }

Turns pair each user message with the assistant reply after it (consecutive messages of one role are joined
by newlines; an assistant message with no user message before it pairs with ``""``). The conversation must
end with a user message.

Sampling: ``temperature`` 0 is greedy, above 0 sampling with ``temperature``/``top_p`` (and the ``top_k``
extension); the ``beam_size`` extension (> 1, temperature 0, not streaming) is CPM-Bee's beam search.
``n`` > 1 answers each prompt ``n`` times as rows of one batch. Fields the model cannot honour
(``logprobs``, ``echo``, penalties other than 0, ``logit_bias``, tools, ...) are refused with a 422 that
names them rather than ignored; fields that change nothing (``protocol.IGNORED_OPENAI_FIELDS``) are ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..generation import GenerationOptions
from ..tokenizer import escape, unescape
from .protocol import ApiError, ChatCompletionRequest, ChatMessage, CompletionRequest, Limits

__all__ = [
    "LiteralStream",
    "chat_chunk",
    "chat_response",
    "chat_rows",
    "completion_chunk",
    "completion_response",
    "completion_rows",
    "conversation_to_cpmbee",
    "finish_reason",
    "literal",
    "usage_chunk",
]

MAX_STOP = 4


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, f"{param}: {message}", param=param)


def _refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.presence_penalty:
        raise _invalid("presence_penalty", "not supported; use 0 (or the repetition_penalty extension)")
    if req.frequency_penalty:
        raise _invalid("frequency_penalty", "not supported; use 0 (or the repetition_penalty extension)")
    if req.logit_bias:
        raise _invalid("logit_bias", "not supported")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            raise _invalid("logprobs", "not supported")
        if req.echo:
            raise _invalid("echo", "not supported")
        if req.suffix is not None:
            raise _invalid("suffix", "not supported")
        if req.best_of not in (None, 1):
            raise _invalid("best_of", "only 1 is supported (use the beam_size extension for beam search)")
    else:
        if req.logprobs or req.top_logprobs is not None:
            raise _invalid("logprobs", "not supported")
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise _invalid("response_format", "only {'type': 'text'} is supported")
        if req.tools:
            raise _invalid("tools", "not supported")
        if req.tool_choice not in (None, "none"):
            raise _invalid("tool_choice", "not supported")


def sampling_options(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int, limits: Limits
) -> GenerationOptions:
    """The ``GenerationOptions`` of an OpenAI request; ApiError (422) naming the field otherwise."""
    _refuse_unsupported(req)
    max_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    if max_tokens > limits.max_new_tokens:
        raise _invalid(max_name, f"at most {limits.max_new_tokens} on this server, got {max_tokens}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise _invalid("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    if any(not s for s in stop):
        raise _invalid("stop", "stop strings must not be empty")
    stop = [escape(s) for s in stop]  # matched against the answer as the model writes it
    if req.beam_size > limits.max_beam_size:
        raise _invalid("beam_size", f"at most {limits.max_beam_size} on this server")
    if req.beam_size > 1 and (req.temperature > 0 or req.stream or stop or req.min_tokens):
        raise _invalid("beam_size", "beam search needs temperature 0, no stream, no stop and no min_tokens")
    options: dict[str, Any] = {
        "beam_size": req.beam_size,
        "max_new_tokens": max_tokens,
        "min_new_tokens": req.min_tokens,
        "repetition_penalty": req.repetition_penalty,
        "stop": stop,
        "seed": req.seed,
    }
    if req.temperature > 0:
        options.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    try:
        return GenerationOptions.parse(options)
    except ValueError as err:
        raise ApiError(422, str(err), param=None) from None


def _check_rows(count: int, n: int, limits: Limits) -> None:
    if count * n > limits.max_rows:
        raise _invalid("n", f"prompts × n must be at most {limits.max_rows} on this server, got {count * n}")


def completion_rows(req: CompletionRequest, limits: Limits) -> tuple[list[dict[str, str]], GenerationOptions]:
    """One CPM-Bee input per (prompt, choice), prompt-major, and the options."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise _invalid("prompt", "an empty list has nothing to complete")
    _check_rows(len(prompts), req.n, limits)
    options = sampling_options(req, req.max_tokens or 16, limits)
    return [{"input": escape(p), "<ans>": ""} for p in prompts for _ in range(req.n)], options


def _text(message: ChatMessage, index: int) -> str:
    """The message's text, escaped for a CPM-Bee input."""
    if isinstance(message.content, str):
        return escape(message.content)
    parts = []
    for j, part in enumerate(message.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _invalid(
                f"messages.{index}.content.{j}", "only {'type': 'text', 'text': '...'} parts are supported"
            )
        parts.append(part["text"])
    return escape("".join(parts))


def conversation_to_cpmbee(messages: list[ChatMessage]) -> dict[str, Any]:
    """The CPM-Bee input of a chat conversation (layout in the module docstring; texts escaped)."""
    if not messages or messages[-1].role != "user":
        raise _invalid(
            f"messages.{max(len(messages) - 1, 0)}.role", "the conversation must end with a user message"
        )
    system: list[str] = []
    turns: list[dict[str, list[str]]] = []
    for i, message in enumerate(messages):
        text = _text(message, i)
        if message.role in ("system", "developer"):
            system.append(text)
        elif message.role == "user":
            if not turns or turns[-1]["assistant"]:
                turns.append({"user": [], "assistant": []})
            turns[-1]["user"].append(text)
        else:
            if not turns:
                turns.append({"user": [], "assistant": []})
            turns[-1]["assistant"].append(text)
    data: dict[str, Any] = {}
    if system:
        data["system"] = "\n".join(system)
    if len(turns) > 1:
        data["history"] = {
            str(k): {"user": "\n".join(t["user"]), "assistant": "\n".join(t["assistant"])}
            for k, t in enumerate(turns[:-1], start=1)
        }
    data["input"] = "\n".join(turns[-1]["user"])
    data["<ans>"] = ""
    return data


def chat_rows(req: ChatCompletionRequest, limits: Limits) -> tuple[list[dict[str, Any]], GenerationOptions]:
    _check_rows(1, req.n, limits)
    max_tokens = req.max_completion_tokens or req.max_tokens or min(256, limits.max_new_tokens)
    options = sampling_options(req, max_tokens, limits)
    data = conversation_to_cpmbee(req.messages)
    return [dict(data) for _ in range(req.n)], options


# -------------------------------------------------------------------------------------------------- responses
def literal(answer: str) -> str:
    """An answer as the model writes it (``<`` doubled) → the literal text an OpenAI client expects."""
    return unescape(answer)


class LiteralStream:
    """``literal`` over a stream of increments of one answer: an increment ending in an unpaired ``<``
    keeps it until the next one, so a ``<<`` cut between two increments still becomes one ``<``."""

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, text: str) -> str:
        text = self.pending + text
        unpaired = (len(text) - len(text.rstrip("<"))) % 2
        self.pending = text[len(text) - unpaired :]
        return unescape(text[: len(text) - unpaired])

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


def finish_reason(generated_tokens: int, max_new_tokens: int) -> str:
    """``"length"`` when the token budget ran out, else ``"stop"`` (``</s>`` or a stop string)."""
    return "length" if generated_tokens >= max_new_tokens else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}


def completion_response(
    rid: str, model: str, texts: list[str], reasons: list[str], usage: dict[str, int]
) -> dict[str, Any]:
    choices = [
        {"index": i, "text": t, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return {**_envelope("text_completion", rid, model, choices), "usage": usage}


def chat_response(
    rid: str, model: str, texts: list[str], reasons: list[str], usage: dict[str, int]
) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return {**_envelope("chat.completion", rid, model, choices), "usage": usage}


def completion_chunk(
    rid: str, model: str, index: int, text: str, reason: str | None = None
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    return _envelope("text_completion", rid, model, [choice])


def chat_chunk(
    rid: str, model: str, index: int, delta: dict[str, str], reason: str | None = None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return _envelope("chat.completion.chunk", rid, model, [choice])


def usage_chunk(rid: str, model: str, chat: bool, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {**_envelope(kind, rid, model, []), "usage": usage}
