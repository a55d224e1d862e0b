"""An append-able, indexed, binary record store that many processes read in parallel without loading it.

A *dataset* is a directory of immutable *shards* plus an index (layout in ``docs/datasets.md``)::

    DATASET/
      index.jsonl       one JSON line per shard, in order: {"name", "records", "bytes", "block_records", "mask"}
      NAME.rec          the shard's records, UTF-8 JSON, concatenated
      NAME.idx          little-endian uint64 byte offsets of the records, ``records + 1`` entries

Shards are written under a temporary name, fsync'ed and renamed, and only then is the index replaced
(``os.replace`` under a lock file), so a reader never sees a half-written shard and a crash leaves the
dataset as it was. Appending a shard (``ShardWriter``) is how a dataset grows, also while jobs read it.
Readers memory-map the files, so any number of ranks and data-loader workers share the page cache.

Each shard is cut into *blocks* of ``block_records`` consecutive records; blocks are numbered globally in
index order. The block is the unit that is dealt to readers (``owns_block``) and that
``BlockCursor`` walks in a shuffled order, with its records in a shuffled order too; a cursor's position
is a small JSON state, so a job resumes exactly where it stopped.

``BlockCursor`` reads any ``BlockSource``: this format's ``Dataset`` or ``cpmbee.data.original``'s
``OriginalDataset`` (the original CPM-Bee format, read in place); ``open_dataset`` opens either.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..files import atomic_write
from .original import META, OriginalDataset

__all__ = [
    "BlockCursor",
    "BlockSource",
    "Dataset",
    "ShardInfo",
    "ShardWriter",
    "open_dataset",
    "owns_block",
    "read_index",
    "write_index",
]

INDEX = "index.jsonl"
DEFAULT_BLOCK_RECORDS = 256
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ShardInfo:
    """One line of ``index.jsonl``."""

    name: str
    records: int
    bytes: int
    block_records: int = DEFAULT_BLOCK_RECORDS
    mask: bool = False

    @property
    def blocks(self) -> int:
        return -(-self.records // self.block_records)


def read_index(directory: str | os.PathLike) -> list[ShardInfo]:
    """The shards of a dataset directory (``ValueError`` if it is not one)."""
    path = Path(directory) / INDEX
    if not path.is_file():
        hint = (
            f"it is in the original CPM-Bee format ({META}): read it as it is, or convert it with"
            " `cpmbee dataset import-original`"
            if (Path(directory) / META).is_file()
            else "build one with `cpmbee build-dataset`"
        )
        raise ValueError(f"{directory}: not a cpmbee dataset (no {INDEX}); {hint}")
    shards = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                shards.append(ShardInfo(**json.loads(line)))
            except (TypeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}:{n}: malformed shard entry: {err}") from err
    return shards


def write_index(directory: str | os.PathLike, shards: Sequence[ShardInfo]) -> None:
    """Replace the index atomically (readers see the old or the new one, never a torn file)."""
    with atomic_write(Path(directory) / INDEX) as f:
        for s in shards:
            f.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")


@contextlib.contextmanager
def index_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Serialise index updates between processes (``flock`` on ``DATASET/.lock``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class ShardWriter:
    """Append one shard to a dataset (created if needed)::

        with ShardWriter("data/ccpm") as w:
            for record in records:
                w.write(record)

    The shard becomes visible only when the ``with`` block ends without an error; on an error nothing
    is added. ``name`` defaults to the next free ``shard-NNNNN``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        name: str | None = None,
        *,
        block_records: int = DEFAULT_BLOCK_RECORDS,
    ) -> None:
        if block_records < 1:
            raise ValueError(f"block_records must be positive, got {block_records}")
        if name is not None and not _NAME.match(name):
            raise ValueError(f"shard name {name!r} must be letters, digits, '.', '_' or '-'")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.directory / INDEX).exists():
            with index_lock(self.directory):
                if not (self.directory / INDEX).exists():
                    write_index(self.directory, [])
        self.name = name
        self.block_records = block_records
        self._tmp = self.directory / f".writing-{os.getpid()}-{id(self):x}"
        self._rec = open(self._tmp.with_suffix(".rec"), "wb")  # noqa: SIM115 - closed in close()/abort()
        self._offsets = [0]
        self.closed = False

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def write(self, record: Any) -> None:
        """Append one JSON-able record."""
        payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._rec.write(payload)
        self._offsets.append(self._offsets[-1] + len(payload))

    def write_raw(self, payload: bytes) -> None:
        """Append one record that is already encoded JSON (used by the dataset tools)."""
        self._rec.write(payload)
        self._offsets.append(self._offsets[-1] + len(payload))

    def abort(self) -> None:
        self._rec.close()
        for suffix in (".rec", ".idx"):
            self._tmp.with_suffix(suffix).unlink(missing_ok=True)
        self.closed = True

    def close(self) -> ShardInfo:
        """Seal the shard and add it to the index."""
        self._rec.flush()
        os.fsync(self._rec.fileno())
        self._rec.close()
        idx = self._tmp.with_suffix(".idx")
        np.asarray(self._offsets, dtype="<u8").tofile(idx)
        _fsync(idx)
        with index_lock(self.directory):
            shards = read_index(self.directory)
            taken = {s.name for s in shards}
            name = self.name
            if name is None:
                n = len(shards)
                while f"shard-{n:05d}" in taken or (self.directory / f"shard-{n:05d}.rec").exists():
                    n += 1
                name = f"shard-{n:05d}"
            elif name in taken or (self.directory / f"{name}.rec").exists():
                self.abort()
                raise ValueError(f"{self.directory}: a shard named {name!r} already exists")
            os.replace(idx, self.directory / f"{name}.idx")
            os.replace(self._tmp.with_suffix(".rec"), self.directory / f"{name}.rec")
            info = ShardInfo(name, len(self), self._offsets[-1], self.block_records)
            write_index(self.directory, [*shards, info])
        self.closed = True
        return info

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Shard:
    """A memory-mapped shard (opened lazily; the OS pages records in as they are read)."""

    def __init__(self, directory: Path, info: ShardInfo) -> None:
        self.info = info
        self.offsets = np.memmap(directory / f"{info.name}.idx", dtype="<u8", mode="r")
        if self.offsets.shape[0] != info.records + 1:
            raise ValueError(
                f"{directory}/{info.name}.idx has {self.offsets.shape[0] - 1} records, the index says {info.records}"
            )
        with open(directory / f"{info.name}.rec", "rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if info.bytes else b""

    def raw(self, i: int) -> bytes:
        return self.data[int(self.offsets[i]) : int(self.offsets[i + 1])]


class BlockSource(Protocol):
    """What ``BlockCursor`` reads: numbered blocks of records that may grow while being read."""

    directory: Path

    def refresh(self) -> bool: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_records(self) -> int: ...

    def block_available(self, block: int) -> bool: ...

    def block_length(self, block: int) -> int: ...

    def block_record(self, block: int, i: int) -> Any: ...

    def block_record_raw(self, block: int, i: int) -> bytes: ...


class Dataset:
    """Random access to a dataset directory; ``refresh()`` picks up appended shards and mask changes."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.shards: list[ShardInfo] = []
        self.block_starts: list[int] = []  # first global block of each shard
        self._open: dict[str, _Shard] = {}
        self._stamp: tuple[int, int] | None = None
        self.refresh()

    def _index_stamp(self) -> tuple[int, int]:
        st = (self.directory / INDEX).stat()
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> bool:
        """Re-read the index if it changed; returns whether it did. Shards may only be appended or
        (un)masked under a running reader — rewriting existing entries (compaction) needs a restart."""
        try:
            stamp = self._index_stamp()
        except FileNotFoundError as err:
            raise ValueError(f"{self.directory}: not a cpmbee dataset (no {INDEX})") from err
        if stamp == self._stamp:
            return False
        shards = read_index(self.directory)
        for old, new in zip(self.shards, shards):
            if (old.name, old.records, old.block_records) != (new.name, new.records, new.block_records):
                raise ValueError(
                    f"{self.directory}: shard {old.name!r} was replaced while being read "
                    "(compact or shuffle a dataset only while no job reads it)"
                )
        if len(shards) < len(self.shards):
            raise ValueError(f"{self.directory}: shards were removed from the index while being read")
        self.shards = shards
        starts, total = [], 0
        for s in shards:
            starts.append(total)
            total += s.blocks
        self.block_starts = starts
        self._stamp = stamp
        return True

    @property
    def num_blocks(self) -> int:
        return sum(s.blocks for s in self.shards)

    @property
    def num_records(self) -> int:
        """Records in unmasked shards."""
        return sum(s.records for s in self.shards if not s.mask)

    def __len__(self) -> int:
        return self.num_records

    def locate(self, block: int) -> tuple[int, int, int]:
        """``(shard index, first record, number of records)`` of a global block."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range (0..{self.num_blocks - 1})")
        k = int(np.searchsorted(self.block_starts, block, side="right")) - 1
        info = self.shards[k]
        first = (block - self.block_starts[k]) * info.block_records
        return k, first, min(info.block_records, info.records - first)

    def block_available(self, block: int) -> bool:
        """False for blocks of masked shards and of shards whose files have vanished."""
        k, _, _ = self.locate(block)
        info = self.shards[k]
        if info.mask:
            return False
        return info.name in self._open or (self.directory / f"{info.name}.rec").exists()

    def _shard(self, k: int) -> _Shard:
        info = self.shards[k]
        shard = self._open.get(info.name)
        if shard is None:
            shard = self._open[info.name] = _Shard(self.directory, info)
        return shard

    def raw(self, shard: int, i: int) -> bytes:
        return self._shard(shard).raw(i)

    def block_length(self, block: int) -> int:
        return self.locate(block)[2]

    def block_record_raw(self, block: int, i: int) -> bytes:
        """Record ``i`` of a global block, as stored (encoded JSON)."""
        shard, first, _ = self.locate(block)
        return self.raw(shard, first + i)

    def block_record(self, block: int, i: int) -> Any:
        return json.loads(self.block_record_raw(block, i))

    def get(self, shard: int, i: int) -> Any:
        return json.loads(self.raw(shard, i))

    def iter_raw(self, include_masked: bool = False) -> Iterator[bytes]:
        """Every record's encoded JSON, shard by shard, in stored order."""
        for k, info in enumerate(self.shards):
            if info.mask and not include_masked:
                continue
            shard = self._shard(k)
            for i in range(info.records):
                yield shard.raw(i)

    def __iter__(self) -> Iterator[Any]:
        for payload in self.iter_raw():
            yield json.loads(payload)

    def iter_located(self) -> Iterator[tuple[str, Any]]:
        """``(where, record)`` for every record of the unmasked shards, in stored order (``where`` is
        ``DIR/SHARD: record N``, for messages about the record)."""
        for k, info in enumerate(self.shards):
            if not info.mask:
                shard = self._shard(k)
                for i in range(info.records):
                    yield f"{self.directory / info.name}: record {i + 1}", json.loads(shard.raw(i))


