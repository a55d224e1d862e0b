"""The HTTP API (FastAPI): native CPM-Bee generation, OpenAI-compatible endpoints, health and metrics.

``create_app(engine)`` wires the routes to an ``Engine`` (the batching worker that owns the model); the
server never touches tensors. Endpoints (see docs/serving.md):

- ``POST /v1/generate`` ``{"input": dict | list, "options": {...}, "stream": bool}``
- ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (OpenAI-compatible)
- ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /openapi.json``, ``GET /docs``

Bad requests get a 4xx whose ``error.param`` names the field; a full queue 429 with ``Retry-After``; a
request that outlives ``request_timeout_s`` 504 (or an ``error`` event when streaming). A client that
disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the server needs the `serve` extra: pip install 'cpmbee[serve]'") from err

from .. import __version__
from ..generation import GenerationOptions
from ..prompt import encode_prompt
from . import openai
from .engine import Engine, Job, JobDone, JobFailed, QueueFull, RowDone, TextDelta
from .metrics import CONTENT_TYPE_LATEST
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, GenerateRequest, Limits, error_body

__all__ = ["create_app"]

log = logging.getLogger("cpmbee.serve")
POLL_S = 0.2  # how often a waiting request checks whether its client is still there
ENDPOINTS = frozenset(
    ["/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"]
)


class _Gone(Exception):
    """The client disconnected."""


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _next_event(job: Job, request: Request, timeout_s: float) -> TextDelta | RowDone | JobDone:
    """The job's next event; ApiError 504 past its deadline, ``_Gone`` when the client left."""
    while True:
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            job.cancel()
            raise ApiError(504, f"generation did not finish within {timeout_s:g} s", kind="timeout_error")
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
            raise ApiError(504, f"generation did not finish within {timeout_s:g} s", kind="timeout_error")
        return item


