"""``cpmbee pretrain``: CPM-Live style pre-training from a YAML run config (``docs/pretrain.md``)."""

from __future__ import annotations

import click
import yaml


@click.command()
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Run config (YAML)."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set train.max_steps=10 (VALUE is read as YAML). Repeatable.",
)
@click.option(
    "--live", is_flag=True, help="Also start the live dashboard (`cpmbee live RUN_DIR`) in the background."
)
def pretrain(config_path: str, overrides: tuple[str, ...], live: bool) -> None:
    """Pre-train (or continue training) a CPM-Bee model; resumes from the run's latest checkpoint.

    One process per rank: `accelerate launch --num_processes 2 -m cpmbee pretrain --config run.yaml`
    (or `torchrun --nproc-per-node 2 -m cpmbee ...`). SIGTERM/Ctrl-C checkpoints and stops cleanly.
    """
    from ..train.pretrain import run_pretrain
    from ..train.pretrain_config import load_pretrain_config

    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        parsed[key.strip()] = yaml.safe_load(value)
    try:
        config = load_pretrain_config(config_path, parsed)
        summary = run_pretrain(config, live=live)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo(
        f"{summary['state']} at step {summary['step']} ({summary['tokens_seen']} tokens): {summary['run_dir']}"
    )