def open_dataset(directory: str | os.PathLike) -> Dataset | OriginalDataset:
    """A dataset directory of either format: this package's shards (``index.jsonl``) or the original
    CPM-Bee ``DistributedDataset`` (``meta.bin``, read in place). ``ValueError`` for anything else."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        return Dataset(directory)
    if (directory / META).is_file():
        return OriginalDataset(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such dataset directory")
    raise ValueError(
        f"{directory}: not a dataset (neither {INDEX} nor the original's {META}); build one with"
        " `cpmbee build-dataset`"
    )


def owns_block(block: int, num_blocks: int, stream: int, num_streams: int) -> bool:
    """Whether reader ``stream`` of ``num_streams`` reads global block ``block``.

    Blocks are dealt round-robin (``block % num_streams == stream``). A dataset with fewer blocks than
    readers would leave some with nothing, so then every reader reads block ``stream % num_blocks``
    (records are repeated across readers rather than a rank failing with an empty dataset).
    """
    if num_blocks >= num_streams:
        return block % num_streams == stream
    return block == stream % num_blocks


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class BlockCursor:
    """A resumable reader over the blocks a stream owns, in a shuffled order, for ever (epoch after epoch).

    Block order per epoch and record order inside a block are pure functions of ``(seed, stream, epoch)``
    and ``(seed, block, epoch)``, so the state is just ``{"epoch", "queue", "current"}``: the blocks still
    to read this epoch as ``[block, epoch, position]`` and the block being read. Blocks of shards appended
    while reading join the current epoch; blocks of masked or deleted shards are skipped.
    """

    def __init__(
        self,
        dataset: BlockSource,
        stream: int = 0,
        num_streams: int = 1,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= stream < num_streams:
            raise ValueError(f"stream {stream} is not in 0..{num_streams - 1}")
        self.dataset = dataset
        self.stream = stream
        self.num_streams = num_streams
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.queue: list[list[int]] = []
        self.current: list[int] | None = None  # [block, epoch, position]
        self._order: tuple[tuple[int, int], np.ndarray] | None = None
        self._known_blocks = 0
        self._started = False

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "queue": [list(e) for e in self.queue],
            "current": list(self.current) if self.current else None,
            "known_blocks": self._known_blocks,
            "started": self._started,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.queue = [list(map(int, e)) for e in state["queue"]]
        self.current = list(map(int, state["current"])) if state.get("current") else None
        self._known_blocks = int(state.get("known_blocks", 0))
        self._started = bool(state.get("started", True))

    # --------------------------------------------------------------------------------- reading
    def _mine(self, lo: int, hi: int) -> list[int]:
        n = self.dataset.num_blocks
        return [b for b in range(lo, hi) if owns_block(b, n, self.stream, self.num_streams)]

    def _new_epoch(self) -> None:
        if self._started:
            self.epoch += 1
        self._started = True
        blocks = [b for b in self._mine(0, self.dataset.num_blocks) if self.dataset.block_available(b)]
        if self.shuffle:
            np.random.RandomState(_seed(self.seed, self.stream, self.epoch)).shuffle(blocks)
        self.queue = [[b, self.epoch, 0] for b in blocks]
        self._known_blocks = self.dataset.num_blocks

    def _sync(self) -> None:
        """Pick up appended shards (their blocks join this epoch) and drop masked ones."""
        self.dataset.refresh()
        n = self.dataset.num_blocks
        if n > self._known_blocks and self._started:
            fresh = self._mine(self._known_blocks, n)
            if self.shuffle:
                np.random.RandomState(_seed(self.seed, self.stream, self.epoch, n)).shuffle(fresh)
            self.queue.extend([b, self.epoch, 0] for b in fresh)
        self._known_blocks = max(self._known_blocks, n)
        self.queue = [e for e in self.queue if self.dataset.block_available(e[0])]

    def _record_order(self, block: int, epoch: int, count: int) -> np.ndarray:
        key = (block, epoch)
        if self._order is None or self._order[0] != key or self._order[1].shape[0] != count:
            order = np.arange(count)
            if self.shuffle:
                np.random.RandomState(_seed(self.seed, block, epoch, 1)).shuffle(order)
            self._order = (key, order)
        return self._order[1]

    def _advance(self) -> tuple[int, int]:
        """``(block, record in the block)`` of the next record (``ValueError`` if there is none)."""
        for _ in range(2):
            while self.current is None:
                self._sync()
                if not self.queue:
                    break
                self.current = self.queue.pop(0)
                if not self.dataset.block_available(self.current[0]):
                    self.current = None
            if self.current is not None:
                break
            self._new_epoch()
        if self.current is None:
            raise ValueError(f"{self.dataset.directory}: no readable records (empty or every shard masked)")
        block, epoch, pos = self.current
        count = self.dataset.block_length(block)
        order = self._record_order(block, epoch, count)
        self.current = None if pos + 1 >= count else [block, epoch, pos + 1]
        return block, int(order[pos])

    def next_raw(self) -> bytes:
        """The next record's encoded JSON (``ValueError`` if the stream has no readable block)."""
        return self.dataset.block_record_raw(*self._advance())

    def next(self) -> Any:
        """The next record (``ValueError`` if the stream has no readable block)."""
        return self.dataset.block_record(*self._advance())


