"""Dataset tools: build from JSONL, import the original CPM-Bee format, shuffle, merge, mask, compact,
describe (``cpmbee build-dataset`` and ``cpmbee dataset …``). All of them leave a dataset valid at every
moment: new shards appear only when complete, and the index is replaced atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..files import copy_file_atomic
from .jsonl import iter_text_lines
from .original import META, OriginalDataset, encode_json
from .shards import (
    _NAME,
    DEFAULT_BLOCK_RECORDS,
    INDEX,
    Dataset,
    ShardInfo,
    ShardWriter,
    index_lock,
    read_index,
    write_index,
)

__all__ = [
    "build_dataset",
    "compact_dataset",
    "dataset_info",
    "import_original",
    "iter_jsonl_records",
    "mask_shards",
    "merge_datasets",
    "shuffle_dataset",
]


def iter_jsonl_records(paths: Iterable[str | os.PathLike], *, text_key: str = "text") -> Iterator[Any]:
    """Records of JSONL files: a line that parses as a JSON object is taken as is; any other line is plain
    text and becomes ``{text_key: line}``. Blank lines are skipped. A directory means its ``*.jsonl``,
    ``*.json`` and ``*.txt`` files, sorted."""
    for path in paths:
        path = Path(path)
        files = (
            sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".txt") and p.is_file())
            if path.is_dir()
            else [path]
        )
        for file in files:
            for _, line in iter_text_lines(file):
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError:
                        value = None
                    if isinstance(value, dict):
                        yield value
                        continue
                yield {text_key: line}


def build_dataset(
    inputs: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    name: str | None = None,
    block_records: int = DEFAULT_BLOCK_RECORDS,
    shard_records: int | None = None,
    text_key: str = "text",
    progress: bool = False,
) -> list[ShardInfo]:
    """Append JSONL input(s) to the dataset at ``output`` (created if needed) as one or more new shards.

    ``shard_records`` caps the records per shard (default: one shard). Returns the shards written.
    """
    from tqdm.auto import tqdm

    written: list[ShardInfo] = []
    writer: ShardWriter | None = None
    part = 0

    def open_writer() -> ShardWriter:
        nonlocal part
        shard_name = None if name is None else (name if shard_records is None else f"{name}-{part:05d}")
        part += 1
        return ShardWriter(output, shard_name, block_records=block_records)

    records = iter_jsonl_records(inputs, text_key=text_key)
    try:
        for record in tqdm(records, unit=" records", disable=not progress):
            if writer is None:
                writer = open_writer()
            writer.write(record)
            if shard_records is not None and len(writer) >= shard_records:
                written.append(writer.close())
                writer = None
        if writer is not None:
            written.append(writer.close())
            writer = None
    finally:
        if writer is not None and not writer.closed:
            writer.abort()
    return written


def shuffle_dataset(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    seed: int = 0,
    block_records: int | None = None,
    shard_records: int | None = None,
    bucket_bytes: int = 256 << 20,
    progress: bool = False,
) -> list[ShardInfo]:
    """Write the unmasked records of ``source`` in a random order as new shards of ``target``.

    Two passes, memory bounded by ``bucket_bytes``: records are scattered into temporary bucket files at
    random, then each bucket is shuffled in memory and written out.
    """
    from tqdm.auto import tqdm

    src = Dataset(source)
    total_bytes = sum(s.bytes for s in src.shards if not s.mask)
    buckets = max(1, -(-total_bytes // bucket_bytes))
    rng = np.random.RandomState(seed)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp_dir = target / f".shuffle-{os.getpid()}"
    tmp_dir.mkdir()
    try:
        files = [open(tmp_dir / f"{i}.bin", "wb") for i in range(buckets)]  # noqa: SIM115 - closed below
        try:
            for payload in tqdm(src.iter_raw(), total=src.num_records, disable=not progress, desc="scatter"):
                f = files[int(rng.randint(buckets))]
                f.write(len(payload).to_bytes(8, "little"))
                f.write(payload)
        finally:
            for f in files:
                f.close()
        block = block_records or (src.shards[0].block_records if src.shards else DEFAULT_BLOCK_RECORDS)
        written: list[ShardInfo] = []
        writer = ShardWriter(target, block_records=block)
        try:
            for i in range(buckets):
                data = (tmp_dir / f"{i}.bin").read_bytes()
                items, pos = [], 0
                while pos < len(data):
                    n = int.from_bytes(data[pos : pos + 8], "little")
                    items.append(data[pos + 8 : pos + 8 + n])
                    pos += 8 + n
                for j in rng.permutation(len(items)):
                    writer.write_raw(items[j])
                    if shard_records is not None and len(writer) >= shard_records:
                        written.append(writer.close())
                        writer = ShardWriter(target, block_records=block)
            if len(writer) or not written:
                written.append(writer.close())
            else:
                writer.abort()
        except BaseException:
            if not writer.closed:
                writer.abort()
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return written


def mask_shards(directory: str | os.PathLike, names: Iterable[str], mask: bool = True) -> list[str]:
    """Mask (or unmask) shards by name; running readers skip masked shards from their next block on."""
    wanted = set(names)
    with index_lock(directory):
        shards = read_index(directory)
        unknown = wanted - {s.name for s in shards}
        if unknown:
            raise ValueError(
                f"{directory}: no shard named {sorted(unknown)}; shards: {[s.name for s in shards]}"
            )
        for s in shards:
            if s.name in wanted:
                s.mask = mask
        write_index(directory, shards)
    return sorted(wanted)


def _add_shards(
    target: Path, source: Path, shards: Iterable[ShardInfo], *, move: bool = False
) -> list[ShardInfo]:
    """Copy (or, on one file system, ``move``) shards of the dataset at ``source`` into ``target`` and add
    them to its index in one atomic replacement; names that clash get a ``-N`` suffix."""
    with index_lock(target):
        if not (target / INDEX).exists():
            write_index(target, [])
        existing = read_index(target)
        taken = {s.name for s in existing}
        added: list[ShardInfo] = []
        for info in shards:
            name, n = info.name, 1
            while name in taken or (target / f"{name}.rec").exists():
                name, n = f"{info.name}-{n}", n + 1
            taken.add(name)
            for suffix in (".rec", ".idx"):
                if move:
                    os.replace(source / f"{info.name}{suffix}", target / f"{name}{suffix}")
                else:
                    copy_file_atomic(source / f"{info.name}{suffix}", target / f"{name}{suffix}")
            added.append(ShardInfo(name, info.records, info.bytes, info.block_records, info.mask))
        write_index(target, [*existing, *added])
    return added


def merge_datasets(target: str | os.PathLike, sources: Iterable[str | os.PathLike]) -> list[ShardInfo]:
    """Copy the shards of ``sources`` into ``target`` (names that clash get a ``-N`` suffix)."""
    target = Path(target)
    added: list[ShardInfo] = []
    for source in sources:
        source = Path(source)
        added += _add_shards(target, source, read_index(source))
    return added


def import_original(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    append: bool = False,
    block_records: int = DEFAULT_BLOCK_RECORDS,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Convert an original CPM-Bee dataset (``meta.bin`` + data files) into shards of ``target``.

    Each data file becomes one shard named after it (masked files stay masked), its records identical and
    in order. Pickled records go through ``cpmbee.data.original``'s restricted unpickler; every record is
    checked, and the counts against ``meta.bin``. The shards are written to a staging directory inside
    ``target`` and added to its index in one step, so a failed import adds nothing. ``target`` must not
    be a dataset yet unless ``append``. Returns one summary per file: name, shard, records, serializers.
    """
    from tqdm.auto import tqdm

    src = OriginalDataset(source)
    if not src.files:
        raise ValueError(f"{source}/{META} lists no data files")
    target = Path(target)
    if not append and target.exists() and any(target.iterdir()):
        what = "a dataset" if (target / INDEX).exists() else "not empty"
        raise ValueError(f"{target} is {what}: pass --append (append=True) to add to a dataset")
    if append and target.exists() and not (target / INDEX).exists() and any(target.iterdir()):
        raise ValueError(f"{target}: not a cpmbee dataset (no {INDEX}) and not empty")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f".import-{os.getpid()}"
    summary: list[dict[str, Any]] = []
    staged: list[ShardInfo] = []
    bar = tqdm(total=sum(f.records for f in src.files), unit=" records", disable=None if progress else True)
    try:
        for k, info in enumerate(src.files):
            bar.set_postfix_str(info.name)
            kinds: dict[str, int] = {}
            name = info.name if _NAME.match(info.name) else f"shard-{k:05d}"
            writer = ShardWriter(staging, name, block_records=block_records)
            try:
                for value, kind in src.iter_file(k):
                    writer.write_raw(encode_json(value))
                    kinds[kind] = kinds.get(kind, 0) + 1
                    bar.update()
            except BaseException:
                writer.abort()
                raise
            shard = writer.close()
            shard.mask = info.mask
            staged.append(shard)
            summary.append(
                {"file": info.name, "records": shard.records, "serializers": kinds, "mask": info.mask}
            )
        added = _add_shards(target, staging, staged, move=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # only if nothing else appeared in it meanwhile
                target.rmdir()
        raise
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    for entry, shard in zip(summary, added):
        entry["shard"] = shard.name
    return summary


def compact_dataset(directory: str | os.PathLike, *, delete_masked: bool = False) -> list[str]:
    """Drop index entries whose files are gone (and, with ``delete_masked``, masked shards and their files).

    This renumbers blocks, so run it only while no job reads the dataset (a running reader stops with a
    clear error). Returns the names removed.
    """
    directory = Path(directory)
    with index_lock(directory):
        shards = read_index(directory)
        keep, removed = [], []
        for s in shards:
            present = (directory / f"{s.name}.rec").exists() and (directory / f"{s.name}.idx").exists()
            if not present or (delete_masked and s.mask):
                removed.append(s.name)
            else:
                keep.append(s)
        write_index(directory, keep)
    if delete_masked:
        for name in removed:
            for suffix in (".rec", ".idx"):
                (directory / f"{name}{suffix}").unlink(missing_ok=True)
    return removed


def dataset_info(directory: str | os.PathLike) -> dict[str, Any]:
    """A summary: shards, records, bytes, blocks (masked shards flagged); for an original CPM-Bee
    dataset its files (``OriginalDataset.describe``)."""
    if not (Path(directory) / INDEX).is_file() and (Path(directory) / META).is_file():
        return OriginalDataset(directory).describe()
    shards = read_index(directory)
    return {
        "path": str(directory),
        "format": "cpmbee shards",
        "records": sum(s.records for s in shards if not s.mask),
        "bytes": sum(s.bytes for s in shards if not s.mask),
        "blocks": sum(s.blocks for s in shards),
        "shards": [{**s.__dict__, "blocks": s.blocks} for s in shards],
    }
