"""``cpmbee serve``: an HTTP server for a CPM-Bee model (native and OpenAI-compatible endpoints)."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from .options import HOST, ModelArgs, model_options


@click.command()
@model_options
@HOST
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one)."
)
@click.option(
    "--api-key",
    envvar="CPMBEE_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on every path but /health (env CPMBEE_API_KEY).",
)
@click.option(
    "--model-name", default=None, help="Name reported to OpenAI clients. Default: the model directory's name."
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Requests that may wait; more get 429.",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Inputs generated together in one batch.",
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long the worker waits for company before starting a batch.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds before a request gets 504 and its generation stops.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Largest max_new_tokens / max_tokens a request may ask for.",
)
@click.option(
    "--max-input-tokens",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Longest prompt (tokens) accepted.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=1 << 20,
    show_default=True,
    help="Largest request body; larger ones get 413.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="Seconds a client has to send its request body; slower ones get 408.",
)
@click.option(
    "--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info"
)
def serve(
    host: str,
    port: int,
    api_key: str | None,
    model_name: str | None,
    max_queue: int,
    max_batch_size: int,
    batch_wait_ms: float,
    request_timeout: float,
    max_new_tokens: int,
    max_input_tokens: int,
    max_body_bytes: int,
    body_timeout: float,
    log_level: str,
    **options: Any,
) -> None:
    """Serve a CPM-Bee model over HTTP with dynamic batching.

    \b
    Endpoints: POST /v1/generate (CPM-Bee inputs), POST /v1/completions and /v1/chat/completions
    (OpenAI-compatible, streaming with "stream": true), GET /v1/models, /health, /metrics, /docs.

    \b
    Examples:
        cpmbee serve                                  # the embedded demo model on 127.0.0.1:8000
        cpmbee serve --model models/cpm-bee-1b --quantize int8 --api-key secret
        cpmbee serve --model models/cpm-bee-10b --memory-limit cuda:0=6GiB,cpu=24GiB
        curl -s localhost:8000/v1/generate -d '{"input": {"input": "今天天气不错", "<ans>": ""}}'
    """
    if api_key is not None and not api_key:
        raise click.BadParameter(
            "must not be empty (leave it out to serve without a key)", param_hint="--api-key"
        )
    try:
        from ..serve import Limits, create_app, load_engine, run_server
        from ..serve.server import WorkerDied
        from ..web import LOOPBACK_HOSTS, allowed_hosts_for, bind_socket, sigterm_as_interrupt
    except ImportError as err:
        raise click.ClickException(str(err)) from err
    if host not in LOOPBACK_HOSTS and not api_key:
        click.echo(
            f"cpmbee serve: warning: listening on {host} without --api-key: anyone who can reach it "
            "can use the model",
            err=True,
        )
    model_args = ModelArgs.pop_from(options)
    try:
        sock = bind_socket(host, port)  # first: a taken port should not wait for the model to load
    except OSError as err:
        raise click.ClickException(str(err)) from err
    try:
        model_args.check()
        loading = {k: v for k, v in dataclasses.asdict(model_args).items() if k != "model"}
        engine, info = load_engine(
            model_args.model,
            **loading,
            max_queue=max_queue,
            max_batch_rows=max_batch_size,
            batch_wait_s=batch_wait_ms / 1000,
        )
    except (OSError, ValueError, ImportError) as err:
        raise click.ClickException(str(err)) from err
    if model_name is None:
        from pathlib import Path

        model_name = Path(model_args.model).resolve().name if model_args.model else "cpmbee-demo"
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_new_tokens=max_new_tokens,
        max_input_tokens=max_input_tokens,
        max_rows=max_batch_size,
        body_timeout_s=body_timeout,
    )
    app = create_app(
        engine,
        model_name=model_name,
        api_key=api_key,
        limits=limits,
        request_timeout_s=request_timeout,
        model_info=info,
        allowed_hosts=allowed_hosts_for(host),
    )
    if info.get("demo"):
        click.echo(
            f"cpmbee serve: no --model: serving the embedded {info['parameters'] / 1e6:.1f}M-parameter demo "
            "model, a smoke test rather than CPM-Bee-10B (docs/embedded-model.md)",
            err=True,
        )
    click.echo(
        f"cpmbee serve: {model_name} ({info['parameters']:,} parameters, {info['dtype']}, "
        f"{info['placement']}) on http://{host}:{sock.getsockname()[1]}/  (docs at /docs; Ctrl-C to stop)",
        err=True,
    )
    try:
        with sigterm_as_interrupt():
            run_server(app, log_level=log_level, sock=sock)
    except WorkerDied as err:
        raise click.ClickException(f"{err}; stopped (restart the server)") from err
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C (or SIGTERM) it handled once it has shut down
        pass
    click.echo("cpmbee serve: stopped", err=True)