def redeal(
    states: Sequence[Mapping[str, Any] | None], num_blocks: int, num_streams: int
) -> list[dict[str, Any]]:
    """Re-shard cursor states for a different number of readers (world size × workers).

    ``states`` are the old cursors in stream order (``None``: a stream that never read). Every unread
    block — the rest of a partly read block keeps its position — goes to its owner among the new
    ``num_streams`` (``owns_block``); blocks already read this epoch stay read; a cursor that never started
    has all its blocks unread. The new cursors start at the highest old epoch. No record is lost or read
    twice within the epoch, but the order of the next blocks differs from the old layout's.
    """
    pending: list[list[int]] = []
    old_streams = len(states)
    for i, s in enumerate(states):
        if s is None or not s.get("started", True):
            pending.extend([b, 0, 0] for b in range(num_blocks) if owns_block(b, num_blocks, i, old_streams))
            continue
        if s.get("current"):
            pending.append(list(s["current"]))
        pending.extend(list(e) for e in s["queue"])
    epoch = max((int(s["epoch"]) for s in states if s is not None), default=0)
    out = []
    for stream in range(num_streams):
        mine = [e for e in pending if owns_block(e[0], num_blocks, stream, num_streams)]
        out.append(
            {"epoch": epoch, "queue": mine, "current": None, "known_blocks": num_blocks, "started": True}
        )
    return out
