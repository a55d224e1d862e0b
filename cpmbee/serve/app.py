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

import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the server needs the `serve` extra: pip install 'cpmbee[serve]'") from err

from .. import __version__
from .engine import Engine
from .metrics import CONTENT_TYPE_LATEST
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, GenerateRequest, Limits, error_body
from .service import Service

__all__ = ["create_app"]

ENDPOINTS = frozenset(
    ["/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"]
)


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
    metrics = engine.metrics
    service = Service(engine, limits, request_timeout_s, model_name)
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

    # ------------------------------------------------------------------------------------------ routes
    @app.post("/v1/generate", dependencies=guarded, tags=["cpm-bee"])
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Fill the ``<ans>`` slots of a CPM-Bee input (or a list: one batch); ``stream`` for SSE."""
        return await service.generate(body, request)

    @app.post("/v1/completions", dependencies=guarded, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """OpenAI-compatible text completion: each prompt is ``{"input": prompt, "<ans>": ""}``."""
        return await service.complete(body, request)

    @app.post("/v1/chat/completions", dependencies=guarded, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI-compatible chat: the conversation becomes a CPM-Bee input (docs/serving.md)."""
        return await service.complete(body, request)

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
