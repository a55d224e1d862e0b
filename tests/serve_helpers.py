"""Helpers of the server tests: a tiny random model, an in-process client, a gate that holds the worker
inside a forward pass, SSE parsing, a real uvicorn server on loopback (for client disconnects and malformed
HTTP, which the in-process client cannot produce) and raw-socket requests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from cpmbee import CpmBeeForCausalLM

from .conftest import random_weights_, tiny_config


@contextlib.contextmanager
def serving(model: Any, tokenizer: Any, **kwargs: Any) -> Iterator[Any]:
    """An in-process ``TestClient`` of ``create_app`` around a new ``Engine``; ``client.engine`` is the engine.
    Engine options (``max_queue``, ``max_batch_rows``, ``batch_wait_s``) and ``create_app``'s mix in
    ``kwargs``."""
    from fastapi.testclient import TestClient

    from cpmbee.serve import Engine, create_app

    engine_kwargs = {k: kwargs.pop(k) for k in ("max_queue", "max_batch_rows", "batch_wait_s") if k in kwargs}
    engine = Engine(model, tokenizer, **engine_kwargs)
    with TestClient(create_app(engine, **kwargs)) as client:
        client.engine = engine
        yield client


def post_json(client: Any, path: str, body: Any, **kwargs: Any) -> Any:
    """POST ``body`` as JSON written by Python's ``json.dumps`` (lone surrogates become ``\\udXXX`` escapes,
    NaN/infinity the ``NaN``/``Infinity`` literals Python's parser takes), which httpx's encoder refuses."""
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return client.post(path, content=json.dumps(body).encode(), headers=headers, **kwargs)


def raw_http(url: str, data: bytes, *, timeout: float = 10.0, then_close: bool = False) -> bytes:
    """Send ``data`` on a new TCP connection to the server at ``url``; the bytes of the first response
    (read to its ``Content-Length``, or until the server closes or ``timeout`` passes), ``b""`` when the
    server closed without answering. ``then_close`` closes the sending side once ``data`` is sent."""
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if then_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and len(body) >= int(value):
                        return received
        return received


def http_status(response: bytes) -> int | None:
    """The status code of a raw HTTP response (None when there is none)."""
    if not response.startswith(b"HTTP/"):
        return None
    return int(response.split(b" ", 2)[1])


def tiny_model(tokenizer: Any, seed: int = 0, **overrides: Any) -> CpmBeeForCausalLM:
    """A tiny random model that takes inputs nested up to the prompt format's full depth (65 buckets)."""
    config = tiny_config(tokenizer.vocab_size, position_bias_num_segment_buckets=65, **overrides)
    return random_weights_(CpmBeeForCausalLM(config), seed=seed).eval()


class Gate:
    """Holds every forward pass of ``model`` until ``open()``; ``entered`` is set once one is waiting."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        self._handle = model.register_forward_pre_hook(self._hold)

    def _hold(self, module: torch.nn.Module, args: tuple) -> None:
        self.entered.set()
        self._open.wait(timeout=30)

    def open(self) -> None:
        self._open.set()
        self._handle.remove()


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """(event, data) pairs of an SSE body; data is JSON-decoded except ``[DONE]``."""
    events = []
    for block in text.strip().split("\n\n"):
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        payload = "\n".join(data)
        events.append((event, payload if payload == "[DONE]" else json.loads(payload)))
    return events


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of Prometheus text (0 when absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any, **options: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free loopback port, configured as ``cpmbee serve`` and
    ``cpmbee live`` configure it (``cpmbee.web.uvicorn_server``; ``options`` go there); yields the base URL."""
    from cpmbee.web import uvicorn_server

    port = free_port()
    options = {"log_level": "warning", "timeout_graceful_shutdown": 1, **options}
    server = uvicorn_server(app, host="127.0.0.1", port=port, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
