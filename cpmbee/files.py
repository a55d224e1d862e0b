"""File-system helpers every layer shares: atomic writes, and the vocabulary that belongs to a model.

Atomic means a reader (or a restarted job) sees the old file or the complete new one, never a torn one: the
data goes to a hidden temporary sibling that is flushed, fsynced and then ``os.replace``-d over the target;
on an error the temporary is removed and the target is untouched. Directories are built the same way and
renamed into place when complete.

This module imports only the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "VOCAB_FILE",
    "atomic_directory",
    "atomic_write",
    "copy_file_atomic",
    "find_vocab",
    "write_json_atomic",
    "write_text_atomic",
]

VOCAB_FILE = "vocab.txt"


def _temporary_sibling(path: Path) -> Path:
    # unique per call (several threads or processes may write the same target)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, encoding: str = "utf-8", fsync: bool = True
) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; when the block ends without an error it replaces
    ``path``. ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``. Parent directories are created."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the block failed


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, fsync=fsync) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, *, indent: int | None = 1, fsync: bool = True
) -> Path:
    """Write ``data`` as JSON (non-ASCII kept as is) to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=indent), fsync=fsync)


def copy_file_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` appears complete or not at all; returns ``dst``."""
    with open(src, "rb") as source, atomic_write(dst, "wb") as target:
        shutil.copyfileobj(source, target)
    return Path(dst)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; when the block ends without an error it takes the
    place of ``path`` (an existing ``path`` is replaced). On an error it is removed and ``path`` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        backup = _temporary_sibling(target)
        target.rename(backup)
        tmp.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(target)


def find_vocab(model_path: str | os.PathLike[str], vocab: str | os.PathLike[str] | None = None) -> Path:
    """The vocabulary of a model: ``vocab`` when given, else ``vocab.txt`` in the model directory (or beside
    the model file). A missing file is a ``FileNotFoundError`` that says how to give one."""
    if vocab is not None:
        given = Path(vocab)
        if not given.is_file():
            raise FileNotFoundError(f"vocabulary file {str(given)!r} does not exist")
        return given
    path = Path(model_path)
    candidate = (path if path.is_dir() else path.parent) / VOCAB_FILE
    if not candidate.is_file():
        raise FileNotFoundError(
            f"no {VOCAB_FILE} beside the model at {candidate}: give the vocabulary file (--vocab / vocab=)"
        )
    return candidate