def create_app(
    engine: Engine,
    *,
    model_name: str = "cpmbee",
    api_key: str | None = None,
    limits: Limits | None = None,
    request_timeout_s: float = 120.0,
    model_info: dict[str, Any] | None = None,
) -> FastAPI:
    """The app serving ``engine``'s model; the engine's worker starts and stops with the app's lifespan.

    Args:
        model_name: the name reported by ``/v1/models`` and in OpenAI responses.
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <api_key>``.
        limits: body size, token and batch limits (``Limits()`` by default).
        request_timeout_s: a request not answered within this time gets 504 and its generation stops.
        model_info: extra facts shown by ``/health`` (device, dtype, quantization, ...).
    """
    limits = limits or Limits()
    metrics, tokenizer = engine.metrics, engine.tokenizer
    segment_buckets = engine.model.config.position_bias_num_segment_buckets
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="cpmbee",
        version=__version__,
        summary="CPM-Bee generation: structured CPM-Bee inputs and OpenAI-compatible endpoints",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=ENDPOINTS)

    # ------------------------------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> Response:
        problems, params = [], []
        for e in err.errors():
            loc = [str(p) for p in e.get("loc", ()) if p != "body"] or ["body"]
            if e.get("type") == "json_invalid":  # loc is the character position
                loc = ["body"]
                e = {
                    **e,
                    "msg": f"invalid JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', '')}",
                }
            params.append(".".join(loc))
            message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(message if message.startswith(params[-1]) else f"{params[-1]}: {message}")
        return JSONResponse(error_body("; ".join(problems), param=params[0], code=422), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        return JSONResponse(
            error_body(str(err.detail), code=err.status_code),
            status_code=err.status_code,
            headers=err.headers,
        )

    # ------------------------------------------------------------------------------------------ auth
    bearer = Depends(HTTPBearer(auto_error=False, description="the server's --api-key, when it has one"))

    async def authorize(credentials: HTTPAuthorizationCredentials | None = bearer) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(
                401,
                "Authorization: missing or wrong API key (send 'Authorization: Bearer <key>')",
                param="Authorization",
                kind="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    guarded = [Depends(authorize)]

    # ------------------------------------------------------------------------------------------ helpers
    async def check_prompts(rows: list[Any], param: Callable[[int], str]) -> list[int]:
        """Encode every input once (off the event loop): 422 naming the input if it cannot be generated."""

        def encode_all() -> list[int]:
            lengths = []
            for i, row in enumerate(rows):
                try:
                    sample = encode_prompt(tokenizer, row)
                except ValueError as err:
                    raise ApiError(422, f"{param(i)}: {err}", param=param(i)) from None
                length = len(sample)
                if sample.segment_rel.size and int(sample.segment_rel.max()) >= segment_buckets:
                    raise ApiError(422, f"{param(i)}: nested too deeply for this model", param=param(i))
                if length > limits.max_input_tokens:
                    raise ApiError(
                        422,
                        f"{param(i)}: {length} tokens, more than this server's {limits.max_input_tokens}",
                        param=param(i),
                    )
                lengths.append(length)
            return lengths

        return await run_in_threadpool(encode_all)

    def submit(rows: list[Any], options: GenerationOptions, stream: bool) -> Job:
        job = Job(
            rows,
            options,
            stream,
            deadline=time.monotonic() + request_timeout_s,
            loop=asyncio.get_running_loop(),
        )
        try:
            return engine.submit(job)
        except QueueFull as err:
            raise ApiError(
                429, str(err), kind="rate_limit_error", headers={"Retry-After": str(err.retry_after)}
            ) from None
        except RuntimeError as err:
            raise ApiError(503, str(err), kind="server_error") from None

    async def wait(job: Job, request: Request) -> JobDone:
        try:
            while True:
                item = await _next_event(job, request, request_timeout_s)
                if isinstance(item, JobDone):
                    if item.stopped:  # cancelled because the client left
                        raise _Gone
                    return item
        except _Gone:
            raise ApiError(499, "client disconnected", kind="client_closed_request") from None

    def stream_response(
        job: Job,
        request: Request,
        endpoint: str,
        frames: Callable[[Any], list[str]],
        prefix: list[str] | None = None,
    ) -> StreamingResponse:
        """SSE: ``prefix``, then ``frames(item)`` per job event; errors become an ``error`` event; a client that
        leaves cancels the job."""

        async def body() -> AsyncIterator[str]:
            finished = False
            try:
                for frame in prefix or []:
                    yield frame
                while not finished:
                    try:
                        item = await _next_event(job, request, request_timeout_s)
                    except ApiError as err:
                        finished = True
                        metrics.errors.labels(endpoint, "timeout" if err.status == 504 else "internal").inc()
                        yield _sse(err.body(), event="error")
                        return
                    finished = isinstance(item, JobDone)
                    for frame in frames(item):
                        yield frame
            except _Gone:
                pass
            finally:
                if not finished:
                    job.cancel()
                    metrics.errors.labels(endpoint, "client_disconnected").inc()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def completion_tokens(text: str | None) -> int:
        return len(tokenizer.encode(text).ids) if text else 0

    # ------------------------------------------------------------------------------------------ routes
    @app.post("/v1/generate", dependencies=guarded, tags=["cpm-bee"])
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Fill the ``<ans>`` slots of a CPM-Bee input (or a list: one batch); ``stream`` for SSE."""
        single = isinstance(body.input, dict)
        rows = [body.input] if single else list(body.input)
        if len(rows) > limits.max_rows:
            raise ApiError(422, f"input: at most {limits.max_rows} inputs per request", param="input")
        options = body.options.model_dump()
        given = body.options.model_fields_set
        if body.stream and "beam_size" not in given:
            options["beam_size"] = 1
        if "max_new_tokens" not in given:
            options["max_new_tokens"] = min(options["max_new_tokens"], limits.max_new_tokens)
        try:
            opts = GenerationOptions.parse(options)
        except ValueError as err:
            raise ApiError(422, f"options: {err}", param="options") from None
        if opts.max_new_tokens > limits.max_new_tokens:
            raise ApiError(
                422,
                f"options.max_new_tokens: at most {limits.max_new_tokens} on this server",
                param="options.max_new_tokens",
            )
        if opts.beam_size > limits.max_beam_size or (body.stream and opts.beam_size != 1):
            why = "streaming needs 1" if body.stream else f"at most {limits.max_beam_size} on this server"
            raise ApiError(422, f"options.beam_size: {why}", param="options.beam_size")
        await check_prompts(rows, lambda i: "input" if single else f"input.{i}")
        job = submit(rows, opts, body.stream)
        if not body.stream:
            done = await wait(job, request)
            return {"output": done.results[0] if single else done.results}

        def frames(item: Any) -> list[str]:
            if isinstance(item, TextDelta):
                return [
                    _sse(
                        {
                            "index": item.index,
                            "answer": item.answer,
                            "path": list(item.path),
                            "text": item.text,
                            "done": False,
                        }
                    )
                ]
            if isinstance(item, RowDone):
                return [
                    _sse(
                        {
                            "index": item.index,
                            "answer": 0,
                            "path": [],
                            "text": "",
                            "done": True,
                            "result": item.result,
                        }
                    )
                ]
            return [_sse({"output": item.results[0] if single else item.results}, event="end")]

        return stream_response(job, request, "/v1/generate", frames)

    def answers(results: list[Any]) -> list[str]:
        return [(r or {}).get("<ans>") or "" for r in results]

    async def openai_call(
        request: Request,
        endpoint: str,
        rows: list[dict[str, Any]],
        opts: GenerationOptions,
        n: int,
        stream: bool,
        include_usage: bool,
        prompt_param: str,
        chat: bool,
    ) -> Any:
        distinct = rows[::n]
        lengths = await check_prompts(
            distinct, lambda i: prompt_param if len(distinct) == 1 else f"{prompt_param}.{i}"
        )
        prompt_tokens = sum(lengths)
        rid = openai.new_id("chatcmpl" if chat else "cmpl")
        job = submit(rows, opts, stream)
        if not stream:
            texts = answers((await wait(job, request)).results)
            used = [completion_tokens(t) for t in texts]
            reasons = [openai.finish_reason(u, opts.max_new_tokens) for u in used]
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": sum(used),
                "total_tokens": prompt_tokens + sum(used),
            }
            build = openai.chat_response if chat else openai.completion_response
            return build(rid, model_name, texts, reasons, usage)

        used_total = 0

        def chunk(index: int, text: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return _sse(openai.chat_chunk(rid, model_name, index, delta, reason))
            return _sse(openai.completion_chunk(rid, model_name, index, text or "", reason))

        def frames(item: Any) -> list[str]:
            nonlocal used_total
            if isinstance(item, TextDelta):
                return [chunk(item.index, item.text)]
            if isinstance(item, RowDone):
                used = completion_tokens(answers([item.result])[0])
                used_total += used
                return [chunk(item.index, None, openai.finish_reason(used, opts.max_new_tokens))]
            out = []
            if include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": used_total,
                    "total_tokens": prompt_tokens + used_total,
                }
                kind = "chat.completion.chunk" if chat else "text_completion"
                out.append(
                    _sse(
                        {
                            "id": rid,
                            "object": kind,
                            "created": int(time.time()),
                            "model": model_name,
                            "choices": [],
                            "usage": usage,
                        }
                    )
                )
            return [*out, "data: [DONE]\n\n"]

        roles = [chunk(i, None, role=True) for i in range(len(rows))] if chat else None
        return stream_response(job, request, endpoint, frames, prefix=roles)

    @app.post("/v1/completions", dependencies=guarded, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI-compatible text completion: each prompt is ``{"input": prompt, "<ans>": ""}``."""
        rows, opts = openai.completion_rows(body, limits)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await openai_call(
            request, "/v1/completions", rows, opts, body.n, body.stream, include_usage, "prompt", chat=False
        )

    @app.post("/v1/chat/completions", dependencies=guarded, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI-compatible chat: the conversation becomes a CPM-Bee input (docs/serving.md)."""
        rows, opts = openai.chat_rows(body, limits)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await openai_call(
            request,
            "/v1/chat/completions",
            rows,
            opts,
            body.n,
            body.stream,
            include_usage,
            "messages",
            chat=True,
        )

    @app.get("/v1/models", dependencies=guarded, tags=["openai"])
    async def models() -> dict[str, Any]:
        """The one model this server runs."""
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "cpmbee"}],
        }

    @app.get("/health", tags=["operations"])
    async def health() -> Response:
        """200 while the generation worker runs (503 otherwise), with the queue and the model."""
        body = {
            "status": "ok" if engine.alive else "unavailable",
            "model": model_name,
            "queue_depth": engine.queue_depth,
            "running": engine.running,
            **(model_info or {}),
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics", dependencies=guarded, tags=["operations"])
    async def prometheus() -> Response:
        """Prometheus text format: requests, errors, queue depth, batch sizes, tokens, latencies."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
