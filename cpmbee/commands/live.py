"""``cpmbee live``: the live dashboard of a run directory, served on localhost."""

from __future__ import annotations

import click

from .options import HOST


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@HOST
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (0: any free one). Default: 8765, or the next free port after it.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between reads of the run directory.",
)
@click.option(
    "--stale-after",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Show a running job as 'no updates' after this many seconds without a status.json update.",
)
def live(run_dir: str, host: str, port: int | None, poll_interval: float, stale_after: float) -> None:
    """Serve a live web page for the training run in RUN_DIR.

    The page shows loss curves (overall and per task), learning rate, throughput, gradient norm, tokens
    seen and progress against the planned budget with an ETA, the data mixture, checkpoints with their
    generations on the fixed prompts, incidents (loss spikes, NaNs, restarts) with the offending batches,
    parameter/gradient statistics and the run status; it updates as the job writes. It only reads RUN_DIR,
    so it can be started and stopped at any time, also on a finished run. Ctrl-C stops it.

    \b
    Example:
        cpmbee live runs/tiny-ccpm            # then open http://127.0.0.1:8765/
        cpmbee live runs/tiny-ccpm --port 0   # any free port
    """
    try:
        from ..live.server import DEFAULT_PORT, serve
        from ..web import sigterm_as_interrupt
    except ImportError as err:
        raise click.ClickException(str(err)) from err

    def ready(url: str) -> None:
        click.echo(f"cpmbee live: watching {run_dir} at {url}  (Ctrl-C to stop)", err=True)

    try:
        with sigterm_as_interrupt():
            serve(
                run_dir,
                host=host,
                port=DEFAULT_PORT if port is None else port,
                search=20 if port is None else 0,
                poll_interval=poll_interval,
                stale_after_s=stale_after,
                on_ready=ready,
            )
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C (or SIGTERM) it handled once it has shut down
        pass
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo("cpmbee live: stopped", err=True)
