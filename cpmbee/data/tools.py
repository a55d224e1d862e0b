"""Dataset tools: build from JSONL, shuffle, merge, mask, compact, describe (``cpmbee build-dataset`` and
``cpmbee dataset …``). All of them leave a dataset valid at every moment: new shards appear only when
complete, and the index is replaced atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..files import copy_file_atomic
from .shards import (
    DEFAULT_BLOCK_RECORDS,
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
            with open(file, encoding="utf-8") as f:
                for line in f:
                    line = line.rstrip("\r\n")
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


def merge_datasets(target: str | os.PathLike, sources: Iterable[str | os.PathLike]) -> list[ShardInfo]:
    """Copy the shards of ``sources`` into ``target`` (names that clash get a ``-N`` suffix)."""
    target = Path(target)
    added: list[ShardInfo] = []
    for source in sources:
        source = Path(source)
        for info in read_index(source):
            with index_lock(target):
                if not (target / "index.jsonl").exists():
                    write_index(target, [])
                shards = read_index(target)
                taken = {s.name for s in shards}
                name, n = info.name, 1
                while name in taken or (target / f"{name}.rec").exists():
                    name, n = f"{info.name}-{n}", n + 1
                for suffix in (".rec", ".idx"):
                    copy_file_atomic(source / f"{info.name}{suffix}", target / f"{name}{suffix}")
                new = ShardInfo(name, info.records, info.bytes, info.block_records, info.mask)
                write_index(target, [*shards, new])
                added.append(new)
    return added


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
    """A summary: shards, records, bytes, blocks (masked shards flagged)."""
    shards = read_index(directory)
    return {
        "path": str(directory),
        "records": sum(s.records for s in shards if not s.mask),
        "bytes": sum(s.bytes for s in shards if not s.mask),
        "blocks": sum(s.blocks for s in shards),
        "shards": [{**s.__dict__, "blocks": s.blocks} for s in shards],
    }
