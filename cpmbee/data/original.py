"""The original CPM-Bee ``DistributedDataset`` format: read it directly (read-only) and safely.

Datasets written by the original tools (``build_dataset.py``, ``preprocess_dataset.py``) are directories::

    DIR/
      meta.bin    one JSON object per data file, in order: {"file_name", "block_begin", "block_end",
                  "nbytes", "nlines", "mask", "block_size"}; blocks are numbered globally and the files'
                  ranges [block_begin, block_end) follow each other from 0
      FILE        (block_end - block_begin) blocks of block_size bytes (16 MiB by default). In a block,
                  records follow each other as 0x1F, the payload length (uint32, little-endian) and the
                  payload; a 0x00 byte ends the block and zeros pad it. A record never crosses blocks.

``nlines`` counts a file's records and ``nbytes`` their length fields and payloads (4 + length each).
A payload is a pickle (the original's default) or UTF-8 JSON; the kind is detected from the payload.

Safety: pickles are never given to ``pickle.loads``. ``PlainUnpickler`` refuses every global (so nothing
is imported, called or built but plain data), a scan of the opcodes first refuses memo indices that would
make the unpickler allocate huge tables, and the result must be plain data (dict, list, tuple, str, bytes,
int, float, bool, None). A record that breaks any rule stops reading with a ``ValueError`` naming the file,
the block and the record.

``OriginalDataset`` offers the block interface of ``cpmbee.data.shards.Dataset`` (blocks are the
original's blocks), so a mixture entry, ``BlockCursor`` and the pipeline read either format alike: the
same block dealing, resumable positions, and live growth (``meta.bin`` re-read when it changes).
Records are handed out as JSON values, exactly as they would be after ``cpmbee dataset import-original``.
"""

from __future__ import annotations

import bisect
import io
import json
import mmap
import os
import pickle
import pickletools
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "META",
    "OriginalDataset",
    "OriginalFile",
    "OriginalWriter",
    "PlainUnpickler",
    "UnsafeRecordError",
    "decode_payload",
    "read_meta",
]

META = "meta.bin"
RECORD_MARK = 0x1F
END_MARK = 0x00
_HEADER = struct.Struct("<I")
_PLAIN_TYPES = "dict, list, tuple, str, bytes, int, float, bool, None"
_CACHED_BLOCKS = 8


# ---------------------------------------------------------------------------------------------- meta.bin
@dataclass(frozen=True)
class OriginalFile:
    """One line of ``meta.bin``: a data file and its global block range."""

    name: str
    block_begin: int
    block_end: int
    nbytes: int
    records: int  # the original's "nlines"
    mask: bool
    block_size: int

    @property
    def blocks(self) -> int:
        return self.block_end - self.block_begin

    @property
    def size(self) -> int:
        """The file's length in bytes (whole blocks)."""
        return self.blocks * self.block_size


def _meta_int(entry: dict[str, Any], key: str, where: str, minimum: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def read_meta(directory: str | os.PathLike) -> list[OriginalFile]:
    """The data files listed in ``DIR/meta.bin``, checked for consistency (``ValueError`` naming the line)."""
    path = Path(directory) / META
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"{directory}: not an original CPM-Bee dataset (no {META})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); is this a meta.bin?") from None
    files: list[OriginalFile] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"{where}: file_name must be the name of a file in {directory}, got {name!r}")
        mask = entry.get("mask", False)
        if not isinstance(mask, bool):
            raise ValueError(f"{where}: mask must be true or false, got {mask!r}")
        info = OriginalFile(
            name=name,
            block_begin=_meta_int(entry, "block_begin", where, 0),
            block_end=_meta_int(entry, "block_end", where, 0),
            nbytes=_meta_int(entry, "nbytes", where, 0),
            records=_meta_int(entry, "nlines", where, 0),
            mask=mask,
            block_size=_meta_int(entry, "block_size", where, 6),
        )
        expected_begin = files[-1].block_end if files else 0
        if info.block_begin != expected_begin:
            raise ValueError(
                f"{where}: {name} starts at block {info.block_begin}, expected {expected_begin}"
                " (block ranges must follow each other from 0)"
            )
        if info.blocks < 1:
            raise ValueError(
                f"{where}: {name} has block_end {info.block_end} <= block_begin {info.block_begin}"
            )
        if any(f.name == name for f in files):
            raise ValueError(f"{where}: {name} is listed twice")
        files.append(info)
    return files


