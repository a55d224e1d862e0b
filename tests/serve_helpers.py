"""Helpers of the server tests: a tiny random model, a gate that holds the worker inside a forward pass,
SSE parsing and a real uvicorn server on loopback (for client disconnects, which the in-process client
cannot produce)."""

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
def live_server(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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
