"""The live dashboard's web server: one static page, a JSON API and a Server-Sent Events stream.

A background task polls the run directory (``RunState.refresh``, which reads only appended bytes) every
``poll_interval`` seconds and pushes what changed to every connected page. A page first loads
``/api/snapshot`` (which carries the last record number, ``seq``) and then listens to
``/api/stream?after=<seq>``; a page that reconnects gets the records it missed, or a ``reset`` event when
they are no longer kept, after which it reloads the snapshot.

API (all JSON unless said otherwise):

- ``GET /api/snapshot[?max_points=N]`` everything the page draws; series downsampled to N points
- ``GET /api/stream[?after=SEQ]`` ``text/event-stream``: ``records`` ({seq, records, eta}), ``status``
  ({status, eta, run?}), ``reset`` events
- ``GET /api/status`` run status (``status.json`` plus the derived state and its age)
- ``GET /api/inspect?stat=norm[&groups=REGEX&limit=16]`` history of one parameter statistic
- ``GET /api/incidents/NAME`` a file of ``incidents/`` (e.g. the raw samples of a loss-spike batch)
- ``GET /api/reports`` the log days and their report files
- ``GET /reports/DAY[?format=md]`` the daily report of DAY, rebuilt from the records (HTML or Markdown)
- ``POST /api/reports/DAY`` (re)write ``reports/daily-DAY.md`` and ``.html`` (keeping the comment)

Needs the ``live`` extra (Starlette, uvicorn, markdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "The live dashboard needs the `live` extra (Starlette, uvicorn, markdown): pip install 'cpmbee[live]'"
    ) from err

from ..web import JSONBody, RequestGuard, allowed_hosts_for, bind_socket, sse_event, uvicorn_server
from . import report
from .state import INSPECT_STATS, RunState, jsonable, match_groups

__all__ = ["DEFAULT_PORT", "LiveHub", "bind_socket", "create_app", "serve"]

STATIC = Path(__file__).parent / "static"
DEFAULT_PORT = 8765
_HEARTBEAT_S = 15.0


class LiveHub:
    """Owns the run state and the subscribers' queues; ``tick()`` polls once and fans out the news."""

    def __init__(self, state: RunState, queue_size: int = 1000) -> None:
        self.state = state
        self.queue_size = queue_size
        self.subscribers: set[asyncio.Queue[tuple[str, dict[str, Any]] | None]] = set()
        self.closing = False  # set (from any thread) when the server shuts down: streams end within a second

    def subscribe(self) -> asyncio.Queue[tuple[str, dict[str, Any]] | None]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue(self.queue_size)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Any]) -> None:
        self.subscribers.discard(queue)

    def publish(self, message: tuple[str, dict[str, Any]] | None) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # a stalled client: drop it; its page reconnects and resyncs
                self.subscribers.discard(queue)

    def status_message(self, with_run: bool = False) -> dict[str, Any]:
        message = {"status": self.state.status(), "eta": self.state.eta()}
        if with_run:
            message["run"] = self.state.run_info
        return jsonable(message)

    def tick(self, *, initial: bool = False) -> None:
        update = self.state.refresh(collect=not initial)
        if update.records:
            self.publish(
                (
                    "records",
                    jsonable({"seq": self.state.seq, "records": update.records, "eta": self.state.eta()}),
                )
            )
        if update.status_changed or update.run_changed:
            self.publish(("status", self.status_message(with_run=update.run_changed)))


def _error(status: int, message: str) -> JSONBody:
    return JSONBody({"error": message}, status_code=status)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name}: must be between {low} and {high}, got {value}")
    return value


def _hub(request: Request) -> LiveHub:
    return request.app.state.hub


# ------------------------------------------------------------------------------------------------ routes
async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def snapshot(request: Request) -> Response:
    try:
        points = _int_param(request, "max_points", request.app.state.max_points, 10, 1_000_000)
    except ValueError as err:
        return _error(400, str(err))
    return JSONBody(_hub(request).state.snapshot(points))


async def status(request: Request) -> Response:
    return JSONBody(_hub(request).status_message(with_run=True))


