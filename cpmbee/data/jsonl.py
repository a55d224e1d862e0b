"""Strict JSONL reading: every non-blank line must be JSON, and a bad line is reported by file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["iter_jsonl", "iter_text_lines"]


def iter_text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, without the line end. A line that is not valid UTF-8
    is a ``ValueError`` naming ``path:line``, the byte and its column (instead of a codec error that
    names neither)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1});"
                    " save the file as UTF-8"
                ) from None
            yield number, line.rstrip("\r\n")


def iter_jsonl(path: str | os.PathLike, *, objects: bool = True) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of ``path``.

    ``ValueError`` names ``path:line`` for a line that is not UTF-8, not valid JSON, or (``objects=True``)
    not a JSON object. (``cpmbee.data.tools.iter_jsonl_records`` is the lenient reader: other lines become
    text.)"""
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if objects and not isinstance(value, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        yield number, value
