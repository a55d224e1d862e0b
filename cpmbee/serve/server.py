"""Loading the model for serving and running the app under uvicorn (what ``cpmbee serve`` calls)."""

from __future__ import annotations

import collections
import logging
import os
import socket
from typing import Any

from ..api import load_model_and_tokenizer
from ..model import CpmBeeForCausalLMBase
from ..web import bind_socket, uvicorn_server
from .engine import Engine
from .metrics import ServeMetrics

__all__ = ["WorkerDied", "describe_model", "load_engine", "run_server"]

log = logging.getLogger("cpmbee.serve")


class WorkerDied(RuntimeError):
    """The generation worker died; ``run_server`` stopped the server (a supervisor should restart it)."""


def describe_model(model: CpmBeeForCausalLMBase) -> dict[str, Any]:
    """Facts about a loaded model for ``/health``: parameters, dtype, placement and quantization."""
    params = list(model.parameters())
    device_map = getattr(model, "hf_device_map", None)
    if device_map:  # dispatched by accelerate: modules per device ("disk" = offloaded)
        placement: dict[str, Any] = dict(collections.Counter(str(v) for v in device_map.values()))
    else:
        placement = {str(p.device): "all" for p in params[:1]}
    embedding = model.get_input_embeddings().weight
    return {
        "parameters": sum(p.numel() for p in params),
        "dtype": str(embedding.dtype).removeprefix("torch."),
        "device": str(embedding.device),
        "placement": placement,
        "quantization": getattr(model.config, "quantization", None),
    }


def load_engine(
    model_path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    memory_limit: str | None = None,
    offload_folder: str | None = None,
    max_queue: int = 64,
    max_batch_rows: int = 16,
    batch_wait_s: float = 0.005,
    compile: bool = False,
    attn_implementation: str | None = None,
) -> tuple[Engine, dict[str, Any]]:
    """Load a model (``None``: the embedded default model) and wrap it in a batching ``Engine``.

    Args:
        quantize: ``"int8"`` or ``"nf4"`` (bitsandbytes, weight-only).
        memory_limit: ``"4GiB"`` or ``"cuda:0=4GiB,cpu=8GiB"``: accelerate places whole transformer blocks on
            the GPUs, then the CPU, then disk (``offload_folder``, a temporary directory by default).
        compile: ``torch.compile`` the decode step, and compile it now (one greedy and one beam request)
            so that no client waits for it.
    Returns:
        The engine (not started) and the facts ``/health`` and ``/v1/models`` report (``demo`` is true for
        the embedded demo model).
    """
    if quantize is not None and memory_limit is not None:
        raise ValueError("quantize and memory_limit cannot be combined; pick one way to fit the model")
    dispatch: dict[str, Any] = {}
    if memory_limit is not None:
        from ..offload import parse_memory_limit

        dispatch = {"max_memory": parse_memory_limit(memory_limit), "offload_folder": offload_folder}
    model, tokenizer = load_model_and_tokenizer(
        model_path,
        device=device,
        dtype=dtype,
        quantize=quantize,
        compile=compile,
        attn_implementation=attn_implementation,
        **dispatch,
    )
    if compile:
        from ..generation import generate

        warm_up = {"input": "warm up", "<ans>": ""}
        generate(model, tokenizer, warm_up, beam_size=1, max_new_tokens=2)  # one row: a graph of its own
        generate(model, tokenizer, warm_up, beam_size=3, max_new_tokens=2)  # several rows: the dynamic graph
    engine = Engine(
        model,
        tokenizer,
        max_queue=max_queue,
        max_batch_rows=max_batch_rows,
        batch_wait_s=batch_wait_s,
        metrics=ServeMetrics(),
    )
    info = describe_model(model)
    info["demo"] = model_path is None
    if memory_limit is not None:
        info["memory_limit"] = memory_limit
    return engine, info


def run_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    *,
    header_timeout_s: float = 10.0,
    max_connections: int | None = 1024,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``app`` (from ``create_app``) with uvicorn until interrupted.

    A connection whose request line and headers take longer than ``header_timeout_s`` is closed; beyond
    ``max_connections`` open connections new requests get 503. ``OSError`` when ``host:port`` cannot be
    listened on (``sock``: a socket already listening, from ``cpmbee.web.bind_socket``, instead of
    ``host``/``port``). Should the generation worker die, the server stops and ``WorkerDied`` is raised
    (``cpmbee serve`` then exits with status 1).
    """
    sock = sock or bind_socket(host, port)
    server = uvicorn_server(
        app,
        header_timeout_s=header_timeout_s,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        limit_concurrency=max_connections,
    )
    engine: Engine | None = getattr(getattr(app, "state", None), "engine", None)
    if engine is not None:

        def stop_serving(err: BaseException) -> None:
            server.should_exit = True  # uvicorn's main loop polls it: a clean shutdown, then we report

        engine.on_fatal = stop_serving
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if engine is not None and engine.failure is not None:
        raise WorkerDied(f"the generation worker died: {engine.failure!r}") from engine.failure
