"""Strict JSONL reading: every non-blank line must be JSON, and a bad line is reported by file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["iter_jsonl"]


def iter_jsonl(path: str | os.PathLike, *, objects: bool = True) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of ``path``.

    ``ValueError`` names ``path:line`` for a line that is not valid JSON, or (``objects=True``) not a JSON
    object. (``cpmbee.data.tools.iter_jsonl_records`` is the lenient reader: other lines become text.)"""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if objects and not isinstance(value, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            yield number, value
