"""HTTP pieces shared by ``cpmbee serve`` and the live dashboard (``cpmbee live``).

- ``RequestGuard``: the ``Host`` check against DNS rebinding and the refusal of state-changing requests
  sent by a web page of another origin (cross-site request forgery);
- ``json_bytes`` / ``JSONBody`` / ``sse_event``: JSON and Server-Sent Events that never fail on text that is
  not valid Unicode (a lone UTF-16 surrogate is written as its JSON escape ``\\udc00``);
- ``sigterm_as_interrupt``: SIGTERM stops a command's server as Ctrl-C does (a clean exit);
- ``bind_socket``: the listening socket, bound before the server starts, so a taken port is a clear
  ``OSError`` (and ``cpmbee live`` can try the next ports);
- ``uvicorn_server``: a uvicorn server whose HTTP/1.1 protocol limits the time a request's line and
  headers may take (``h11_protocol``), so a client that trickles them (slowloris) cannot hold a connection
  for ever.

Needs Starlette (both the ``serve`` and the ``live`` extras have it); uvicorn only for ``uvicorn_server``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

__all__ = [
    "LOOPBACK_HOSTS",
    "SSE_DONE",
    "JSONBody",
    "RequestGuard",
    "allowed_hosts_for",
    "bind_socket",
    "h11_protocol",
    "json_bytes",
    "send_json",
    "sigterm_as_interrupt",
    "sse_event",
    "uvicorn_server",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorBody = Callable[[int, str, str], Any]
"""``(status, message, param) -> JSON body`` of an app's errors."""

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# ------------------------------------------------------------------------------------------------ JSON & SSE
def json_bytes(data: Any, *, separators: tuple[str, str] = (",", ":")) -> bytes:
    """``data`` as UTF-8 JSON. Lone surrogates (which JSON's ``\\u`` escapes can carry into Python strings)
    come out as the same escapes instead of failing the encoding; NaN and infinities are refused."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=separators)
    # Only a lone surrogate cannot be encoded, and only inside a JSON string, where "\udXXX" is its escape.
    return text.encode("utf-8", "backslashreplace")


class JSONBody(JSONResponse):
    """Starlette's JSON response, encoded with ``json_bytes``."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


SSE_DONE = b"data: [DONE]\n\n"
"""The OpenAI streams' last event."""


def sse_event(data: Any, *, event: str | None = None, id: int | None = None) -> bytes:
    """One Server-Sent Event carrying ``data`` as JSON (JSON never holds a raw line break, so one
    ``data:`` line is the whole payload)."""
    head = (f"id: {id}\n" if id is not None else "") + (f"event: {event}\n" if event else "")
    return head.encode() + b"data: " + json_bytes(data, separators=(", ", ": ")) + b"\n\n"


async def send_json(send: Send, status: int, body: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
    """Answer a request from ASGI middleware with a JSON body."""
    payload = json_bytes(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


# ------------------------------------------------------------------------------------------------ guard
def allowed_hosts_for(bind_host: str) -> list[str] | None:
    """The ``Host`` names a server bound to ``bind_host`` accepts: the loopback names when it listens on
    loopback only (a web page elsewhere cannot reach it through DNS rebinding), any name otherwise."""
    return list(LOOPBACK_HOSTS) if bind_host in LOOPBACK_HOSTS else None


def _host_name(host: str) -> str:
    """``Host`` header → its name without the port (``[::1]:8000`` → ``::1``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """Pure ASGI middleware refusing:

    - a ``Host`` header that is not one of ``allowed_hosts`` (when given): 400;
    - a request other than GET/HEAD/OPTIONS that a browser sent from a page of another origin: 403. The
      browser says so in ``Sec-Fetch-Site`` (``cross-site``/``same-site``; a page cannot forge it, and it
      stays right behind a reverse proxy that rewrites ``Host``); browsers too old to send it are judged by
      ``Origin`` against ``Host``. Clients that are not browsers (curl, SDKs) send neither and pass.

    Errors are JSON bodies made by ``error_body(status, message, param)``.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str] | None, error_body: ErrorBody) -> None:
        self.app, self.error_body = app, error_body
        self.allowed = None if allowed_hosts is None else frozenset(_host_name(h) for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host") or ""
        if self.allowed is not None and _host_name(host) not in self.allowed:
            message = (
                f"Host: {host!r} is not a name of this server (allowed: {', '.join(sorted(self.allowed))})"
            )
            await send_json(send, 400, self.error_body(400, message, "Host"))
            return
        if scope.get("method", "GET") not in SAFE_METHODS:
            problem = self._cross_origin(scope, host)
            if problem:
                await send_json(send, 403, self.error_body(403, problem, "Origin"))
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _cross_origin(scope: Scope, host: str) -> str | None:
        site = _header(scope, b"sec-fetch-site")
        if site is not None:
            if site.lower() in ("same-origin", "none"):
                return None
            return f"Sec-Fetch-Site: {site}: requests from other web sites are refused"
        origin = _header(scope, b"origin")
        if origin is not None:
            netloc = urlsplit(origin).netloc if origin.lower() != "null" else ""
            if netloc.lower() != host.strip().lower():
                return f"Origin: {origin!r} is not this server ({host!r}): requests from other web sites are refused"
        return None


# ------------------------------------------------------------------------------------------------ uvicorn
def bind_socket(host: str, port: int, *, search: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port``; with ``search`` > 0 the next ports are tried when it is taken
    (port 0 picks any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for candidate in range(port, port + search + 1) if port else [0]:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as err:
            sock.close()
            last = err
            continue
        sock.listen(2048)  # uvicorn's backlog
        sock.set_inheritable(True)
        return sock
    raise OSError(
        f"port: cannot listen on {host}:{port}" + (f"..{port + search}" if search else "") + f" ({last})"
    )


def h11_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol class, closing a connection whose request line and headers are not complete
    ``header_timeout_s`` after it opened (or after its previous response). Bodies have their own limit in
    the app; uvicorn itself times out only idle keep-alive connections."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


def uvicorn_server(
    app: Any, *, header_timeout_s: float = 10.0, on_exit: Callable[[], None] | None = None, **options: Any
) -> Any:
    """``uvicorn.Server(uvicorn.Config(app, **options))`` speaking HTTP/1.1 through
    ``h11_protocol(header_timeout_s)``; ``on_exit()`` runs when a shutdown signal arrives, before uvicorn
    starts its graceful shutdown (to end long-lived streams, say)."""
    try:
        import uvicorn
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("serving needs uvicorn: pip install 'cpmbee[serve]' (or 'cpmbee[live]')") from err

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_exit is not None:
                on_exit()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, http=h11_protocol(header_timeout_s), **options))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within this block SIGTERM ends like Ctrl-C. uvicorn shuts down gracefully on either signal and then
    raises it again for the previous handler: SIGINT arrives as ``KeyboardInterrupt``, and so, with this,
    does SIGTERM (what ``timeout``, systemd and Kubernetes send), which the commands treat as a clean stop
    instead of dying by the signal. Only in the main thread (elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
