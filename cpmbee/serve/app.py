"""The HTTP API (FastAPI): native CPM-Bee generation, OpenAI-compatible endpoints, health and metrics.

The routes live on a module-level router and find what they need on ``request.app.state`` (the
``Service``, the engine, the model's name and facts); ``create_app(engine)`` only assembles an app around an
``Engine`` (the batching worker that owns the model), so the server never touches tensors. Endpoints (see
docs/serving.md):

- ``POST /v1/generate`` ``{"input": dict | list, "options": {...}, "stream": bool}``
- ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (OpenAI-compatible)
- ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /openapi.json``, ``GET /docs``

Bad requests get a 4xx whose ``error.param`` names the field; a full queue 429 with ``Retry-After``; a
request that outlives ``request_timeout_s`` 504 (or an ``error`` event when streaming). A client that
disconnects cancels its generation. The middleware (``middleware.py``) checks the Host and Origin, the API
key (before reading the body) and the body's size, arrival time and content type.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware import Middleware
    from fastapi.responses import Response
    from fastapi.security import HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the server needs the `serve` extra: pip install 'cpmbee[serve]'") from err

from .. import __version__
from ..web import JSONBody, RequestGuard
from .engine import Engine
from .metrics import CONTENT_TYPE_LATEST
from .middleware import AuthMiddleware, MetricsMiddleware, RequestBodyMiddleware
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, GenerateRequest, Limits, error_body
from .service import Service

__all__ = ["create_app", "router"]

ENDPOINTS = frozenset(
    ["/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"]
)

# Documents the key in the OpenAPI schema; AuthMiddleware enforces it (before any body is read).
_bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")
router = APIRouter(dependencies=[Depends(_bearer)])


def _service(request: Request) -> Service:
    return request.app.state.service


# ---------------------------------------------------------------------------------------------- routes
@router.post("/v1/generate", tags=["cpm-bee"])
async def generate(body: GenerateRequest, request: Request) -> Any:
    """Fill the ``<ans>`` slots of a CPM-Bee input (or a list: one batch); ``stream`` for SSE."""
    return await _service(request).generate(body, request)


@router.post("/v1/completions", tags=["openai"])
async def completions(body: CompletionRequest, request: Request) -> Any:
    """OpenAI-compatible text completion: each prompt is ``{"input": prompt, "<ans>": ""}``."""
    return await _service(request).complete(body, request)


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """OpenAI-compatible chat: the conversation becomes a CPM-Bee input (docs/serving.md)."""
    return await _service(request).complete(body, request)


@router.get("/v1/models", tags=["openai"])
async def models(request: Request) -> dict[str, Any]:
    """The one model this server runs; ``demo`` tells the embedded demo model (a smoke test)."""
    state = request.app.state
    card = {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "cpmbee"}
    facts = state.model_info
    card["parameters"] = facts.get("parameters")
    card["demo"] = bool(facts.get("demo"))
    if card["demo"]:
        millions = (facts.get("parameters") or 0) / 1e6
        card["description"] = (
            f"the embedded {millions:.1f}M-parameter demo model: a smoke test of the system, not CPM-Bee-10B"
        )
    return {"object": "list", "data": [card]}


@router.get("/health", tags=["operations"])
async def health(request: Request) -> Response:
    """200 while the generation worker runs (503 otherwise), with the queue and the model."""
    state = request.app.state
    engine: Engine = state.engine
    body = {
        "status": "ok" if engine.alive else "unavailable",
        "model": state.model_name,
        "queue_depth": engine.queue_depth,
        "running": engine.running,
        **state.model_info,
    }
    if engine.failure is not None:
        body["error"] = f"the generation worker died: {engine.failure!r}"
    return JSONBody(body, status_code=200 if engine.alive else 503)


@router.get("/metrics", tags=["operations"])
async def prometheus(request: Request) -> Response:
    """Prometheus text format: requests, errors, queue depth, batch sizes, tokens, latencies."""
    return Response(request.app.state.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------- errors
async def _api_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, ApiError)
    return JSONBody(err.body(), status_code=err.status, headers=err.headers)


async def _invalid_body(request: Request, err: Exception) -> Response:
    assert isinstance(err, RequestValidationError)
    problems, params = [], []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"] or ["body"]
        if e.get("type") == "json_invalid":  # loc is the character position
            loc = ["body"]
            e = {**e, "msg": f"invalid JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', '')}"}
        params.append(".".join(loc))
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(message if message.startswith(params[-1]) else f"{params[-1]}: {message}")
    return JSONBody(error_body("; ".join(problems), param=params[0], code=422), status_code=422)


async def _http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, StarletteHTTPException)
    body = error_body(str(err.detail), code=err.status_code)
    return JSONBody(body, status_code=err.status_code, headers=err.headers)


def _guard_error(status: int, message: str, param: str) -> dict[str, Any]:
    return error_body(message, param=param, code=status)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: Engine = app.state.engine
    engine.start()
    try:
        yield
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------------- the app
def create_app(
    engine: Engine,
    *,
    model_name: str = "cpmbee",
    api_key: str | None = None,
    limits: Limits | None = None,
    request_timeout_s: float = 120.0,
    model_info: dict[str, Any] | None = None,
    allowed_hosts: Iterable[str] | None = None,
) -> FastAPI:
    """The app serving ``engine``'s model; the engine's worker starts and stops with the app's lifespan.

    Args:
        model_name: the name reported by ``/v1/models`` and in OpenAI responses.
        api_key: when set (not empty), every path but ``/health`` needs ``Authorization: Bearer <api_key>``.
        limits: body size and time, token and batch limits (``Limits()`` by default).
        request_timeout_s: a request not answered within this time gets 504 and its generation stops.
        model_info: facts shown by ``/health`` and ``/v1/models`` (device, dtype, quantization, ``demo``...).
        allowed_hosts: the accepted ``Host`` names (None: any); ``cpmbee.web.allowed_hosts_for(bind_host)``
            gives the loopback names for a loopback-bound server, against DNS rebinding.
    """
    if api_key is not None and not api_key:
        raise ValueError("api_key: must not be empty (None serves without a key)")
    limits = limits or Limits()
    middleware = [
        Middleware(MetricsMiddleware, metrics=engine.metrics, endpoints=ENDPOINTS),
        Middleware(RequestGuard, allowed_hosts=allowed_hosts, error_body=_guard_error),
        *([Middleware(AuthMiddleware, api_key=api_key)] if api_key is not None else []),
        Middleware(
            RequestBodyMiddleware,
            max_bytes=limits.max_body_bytes,
            timeout_s=limits.body_timeout_s,
            max_buffered=limits.max_buffered_bytes,
        ),
    ]
    app = FastAPI(
        title="cpmbee",
        version=__version__,
        summary="CPM-Bee generation: structured CPM-Bee inputs and OpenAI-compatible endpoints",
        lifespan=_lifespan,
        middleware=middleware,
        default_response_class=JSONBody,
        exception_handlers={
            ApiError: _api_error,
            RequestValidationError: _invalid_body,
            StarletteHTTPException: _http_error,
        },
    )
    app.state.engine = engine
    app.state.service = Service(engine, limits, request_timeout_s, model_name)
    app.state.model_name = model_name
    app.state.model_info = dict(model_info or {})
    app.state.started = int(time.time())
    app.include_router(router)
    return app
