"""``cpmbee build-dataset``: JSONL → an indexed binary dataset (appends a shard if it exists)."""

from __future__ import annotations

import click


@click.command("build-dataset")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Dataset directory.")
@click.option("--name", default=None, help="Shard name (default: shard-NNNNN).")
@click.option(
    "--block-records", default=256, show_default=True, type=click.IntRange(min=1), help="Records per block."
)
@click.option(
    "--shard-records", default=None, type=click.IntRange(min=1), help="Start a new shard every N records."
)
@click.option(
    "--text-key", default="text", show_default=True, help="Key under which plain-text lines are stored."
)
def build_dataset(
    inputs: tuple[str, ...],
    output: str,
    name: str | None,
    block_records: int,
    shard_records: int | None,
    text_key: str,
) -> None:
    """Append INPUTS (JSONL files or directories; one CPM-Bee dict or plain text per line) to a dataset.

    A line that is a JSON object is stored as is; any other line becomes {"text": line}. Jobs reading the
    dataset pick up the new shard at their next block.
    """
    from ..data.tools import build_dataset as run

    try:
        shards = run(
            inputs,
            output,
            name=name,
            block_records=block_records,
            shard_records=shard_records,
            text_key=text_key,
            progress=True,
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    for s in shards:
        click.echo(f"{output}: + {s.name} ({s.records} records, {s.bytes} bytes, {s.blocks} blocks)")
