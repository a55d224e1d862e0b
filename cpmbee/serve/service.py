"""What the endpoints do between a validated body and the engine: input checks, submission, waiting,
SSE streams, and the OpenAI response shapes. ``app.py`` only routes requests here. Answers are
``JSONBody`` responses: text that is not valid Unicode (a lone surrogate sent as ``\\udc00``) comes back
escaped the same way.

Every request has one deadline, ``request_timeout_s`` after it was routed: encoding its prompts (off the
event loop, refused as soon as a prompt is longer than ``Limits.max_input_tokens``), its wait in the queue
and its generation all count against it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..generation import GenerationOptions
from ..prompt import PromptTooLong, encode_prompt
from ..web import SSE_DONE, JSONBody, sse_event
from . import openai
from .engine import Engine, Job, JobDone, JobFailed, QueueFull, RowDone, TextDelta
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, GenerateRequest, Limits

__all__ = ["Service"]

log = logging.getLogger("cpmbee.serve")
POLL_S = 0.2  # how often a waiting request checks whether its client is still there


class _Gone(Exception):
    """The client disconnected."""


class Service:
    """The request handling of one app: an engine, its limits and the request timeout."""

    def __init__(self, engine: Engine, limits: Limits, request_timeout_s: float, model_name: str) -> None:
        self.engine, self.limits, self.timeout_s = engine, limits, request_timeout_s
        self.model_name = model_name
        self.tokenizer, self.metrics = engine.tokenizer, engine.metrics

    def timed_out(self) -> ApiError:
        return ApiError(504, f"generation did not finish within {self.timeout_s:g} s", kind="timeout_error")

    # ------------------------------------------------------------------------------------------ plumbing
    async def check_prompts(self, rows: list[Any], param: Callable[[int], str], deadline: float) -> list[int]:
        """Encode every input once, off the event loop and before ``deadline``: their lengths, or 422
        naming the bad input (an input over the token limit is refused while it is being counted)."""
        limit, buckets = self.limits.max_input_tokens, self.engine.segment_buckets

        def encode_all() -> list[int]:
            lengths = []
            for i, row in enumerate(rows):
                if time.monotonic() > deadline:
                    raise self.timed_out()
                try:
                    sample = encode_prompt(self.tokenizer, row, max_tokens=limit)
                except PromptTooLong:
                    message = f"{param(i)}: longer than this server's limit of {limit} tokens"
                    raise ApiError(422, message, param=param(i)) from None
                except ValueError as err:
                    raise ApiError(422, f"{param(i)}: {err}", param=param(i)) from None
                if sample.segment_rel.size and int(sample.segment_rel.max()) >= buckets:
                    raise ApiError(422, f"{param(i)}: nested too deeply for this model", param=param(i))
                lengths.append(len(sample))
            return lengths

        try:
            return await asyncio.wait_for(run_in_threadpool(encode_all), deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise self.timed_out() from None

    def submit(self, rows: list[Any], options: GenerationOptions, stream: bool, deadline: float) -> Job:
        """Queue a job: 429 with ``Retry-After`` when the queue is full, 503 when the worker is down."""
        try:
            return self.engine.submit(rows, options, stream, deadline)
        except QueueFull as err:
            headers = {"Retry-After": str(err.retry_after)}
            raise ApiError(429, str(err), kind="rate_limit_error", headers=headers) from None
        except RuntimeError as err:
            raise ApiError(503, str(err), kind="server_error") from None

    async def next_event(self, job: Job, request: Request) -> TextDelta | RowDone | JobDone:
        """The job's next event; ApiError 504 past its deadline (500 if it failed), ``_Gone`` when the client
        left. Either way out cancels the job."""
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                job.cancel()
                raise self.timed_out()
            try:
                item = await asyncio.wait_for(job.events.get(), min(remaining, POLL_S))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise _Gone from None
                continue
            if isinstance(item, JobFailed):
                log.error("generation failed: %r", item.error)
                raise ApiError(500, f"generation failed: {item.error}", kind="server_error")
            if isinstance(item, JobDone) and item.stopped and time.monotonic() >= job.deadline:
                raise self.timed_out()
            return item

    async def wait(self, job: Job, request: Request) -> JobDone:
        """The finished job (non-streaming); 499 if the client left, 504 past the deadline."""
        try:
            while True:
                item = await self.next_event(job, request)
                if isinstance(item, JobDone):
                    if item.stopped:  # cancelled because the client left
                        raise _Gone
                    return item
        except _Gone:
            raise ApiError(499, "client disconnected", kind="client_closed_request") from None

    def stream(
        self,
        job: Job,
        request: Request,
        endpoint: str,
        frames: Callable[[Any], list[bytes]],
        prefix: list[bytes] | None = None,
    ) -> StreamingResponse:
        """SSE: ``prefix``, then ``frames(item)`` per job event; a timeout or failure becomes an ``error``
        event; a client that leaves cancels the job."""

        async def body() -> AsyncIterator[bytes]:
            finished = False
            try:
                for frame in prefix or []:
                    yield frame
                while not finished:
                    try:
                        item = await self.next_event(job, request)
                    except ApiError as err:
                        finished = True
                        reason = "timeout" if err.status == 504 else "internal"
                        self.metrics.errors.labels(endpoint, reason).inc()
                        yield sse_event(err.body(), event="error")
                        return
                    finished = isinstance(item, JobDone)
                    for frame in frames(item):
                        yield frame
            except _Gone:
                pass
            finally:
                if not finished:
                    job.cancel()
                    self.metrics.errors.labels(endpoint, "client_disconnected").inc()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    def count_tokens(self, text: str | None) -> int:
        return len(self.tokenizer.encode(text).ids) if text else 0

    # ------------------------------------------------------------------------------------------ native
    def generation_options(self, body: GenerateRequest) -> GenerationOptions:
        """The request's options with the server's defaults and limits applied (422 naming the field)."""
        limits, options, given = self.limits, body.options.model_dump(), body.options.model_fields_set
        if body.stream and "beam_size" not in given:
            options["beam_size"] = 1  # streaming is greedy or sampled
        if "max_new_tokens" not in given:
            options["max_new_tokens"] = min(options["max_new_tokens"], limits.max_new_tokens)
        try:
            opts = GenerationOptions.parse(options)
        except ValueError as err:
            raise ApiError(422, f"options: {err}", param="options") from None
        if opts.max_new_tokens > limits.max_new_tokens:
            message = f"options.max_new_tokens: at most {limits.max_new_tokens} on this server"
            raise ApiError(422, message, param="options.max_new_tokens")
        if opts.beam_size > limits.max_beam_size or (body.stream and opts.beam_size != 1):
            why = "streaming needs 1" if body.stream else f"at most {limits.max_beam_size} on this server"
            raise ApiError(422, f"options.beam_size: {why}", param="options.beam_size")
        return opts

    async def generate(self, body: GenerateRequest, request: Request) -> Any:
        deadline = time.monotonic() + self.timeout_s
        single = isinstance(body.input, dict)
        rows = [body.input] if single else list(body.input)
        if len(rows) > self.limits.max_rows:
            raise ApiError(422, f"input: at most {self.limits.max_rows} inputs per request", param="input")
        opts = self.generation_options(body)
        await self.check_prompts(rows, lambda i: "input" if single else f"input.{i}", deadline)
        job = self.submit(rows, opts, body.stream, deadline)
        if not body.stream:
            done = await self.wait(job, request)
            return JSONBody({"output": done.results[0] if single else done.results})

        def frames(item: Any) -> list[bytes]:
            if isinstance(item, TextDelta):
                event = {
                    "index": item.index,
                    "answer": item.answer,
                    "path": list(item.path),
                    "text": item.text,
                }
                return [sse_event({**event, "done": False})]
            if isinstance(item, RowDone):
                event = {"index": item.index, "answer": 0, "path": [], "text": ""}
                return [sse_event({**event, "done": True, "result": item.result})]
            return [sse_event({"output": item.results[0] if single else item.results}, event="end")]

        return self.stream(job, request, "/v1/generate", frames)

    # ------------------------------------------------------------------------------------------ OpenAI
    async def complete(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Any:
        """``/v1/completions`` or ``/v1/chat/completions`` (by the body's type)."""
        deadline = time.monotonic() + self.timeout_s
        if isinstance(body, ChatCompletionRequest):
            chat, endpoint, prompt_param = True, "/v1/chat/completions", "messages"
            rows, opts = openai.chat_rows(body, self.limits)
        else:
            chat, endpoint, prompt_param = False, "/v1/completions", "prompt"
            rows, opts = openai.completion_rows(body, self.limits)
        distinct = rows[:: body.n]
        lengths = await self.check_prompts(
            distinct, lambda i: prompt_param if len(distinct) == 1 else f"{prompt_param}.{i}", deadline
        )
        prompt_tokens = sum(lengths)
        rid, model = openai.new_id("chatcmpl" if chat else "cmpl"), self.model_name
        job = self.submit(rows, opts, body.stream, deadline)

        def answer(result: Any) -> str:
            return (result or {}).get("<ans>") or ""

        def usage(completion_tokens: int) -> dict[str, int]:
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }

        if not body.stream:
            answers = [answer(r) for r in (await self.wait(job, request)).results]
            used = [self.count_tokens(a) for a in answers]
            reasons = [openai.finish_reason(u, opts.max_new_tokens) for u in used]
            build = openai.chat_response if chat else openai.completion_response
            return JSONBody(
                build(rid, model, [openai.literal(a) for a in answers], reasons, usage(sum(used)))
            )

        used_total = 0
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        texts = [openai.LiteralStream() for _ in rows]

        def chunk(index: int, text: str, reason: str | None = None) -> bytes:
            if chat:
                return sse_event(
                    openai.chat_chunk(rid, model, index, {"content": text} if text else {}, reason)
                )
            return sse_event(openai.completion_chunk(rid, model, index, text, reason))

        def frames(item: Any) -> list[bytes]:
            nonlocal used_total
            if isinstance(item, TextDelta):
                text = texts[item.index].feed(item.text)
                return [chunk(item.index, text)] if text else []
            if isinstance(item, RowDone):
                used = self.count_tokens(answer(item.result))
                used_total += used
                rest = texts[item.index].flush()
                return [
                    *([chunk(item.index, rest)] if rest else []),
                    chunk(item.index, "", openai.finish_reason(used, opts.max_new_tokens)),
                ]
            tail = (
                [sse_event(openai.usage_chunk(rid, model, chat, usage(used_total)))] if include_usage else []
            )
            return [*tail, SSE_DONE]

        roles = (
            [
                sse_event(openai.chat_chunk(rid, model, i, {"role": "assistant", "content": ""}))
                for i in range(len(rows))
            ]
            if chat
            else None
        )
        return self.stream(job, request, endpoint, frames, prefix=roles)