# ---------------------------------------------------------------------------------------------- payloads
class UnsafeRecordError(ValueError):
    """A record that is refused for what it holds (not plain data), as opposed to a malformed one."""


class _Refused(pickle.UnpicklingError):
    pass


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only: it refuses every global and persistent id, so a pickle
    can neither import nor call anything (no ``os.system``, no ``builtins.eval``, no class instances)."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"it would import {module}.{name}; only plain data ({_PLAIN_TYPES}) is accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it refers to an external (persistent) object; only plain data is accepted")


# How each opcode's argument is laid out, from pickletools' opcode descriptions: (argument size or
# pickletools' code for a variable-length kind, is a memo put with an explicit index, is MEMOIZE, is STOP).
_TWO_LINES = -9
_OPCODES: list[tuple[int, bool, bool, bool] | None] = [None] * 256
for _op in pickletools.opcodes:
    _size = 0 if _op.arg is None else (_TWO_LINES if _op.arg.name == "stringnl_noescape_pair" else _op.arg.n)
    _OPCODES[_op.code.encode("latin-1")[0]] = (
        _size,
        _op.name in ("PUT", "BINPUT", "LONG_BINPUT"),
        _op.name == "MEMOIZE",
        _op.name == "STOP",
    )
_INT4 = struct.Struct("<i")
_UINT8 = struct.Struct("<Q")


def _check_opcodes(payload: bytes) -> None:
    """Walk the opcodes (skipping their arguments, decoding nothing) and refuse memo indices that are out
    of line before the C unpickler sees them: an index of 2**32 would make it allocate and clear a table
    of 32 GiB. ``pickle.dumps`` numbers memo entries 0, 1, 2, … in order (or uses MEMOIZE)."""
    pos, puts, end = 0, 0, len(payload)
    while pos < end:
        entry = _OPCODES[payload[pos]]
        if entry is None:
            raise ValueError(f"unknown opcode 0x{payload[pos]:02x} at byte {pos}")
        pos += 1
        size, put, memoize, stop = entry
        index = None
        if size == 0:
            if stop:
                return
            puts += memoize
            continue
        if size > 0:
            if put:
                index = int.from_bytes(payload[pos : pos + size], "little")
            pos += size
        elif size == pickletools.TAKEN_FROM_ARGUMENT1:
            pos += 1 + payload[pos]
        elif size == pickletools.TAKEN_FROM_ARGUMENT4U:
            pos += 4 + _HEADER.unpack_from(payload, pos)[0]
        elif size == pickletools.TAKEN_FROM_ARGUMENT4:
            length = _INT4.unpack_from(payload, pos)[0]
            if length < 0:
                raise ValueError(f"negative length at byte {pos}")
            pos += 4 + length
        elif size == pickletools.TAKEN_FROM_ARGUMENT8U:
            pos += 8 + _UINT8.unpack_from(payload, pos)[0]
        elif size == pickletools.UP_TO_NEWLINE:
            newline = payload.index(b"\n", pos)
            if put:
                index = int(payload[pos:newline])
            pos = newline + 1
        else:  # _TWO_LINES
            pos = payload.index(b"\n", payload.index(b"\n", pos) + 1) + 1
        if put:
            if index is None or index > puts:
                raise _Refused(f"memo index {index} is out of sequence (a crafted pickle)")
            puts += 1
    raise ValueError("no STOP opcode (truncated)")


_LEAVES = frozenset({str, int, float, bool, type(None)})


