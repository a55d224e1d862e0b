"""ASGI middleware of the server, outermost first (``app.py`` stacks them):

1. ``MetricsMiddleware``: counts every response by endpoint and status (a client that leaves before the
   answer is a 499, not a 500) and times it to its last byte;
2. ``cpmbee.web.RequestGuard``: the ``Host`` check and the refusal of cross-site browser requests;
3. ``AuthMiddleware``: the API key, checked on the headers, before any body is read;
4. ``RequestBodyMiddleware``: reads the body within a size limit (413), a time limit (408) and a budget of
   bytes held across all requests (503), and makes JSON the content type when a client did not say
   (``curl -d`` sends ``application/x-www-form-urlencoded``); other content types get 415.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from ..web import ASGIApp, Message, Receive, Scope, Send, send_json
from .metrics import ServeMetrics
from .protocol import error_body

__all__ = ["AuthMiddleware", "MetricsMiddleware", "RequestBodyMiddleware"]

# Content types a JSON body may arrive with: curl's -d default, a bare text/plain, or none at all.
_TAKEN_AS_JSON = ("", "application/x-www-form-urlencoded", "text/plain")
_READS_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def _error(status: int, message: str, param: str | None) -> dict:
    return error_body(message, param=param, code=status)


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it to its last byte (streams included).
    Paths outside ``endpoints`` are counted as ``"other"`` so random URLs cannot grow the label set. A
    request whose client disconnected before any response is counted as 499 (``client_disconnected``)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, endpoints: frozenset[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        started = time.monotonic()
        status: int | None = None
        disconnected = False

        async def watch_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def watch_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, watch_receive, watch_send)
        except Exception:
            status = status or 500
            raise
        finally:
            if status is None:  # nothing was answered: the client left (else it is a bug, so 500)
                status = 499 if disconnected else 500
            self.metrics.observe_response(endpoint, status, time.monotonic() - started)


class AuthMiddleware:
    """``Authorization: Bearer <api_key>`` on every path but ``open_paths``, checked before the body is read
    (so an unauthenticated client cannot make the server hold its upload). 401 otherwise."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = frozenset({"/health"})
    ) -> None:
        if not api_key:
            raise ValueError("api_key: must not be empty (leave it unset to serve without a key)")
        self.app, self.key, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                given = token.strip() if scheme.lower() == b"bearer" else b""
        if secrets.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        message = "Authorization: missing or wrong API key (send 'Authorization: Bearer <key>')"
        await send_json(
            send,
            401,
            error_body(message, param="Authorization", kind="authentication_error", code=401),
            headers=[("WWW-Authenticate", "Bearer")],
        )


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or []


class RequestBodyMiddleware:
    """Reads request bodies for the app, within limits, and replays them; later ``receive`` calls go to the
    server, so a disconnect is still seen.

    - larger than ``max_bytes``: 413 (on ``Content-Length`` at once, else while reading);
    - not complete ``timeout_s`` after the request arrived: 408;
    - more than ``max_buffered`` bytes held by all requests in the app at once: 503 with ``Retry-After``;
    - a content type other than JSON, form-encoded, ``text/plain`` or none: 415. The accepted ones are
      passed on as ``application/json``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        timeout_s: float,
        max_buffered: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app, self.max_bytes, self.timeout_s, self.max_buffered = app, max_bytes, timeout_s, max_buffered
        self.clock = clock
        self.buffered = 0  # bytes of bodies held right now (one event loop: no lock needed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _READS_NO_BODY:
            await self.app(scope, receive, send)
            return
        held = 0  # bytes of this body counted in self.buffered
        try:
            try:
                headers = self._json_headers(scope)
                chunks: list[bytes] = []
                deadline = self.clock() + self.timeout_s
                while True:
                    message = await self._receive_by(receive, deadline)
                    if message["type"] == "http.disconnect":
                        return  # the client left: nothing to answer
                    chunk = message.get("body", b"")
                    if held + len(chunk) > self.max_bytes:
                        raise _Refused(413, f"body: larger than the limit of {self.max_bytes} bytes", "body")
                    if self.buffered + len(chunk) > self.max_buffered:
                        busy = "the server holds too many request bodies right now; retry shortly"
                        raise _Refused(503, busy, "body", [("Retry-After", "1")])
                    held += len(chunk)
                    self.buffered += len(chunk)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
            except _Refused as no:
                await send_json(send, no.status, _error(no.status, no.message, no.param), no.headers)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            await self.app({**scope, "headers": headers}, replay, send)
        finally:
            self.buffered -= held

    async def _receive_by(self, receive: Receive, deadline: float) -> Message:
        try:
            return await asyncio.wait_for(receive(), timeout=max(deadline - self.clock(), 0.0))
        except asyncio.TimeoutError:
            late = f"body: not received within {self.timeout_s:g} s"
            raise _Refused(408, late, "body", [("Connection", "close")]) from None

    def _json_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The request's headers with a JSON content type; ``_Refused`` for another type or a bad or too
        large ``Content-Length``."""
        headers = []
        content_type = ""
        for name, value in scope.get("headers", ()):
            if name == b"content-type":
                content_type = value.decode("latin-1")
                continue
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise _Refused(400, "Content-Length: not an integer", "Content-Length") from None
                if declared > self.max_bytes:
                    raise _Refused(413, f"body: larger than the limit of {self.max_bytes} bytes", "body")
            headers.append((name, value))
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in _TAKEN_AS_JSON and media != "application/json" and not media.endswith("+json"):
            raise _Refused(
                415,
                f"Content-Type: {content_type!r} is not JSON; send the body as application/json",
                "Content-Type",
            )
        headers.append((b"content-type", b"application/json"))
        return headers
