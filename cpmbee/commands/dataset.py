"""``cpmbee dataset``: inspect and maintain datasets (info, shuffle, merge, mask, unmask, compact) and import
the original CPM-Bee format (import-original)."""

from __future__ import annotations

import json

import click


def _fail(err: Exception) -> click.ClickException:
    return click.ClickException(str(err))


@click.group()
def dataset() -> None:
    """Dataset tools for `cpmbee build-dataset` directories and original CPM-Bee datasets (docs/datasets.md)."""


@dataset.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def info(path: str) -> None:
    """Print shards (or an original dataset's files), records, bytes and blocks as JSON."""
    from ..data.tools import dataset_info

    try:
        click.echo(json.dumps(dataset_info(path), indent=1))
    except ValueError as err:
        raise _fail(err) from err


@dataset.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--block-records", default=None, type=click.IntRange(min=1), help="Default: as the source.")
@click.option("--shard-records", default=None, type=click.IntRange(min=1))
@click.option("--bucket-mb", default=256, show_default=True, type=click.IntRange(min=1), help="Memory bound.")
def shuffle(
    source: str, target: str, seed: int, block_records: int | None, shard_records: int | None, bucket_mb: int
) -> None:
    """Write SOURCE's records in a random order as new shards of TARGET (external two-pass shuffle)."""
    from ..data.tools import shuffle_dataset

    try:
        shards = shuffle_dataset(
            source,
            target,
            seed=seed,
            block_records=block_records,
            shard_records=shard_records,
            bucket_bytes=bucket_mb << 20,
            progress=True,
        )
    except ValueError as err:
        raise _fail(err) from err
    click.echo(f"{target}: + {', '.join(s.name for s in shards)}")


@dataset.command()
@click.argument("target", type=click.Path(file_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def merge(target: str, sources: tuple[str, ...]) -> None:
    """Copy the shards of SOURCES into TARGET."""
    from ..data.tools import merge_datasets

    try:
        added = merge_datasets(target, sources)
    except ValueError as err:
        raise _fail(err) from err
    click.echo(f"{target}: + {len(added)} shards")


@dataset.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("shards", nargs=-1, required=True)
def mask(path: str, shards: tuple[str, ...]) -> None:
    """Mask SHARDS: running jobs stop reading them at their next block."""
    from ..data.tools import mask_shards

    try:
        click.echo(f"masked {', '.join(mask_shards(path, shards, True))}")
    except ValueError as err:
        raise _fail(err) from err


@dataset.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("shards", nargs=-1, required=True)
def unmask(path: str, shards: tuple[str, ...]) -> None:
    """Unmask SHARDS."""
    from ..data.tools import mask_shards

    try:
        click.echo(f"unmasked {', '.join(mask_shards(path, shards, False))}")
    except ValueError as err:
        raise _fail(err) from err


@dataset.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--delete-masked", is_flag=True, help="Also remove masked shards and delete their files.")
def compact(path: str, delete_masked: bool) -> None:
    """Drop entries of deleted shard files (renumbers blocks: only while no job reads PATH)."""
    from ..data.tools import compact_dataset

    try:
        removed = compact_dataset(path, delete_masked=delete_masked)
    except ValueError as err:
        raise _fail(err) from err
    click.echo(f"removed {', '.join(removed) or 'nothing'}")


@dataset.command("import-original")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--append", is_flag=True, help="Add to TARGET when it is already a dataset.")
@click.option("--block-records", default=256, show_default=True, type=click.IntRange(min=1))
def import_original(source: str, target: str, append: bool, block_records: int) -> None:
    """Convert an original CPM-Bee dataset (meta.bin + data files) into shards of TARGET.

    Records stay identical and in order, one shard per data file; pickled records are read by a
    restricted unpickler that accepts plain data only. A failed import adds nothing to TARGET.
    """
    from ..data.tools import import_original as run_import

    try:
        summary = run_import(source, target, append=append, block_records=block_records, progress=True)
    except ValueError as err:
        raise _fail(err) from err
    for entry in summary:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(entry["serializers"].items())) or "no records"
        masked = " (masked)" if entry["mask"] else ""
        click.echo(
            f"{entry['file']} -> {target}/{entry['shard']}: {entry['records']} records ({kinds}){masked}"
        )
    click.echo(f"{target}: + {sum(e['records'] for e in summary)} records in {len(summary)} shards")