def _check_plain(value: Any, budget: int) -> bool:
    """Raise unless ``value`` is plain data that JSON can hold; returns whether it holds tuples. ``budget``
    bounds the values visited (a pickle can reference one list from many places, or from itself, and
    blow up when expanded)."""
    if type(value) in _LEAVES:
        return False
    stack: list[tuple[Any, str]] = [(value, "")]
    tuples = False
    while stack:
        item, where = stack.pop()
        kind = type(item)
        if kind is dict:
            budget -= 1 + len(item)
            for key, child in item.items():
                if type(key) is not str:
                    raise UnsafeRecordError(
                        f"the dict at {where or 'the top'} has a {type(key).__name__} key {key!r};"
                        " records must be JSON (string keys)"
                    )
                if type(child) not in _LEAVES:
                    stack.append((child, f"{where}[{key!r}]"))
        elif kind is list or kind is tuple:
            budget -= 1 + len(item)
            tuples = tuples or kind is tuple
            for i, child in enumerate(item):
                if type(child) not in _LEAVES:
                    stack.append((child, f"{where}[{i}]"))
        elif kind is bytes:
            raise UnsafeRecordError(
                f"it holds bytes at {where or 'the top'}; records must be JSON (text, numbers, lists, dicts)"
            )
        else:
            raise UnsafeRecordError(
                f"it holds a {kind.__name__} at {where or 'the top'}; only plain data ({_PLAIN_TYPES}) is accepted"
            )
        if budget < 0:
            raise UnsafeRecordError("it expands to too many values (a recursive or heavily shared structure)")
    return tuples


def load_pickle(payload: bytes) -> Any:
    """A pickled record as a JSON value (tuples become lists), executing nothing; ``UnsafeRecordError``
    for a refused record, ``ValueError`` for a malformed one."""
    try:
        _check_opcodes(payload)
        value = PlainUnpickler(io.BytesIO(payload)).load()
    except _Refused as err:
        raise UnsafeRecordError(f"refused pickle: {err}") from None
    except Exception as err:  # a malformed pickle: UnpicklingError, ValueError, EOFError, KeyError, ...
        raise ValueError(f"not a valid pickle ({type(err).__name__}: {err})") from None
    try:
        tuples = _check_plain(value, budget=4 * len(payload) + 64)
    except UnsafeRecordError as err:
        raise UnsafeRecordError(f"refused pickle: {err}") from None
    return json.loads(json.dumps(value, ensure_ascii=False)) if tuples else value


def decode_payload(payload: bytes) -> tuple[Any, str]:
    """``(JSON value, "pickle" | "json")`` of one record's payload; the kind is detected, not configured.

    Pickles of protocol 2 and up start with the PROTO opcode (0x80), which no UTF-8 JSON text does; other
    payloads are read as JSON, then as an old-protocol pickle. Tuples become lists, as in JSON."""
    try:
        if payload[:1] == b"\x80":
            return load_pickle(payload), "pickle"
        try:
            return json.loads(payload.decode("utf-8")), "json"
        except (UnicodeDecodeError, json.JSONDecodeError) as json_error:
            try:
                value = load_pickle(payload)
            except UnsafeRecordError:
                raise
            except ValueError:
                detail = (
                    f"not UTF-8 (byte {json_error.start})"
                    if isinstance(json_error, UnicodeDecodeError)
                    else json_error.msg
                )
                raise ValueError(f"neither JSON ({detail}) nor a pickle") from None
            return value, "pickle"
    except RecursionError:
        raise ValueError("nested too deeply") from None


