"""The ``cpmbee`` command. Each subcommand lives in ``cpmbee/commands/<name>.py`` and is imported only when
it runs, so ``cpmbee --help`` stays fast and a missing optional dependency only affects its own command."""

from __future__ import annotations

import importlib
import sys

import click

# name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "build-dataset": "cpmbee.commands.build_dataset:build_dataset",
    "build-vocab": "cpmbee.commands.build_vocab:build_vocab",
    "convert": "cpmbee.commands.convert:convert",
    "dataset": "cpmbee.commands.dataset:dataset",
    "eval": "cpmbee.commands.eval:eval_command",
    "finetune": "cpmbee.commands.finetune:finetune",
    "finetune-data": "cpmbee.commands.finetune_data:finetune_data",
    "generate": "cpmbee.commands.generate:generate",
    "live": "cpmbee.commands.live:live",
    "lm-eval": "cpmbee.commands.lm_eval:lm_eval_command",
    "merge-lora": "cpmbee.commands.merge_lora:merge_lora",
    "prepare-corpus": "cpmbee.commands.prepare_corpus:prepare_corpus",
    "pretrain": "cpmbee.commands.pretrain:pretrain",
    "report": "cpmbee.commands.report:report",
    "serve": "cpmbee.commands.serve:serve",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cpmbee")
def cli() -> None:
    """CPM-Bee models: generate, fine-tune, pre-train (live), serve and convert."""


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="cpmbee")


if __name__ == "__main__":
    main(sys.argv[1:])