async def stream(request: Request) -> Response:
    hub = _hub(request)
    try:
        after = _int_param(request, "after", hub.state.seq, 0, 2**62)
    except ValueError as err:
        return _error(400, str(err))
    return StreamingResponse(
        _events(hub, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(hub: LiveHub, after: int) -> AsyncIterator[bytes]:
    """The event stream of one page: what it missed after record ``after``, the status, then the news."""
    queue = hub.subscribe()
    sent = after
    try:
        yield b"retry: 2000\n\n"
        backlog = hub.state.records_after(after)
        if backlog is None:
            yield sse_event({"reason": f"records after {after} are no longer kept"}, event="reset")
            return
        if backlog:
            sent = backlog[-1]["seq"]
            payload = jsonable({"seq": sent, "records": backlog, "eta": hub.state.eta()})
            yield sse_event(payload, event="records", id=sent)
        yield sse_event(hub.status_message(with_run=True), event="status")
        idle = 0.0
        while not hub.closing:
            try:
                message = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                idle += 1.0
                if idle >= _HEARTBEAT_S:  # keeps proxies and the browser from timing out
                    idle = 0.0
                    yield b": ping\n\n"
                continue
            idle = 0.0
            if message is None:  # server shutting down
                return
            kind, data = message
            if kind == "records":
                fresh = [r for r in data["records"] if r["seq"] > sent]
                if not fresh:
                    continue
                sent = fresh[-1]["seq"]
                yield sse_event({**data, "records": fresh}, event=kind, id=sent)
            else:
                yield sse_event(data, event=kind)
    finally:
        hub.unsubscribe(queue)


async def inspect(request: Request) -> Response:
    hub = _hub(request)
    stat = request.query_params.get("stat", "norm")
    known = {s for stats in hub.state.inspect.values() for s in stats} | set(INSPECT_STATS)
    if stat not in known:
        return _error(400, f"stat: unknown statistic {stat!r}; one of {sorted(known)}")
    try:
        limit = _int_param(request, "limit", 16, 1, 200)
        points = _int_param(request, "max_points", 500, 10, 100_000)
        # a user's regular expression runs off the event loop, under a time limit
        names = sorted(hub.state.inspect)
        matched = await run_in_threadpool(match_groups, request.query_params.get("groups"), names)
        data = hub.state.inspect_series(stat, limit=limit, max_points=points, matched=matched)
    except ValueError as err:
        return _error(400, str(err))
    return JSONBody(data)


async def incident(request: Request) -> Response:
    try:
        return JSONBody(_hub(request).state.incident_detail(request.path_params["name"]))
    except ValueError as err:
        return _error(400, str(err))
    except FileNotFoundError as err:
        return _error(404, str(err))


async def reports(request: Request) -> Response:
    run_dir = request.app.state.run_dir
    days = sorted(set(report.available_days(run_dir)) | set(report.reported_days(run_dir)))
    out = []
    for day in days:
        md_path, html_path = report.report_paths(run_dir, day)
        out.append({"day": day, "markdown": md_path.is_file(), "html": html_path.is_file()})
    return JSONBody({"utc_offset_hours": report.run_offset(run_dir), "days": out})


async def show_report(request: Request) -> Response:
    run_dir = request.app.state.run_dir
    day = request.path_params["day"]
    fmt = request.query_params.get("format", "html")
    if fmt not in ("html", "md"):
        return _error(400, f"format: expected html or md, got {fmt!r}")
    try:
        summary, text = report.build_report(run_dir, day)
    except ValueError as err:
        return _error(400, str(err))
    if summary.empty and day not in report.reported_days(run_dir):
        return _error(404, f"day: no records on {day}")
    if fmt == "md":
        return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
    return HTMLResponse(report.render_html(text, f"Training log {day}: {summary.run_name}"))


async def write_report(request: Request) -> Response:
    run_dir = request.app.state.run_dir
    try:
        written = report.write_report(run_dir, request.path_params["day"])
    except ValueError as err:
        return _error(404 if "no records" in str(err) else 400, str(err))
    return JSONBody({"written": [str(p.relative_to(run_dir)) for p in written]})


async def favicon(request: Request) -> Response:
    return Response(status_code=204)


ROUTES = [
    Route("/", index),
    Route("/favicon.ico", favicon),
    Route("/api/snapshot", snapshot),
    Route("/api/status", status),
    Route("/api/stream", stream),
    Route("/api/inspect", inspect),
    Route("/api/incidents/{name}", incident),
    Route("/api/reports", reports),
    Route("/api/reports/{day}", write_report, methods=["POST"]),
    Route("/reports/{day}", show_report),
    Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
]


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    """Read the whole run once before serving, then poll it every ``poll_interval`` seconds."""
    hub: LiveHub = app.state.hub
    hub.tick(initial=True)

    async def poll() -> None:
        while True:
            await asyncio.sleep(app.state.poll_interval)
            try:
                hub.tick()
            except Exception as err:  # keep serving whatever happens to the files
                print(f"cpmbee live: reading {app.state.run_dir} failed: {err!r}")

    task = asyncio.create_task(poll())
    try:
        yield
    finally:
        task.cancel()
        hub.publish(None)


def create_app(
    run_dir: str | os.PathLike,
    *,
    poll_interval: float = 1.0,
    stale_after_s: float = 60.0,
    max_points: int = 2000,
    allowed_hosts: Iterable[str] | None = None,
) -> Starlette:
    """The dashboard app for one run directory (which need not contain anything yet).

    ``allowed_hosts``: accepted ``Host`` names (None: any); ``serve`` limits a loopback-bound server to the
    loopback names, so a web page elsewhere cannot read the run through DNS rebinding. Whatever the host,
    a POST sent by a page of another origin is refused (403), so no web site can rewrite the reports.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir: {run_dir} is not a directory")
    if poll_interval <= 0:
        raise ValueError(f"poll_interval: must be positive, got {poll_interval}")
    guard = Middleware(RequestGuard, allowed_hosts=allowed_hosts, error_body=_guard_error)
    app = Starlette(routes=ROUTES, lifespan=_lifespan, middleware=[guard])
    app.state.hub = LiveHub(RunState(run_dir, stale_after_s=stale_after_s))
    app.state.run_dir, app.state.poll_interval, app.state.max_points = run_dir, poll_interval, max_points
    return app


def _guard_error(status: int, message: str, param: str) -> dict[str, Any]:
    return {"error": message}


def serve(
    run_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    search: int = 0,
    poll_interval: float = 1.0,
    stale_after_s: float = 60.0,
    on_ready: Any = None,
) -> None:
    """Serve the dashboard until interrupted. ``on_ready(url)`` is called once the socket listens."""
    app = create_app(
        run_dir,
        poll_interval=poll_interval,
        stale_after_s=stale_after_s,
        allowed_hosts=allowed_hosts_for(host),
    )
    sock = bind_socket(host, port, search=search)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if on_ready is not None:
        on_ready(f"http://{shown}:{bound_port}/")
    hub: LiveHub = app.state.hub

    def end_streams() -> None:
        hub.closing = True  # end the event streams so shutdown does not wait for the pages

    server = uvicorn_server(
        app, on_exit=end_streams, log_level="warning", timeout_graceful_shutdown=3, access_log=False
    )
    server.run(sockets=[sock])