# ---------------------------------------------------------------------------------------------- reading
class OriginalDataset:
    """Read-only block access to an original-format dataset directory (see the module docstring).

    The block interface (``num_blocks``, ``block_available``, ``block_length``, ``block_record``,
    ``refresh``) is that of ``cpmbee.data.shards.Dataset``; ``BlockCursor`` reads either. A block's record
    offsets are found by walking its record headers the first time the block is read.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.files: list[OriginalFile] = []
        self._ends: list[int] = []  # block_end of each file, for bisect
        self._maps: dict[str, mmap.mmap] = {}
        self._blocks: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self._stamp: tuple[int, int] | None = None
        self.refresh()

    # ----------------------------------------------------------------------------------- meta.bin
    def _meta_stamp(self) -> tuple[int, int]:
        st = (self.directory / META).stat()
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> bool:
        """Re-read ``meta.bin`` if it changed; returns whether it did. Files may only be appended or
        (un)masked under a running reader, as with the original."""
        try:
            stamp = self._meta_stamp()
        except FileNotFoundError:
            raise ValueError(f"{self.directory}: not an original CPM-Bee dataset (no {META})") from None
        if stamp == self._stamp:
            return False
        files = read_meta(self.directory)
        if len(files) < len(self.files):
            raise ValueError(f"{self.directory}/{META}: data files were removed while being read")
        for old, new in zip(self.files, files):
            if (old.name, old.block_begin, old.block_end) != (new.name, new.block_begin, new.block_end):
                raise ValueError(
                    f"{self.directory}/{META}: the entry of {old.name} changed while being read"
                    " (only appending files and masking them is possible under a running job)"
                )
        initial = self._stamp is None
        for info in files[len(self.files) :]:
            self._check_size(info, missing_ok=not initial)
        self.files = files
        self._ends = [f.block_end for f in files]
        self._stamp = stamp
        return True

    def _check_size(self, info: OriginalFile, *, missing_ok: bool) -> None:
        path = self.directory / info.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if missing_ok:  # vanished: its blocks are skipped, as a vanished shard's
                return
            raise ValueError(f"{path}: listed in {META} but missing") from None
        if size == 0:
            raise ValueError(
                f"{path}: empty file; {META} says {info.blocks} blocks of {info.block_size} bytes"
            )
        if size != info.size:
            state = "truncated" if size < info.size else "longer than expected"
            raise ValueError(
                f"{path}: {size} bytes, {state}: {META} says {info.blocks} blocks of {info.block_size} bytes"
                f" ({info.size} bytes)"
            )

    # ------------------------------------------------------------------------------- properties
    @property
    def num_blocks(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def num_records(self) -> int:
        """Records in unmasked files (as ``meta.bin`` counts them)."""
        return sum(f.records for f in self.files if not f.mask)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files if not f.mask)

    def __len__(self) -> int:
        return self.num_records

    # ---------------------------------------------------------------------------------- blocks
    def file_of(self, block: int) -> int:
        """Index in ``files`` of the file holding global block ``block``."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range (0..{self.num_blocks - 1})")
        return bisect.bisect_right(self._ends, block)

    def _map(self, k: int) -> mmap.mmap:
        info = self.files[k]
        data = self._maps.get(info.name)
        if data is None:
            self._check_size(info, missing_ok=False)
            with open(self.directory / info.name, "rb") as f:
                data = self._maps[info.name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return data

    def block_available(self, block: int) -> bool:
        """False for blocks of masked or vanished files and for empty blocks (a file without records)."""
        k = self.file_of(block)
        info = self.files[k]
        if info.mask:
            return False
        if info.name not in self._maps and not (self.directory / info.name).exists():
            return False
        return self._map(k)[(block - info.block_begin) * info.block_size] != END_MARK

    def _where(self, block: int, record: int | None = None) -> str:
        info = self.files[self.file_of(block)]
        start = (block - info.block_begin) * info.block_size
        text = f"{self.directory / info.name}: block {block} (bytes {start}-{start + info.block_size - 1})"
        return text if record is None else f"{text}, record {record + 1} of the block"

    def _scan(self, block: int) -> tuple[list[int], list[int]]:
        """Payload offsets and lengths of a block's records, checking the framing."""
        cached = self._blocks.get(block)
        if cached is not None:
            self._blocks.move_to_end(block)
            return cached
        k = self.file_of(block)
        info, data = self.files[k], self._map(k)
        pos = (block - info.block_begin) * info.block_size
        end = pos + info.block_size
        starts: list[int] = []
        lengths: list[int] = []
        while pos < end:
            mark = data[pos]
            if mark == END_MARK:
                if np.frombuffer(data, np.uint8, end - pos, pos).any():
                    raise ValueError(
                        f"{self._where(block)}: non-zero bytes after the end-of-block marker at byte {pos}"
                        " (corrupt file)"
                    )
                break
            if mark != RECORD_MARK:
                raise ValueError(
                    f"{self._where(block, len(starts))} at byte {pos}: found 0x{mark:02x} where a record (0x1f) or the end of the block (0x00)"
                    " should start (corrupt file)"
                )
            if pos + 5 > end:
                raise ValueError(
                    f"{self._where(block, len(starts))} at byte {pos}: the record header runs past the end of the block (corrupt file)"
                )
            (length,) = _HEADER.unpack_from(data, pos + 1)
            if pos + 5 + length > end:
                raise ValueError(
                    f"{self._where(block, len(starts))} at byte {pos}: a record of {length} bytes runs past the end of the block"
                    " (corrupt or truncated file)"
                )
            starts.append(pos + 5)
            lengths.append(length)
            pos += 5 + length
        self._blocks[block] = (starts, lengths)
        if len(self._blocks) > _CACHED_BLOCKS:
            self._blocks.popitem(last=False)
        return starts, lengths

    def block_length(self, block: int) -> int:
        """Number of records in a block."""
        return len(self._scan(block)[0])

    def block_payload(self, block: int, i: int) -> bytes:
        starts, lengths = self._scan(block)
        data = self._map(self.file_of(block))
        return data[starts[i] : starts[i] + lengths[i]]

    def block_record(self, block: int, i: int) -> Any:
        """Record ``i`` of a block as a JSON value (``ValueError`` naming it for a bad or unsafe record)."""
        try:
            return decode_payload(self.block_payload(block, i))[0]
        except ValueError as err:
            raise ValueError(f"{self._where(block, i)}: {err}") from None

    def block_record_raw(self, block: int, i: int) -> bytes:
        """Record ``i`` of a block as encoded JSON (the shard format's record bytes)."""
        return encode_json(self.block_record(block, i))

    # ------------------------------------------------------------------------------ whole files
    def iter_file(self, k: int) -> Iterator[tuple[Any, str]]:
        """``(value, "pickle" | "json")`` of every record of file ``k`` in stored order; at the end the
        counts are checked against ``meta.bin``."""
        info = self.files[k]
        count = nbytes = 0
        for block in range(info.block_begin, info.block_end):
            starts, lengths = self._scan(block)
            data = self._map(k)
            for i, (start, length) in enumerate(zip(starts, lengths)):
                try:
                    value, kind = decode_payload(data[start : start + length])
                except ValueError as err:
                    raise ValueError(
                        f"{self._where(block, i)} (record {count + 1} of the file): {err}"
                    ) from None
                count += 1
                nbytes += 4 + length
                yield value, kind
        if (count, nbytes) != (info.records, info.nbytes):
            raise ValueError(
                f"{self.directory / info.name}: holds {count} records ({nbytes} bytes), {META} says"
                f" {info.records} records ({info.nbytes} bytes)"
            )

    def iter_located(self) -> Iterator[tuple[str, Any]]:
        """``(where, record)`` for every record of the unmasked files, in stored order (``where`` is
        ``DIR/FILE: record N``, for messages about the record)."""
        for k, info in enumerate(self.files):
            if not info.mask:
                path = self.directory / info.name
                for n, (value, _) in enumerate(self.iter_file(k), start=1):
                    yield f"{path}: record {n}", value

    def __iter__(self) -> Iterator[Any]:
        """Every record of the unmasked files, in stored order."""
        for _, value in self.iter_located():
            yield value

    def first_record_kind(self, k: int) -> str | None:
        """How file ``k``'s first record is serialized (``"pickle"``/``"json"``), None without records."""
        info = self.files[k]
        for block in range(info.block_begin, info.block_end):
            if self.block_length(block):
                try:
                    return decode_payload(self.block_payload(block, 0))[1]
                except ValueError as err:
                    raise ValueError(f"{self._where(block, 0)}: {err}") from None
        return None

    def describe(self) -> dict[str, Any]:
        """A summary for ``cpmbee dataset info`` (from ``meta.bin`` and each file's first record)."""
        return {
            "path": str(self.directory),
            "format": "original CPM-Bee DistributedDataset (read-only; cpmbee dataset import-original converts it)",
            "records": self.num_records,
            "bytes": self.nbytes,
            "blocks": self.num_blocks,
            "files": [
                {
                    "name": f.name,
                    "records": f.records,
                    "bytes": f.nbytes,
                    "blocks": f.blocks,
                    "block_range": [f.block_begin, f.block_end],
                    "block_size": f.block_size,
                    "mask": f.mask,
                    "serializer": self.first_record_kind(k),
                }
                for k, f in enumerate(self.files)
            ],
        }


def encode_json(value: Any) -> bytes:
    """A record as the shard format stores it (compact UTF-8 JSON)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------------------------- writing
class OriginalWriter:
    """Write one data file of an original-format dataset (for tests, benchmarks and handing data back to
    the original tools)::

        with OriginalWriter("DIR", "part_0", block_size=16 << 20, serializer="pickle") as w:
            w.write({"text": "..."})

    The file is complete before it is appended to ``meta.bin`` (replaced atomically), as the original does.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        name: str,
        *,
        block_size: int = 16 << 20,
        serializer: str = "pickle",
    ) -> None:
        if serializer not in ("pickle", "json"):
            raise ValueError(f"serializer must be 'pickle' or 'json', got {serializer!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name, self.block_size, self.serializer = name, block_size, serializer
        if (self.directory / name).exists():
            raise ValueError(f"{self.directory / name} already exists")
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in close()
        self._used = 0  # bytes used in the current block
        self.blocks, self.records, self.nbytes = 1, 0, 0

    def write(self, record: Any) -> None:
        """Append a record, serialized as the original does (pickle protocol 4, or JSON)."""
        if self.serializer == "pickle":
            self.write_payload(pickle.dumps(record, protocol=4))
        else:
            self.write_payload(json.dumps(record, ensure_ascii=False).encode("utf-8"))

    def write_payload(self, payload: bytes) -> None:
        """Append an already serialized record."""
        framed = 5 + len(payload)
        if self._used + framed + 1 > self.block_size:  # +1: the end-of-block marker
            if self._used == 0:
                raise ValueError(
                    f"a record of {len(payload)} bytes does not fit a block of {self.block_size}"
                )
            self._file.write(b"\0" * (self.block_size - self._used))
            self._used = 0
            self.blocks += 1
        self._file.write(bytes([RECORD_MARK]) + _HEADER.pack(len(payload)) + payload)
        self._used += framed
        self.records += 1
        self.nbytes += 4 + len(payload)

    def close(self) -> None:
        self._file.write(b"\0" * (self.block_size - self._used))
        self._file.close()
        meta = self.directory / META
        lines = meta.read_text(encoding="utf-8").splitlines() if meta.exists() else []
        begin = json.loads(lines[-1])["block_end"] if lines else 0
        entry = {
            "file_name": self.name,
            "block_begin": begin,
            "block_end": begin + self.blocks,
            "nbytes": self.nbytes,
            "nlines": self.records,
            "mask": False,
            "block_size": self.block_size,
        }
        tmp = self.directory / f".{META}.{os.getpid()}.tmp"
        tmp.write_text("".join(line + "\n" for line in [*lines, json.dumps(entry)]), encoding="utf-8")
        os.replace(tmp, meta)

    def __enter__(self) -> OriginalWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            (self.directory / self.name).unlink(missing_ok=True)
