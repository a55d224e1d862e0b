"""``cpmbee finetune``: full or LoRA fine-tuning on CPM-Bee JSONL (see ``cpmbee.train.finetune``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import click

from ..dtypes import ALIASES_HELP
from ..train.finetune_args import FinetuneArgs
from .options import DTYPE


def _option(f: dataclasses.Field) -> Any:
    """A click option for one ``FinetuneArgs`` field: ``--name`` (``--name/--no-name`` for booleans)."""
    name = "--" + f.name.replace("_", "-")
    kind = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {})
    if isinstance(kind, types.UnionType):  # "X | None": an optional X
        kind = next(a for a in kind.__args__ if a is not type(None))
    required = f.default is dataclasses.MISSING
    default = None if required else f.default
    help_text = f.metadata["help"]
    if kind is bool:
        return click.option(f"{name}/--no-{name[2:]}", default=default, show_default=True, help=help_text)
    choices = f.metadata.get("choices")
    if f.name == "dtype":  # the shared --dtype vocabulary (aliases accepted, canonical names)
        return click.option(
            name, type=DTYPE, default=default, help=f"{help_text.rstrip('.')} ({ALIASES_HELP})."
        )
    return click.option(
        name,
        type=click.Choice(choices) if choices else kind,
        default=default,
        required=required,
        show_default=default is not None,
        help=help_text,
    )


def _with_options(func: Any) -> Any:
    for f in reversed(dataclasses.fields(FinetuneArgs)):
        func = _option(f)(func)
    return func


@click.command(context_settings={"max_content_width": 110, "terminal_width": 110})
@_with_options
def finetune(**options: Any) -> None:
    """Fine-tune CPM-Bee on JSONL data in the CPM-Bee format, fully or with LoRA.

    \b
    One process:   cpmbee finetune --model cpm-bee-1b/ --train train.jsonl --eval eval.jsonl --out runs/ccpm
    Several:       accelerate launch --num_processes 2 -m cpmbee finetune ...   (DDP; CPU: add --multi_gpu)
    Run it again with the same --out to resume from the latest checkpoint.
    """
    from ..train.finetune import run_finetune

    args = FinetuneArgs(**options)
    try:
        summary = run_finetune(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    best = summary.get("best")
    if summary["main_process"]:
        click.echo(
            f"{summary['state']} at step {summary['step']}"
            + (f"; best eval {best['metrics']}" if best else "")
        )
