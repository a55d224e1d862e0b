"""``cpmbee finetune-data``: fine-tuning data preparation (``cpmbee finetune-data ccpm RAW OUT``)."""

from __future__ import annotations

import click


@click.group(name="finetune-data")
def finetune_data() -> None:
    """Prepare fine-tuning data (JSONL in the CPM-Bee format) from other formats."""


@finetune_data.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
def ccpm(src: str, dst: str) -> None:
    """Convert a CCPM JSONL file (classical-poetry matching) into CPM-Bee choice samples.

    \b
    SRC lines: {"target": "3", "input": "[翻译]…[0]…[1]…[2]…[3]…[答案]"}
           or  {"translation": "…", "choices": ["…", …], "answer": 3}
    DST lines: {"input": "…", "options": {"<option_0>": "…", …},
                "question": "这段话形容了哪句诗的意境？", "<ans>": "<option_3>"}
    """
    from ..data.ccpm import convert_ccpm_file

    try:
        count = convert_ccpm_file(src, dst)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {count} samples to {dst}")
