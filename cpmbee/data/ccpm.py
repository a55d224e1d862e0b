"""CCPM (Chinese Classical Poetry Matching) → CPM-Bee format: an example of preparing user data.

CCPM pairs a modern-Chinese paraphrase with four classical poem lines, one of which it describes. The
released files come in two shapes:

* ``{"target": "3", "input": "[翻译]<paraphrase>[0]<line>[1]<line>[2]<line>[3]<line>[答案]"}``
  (the CPM-Bee tutorial's ``raw_data``);
* ``{"translation": "<paraphrase>", "choices": ["<line>", ...], "answer": 3}`` (the CUGE release).

Both become a CPM-Bee choice sample::

    {"input": "<paraphrase>", "options": {"<option_0>": "<line>", ...},
     "question": "这段话形容了哪句诗的意境？", "<ans>": "<option_3>"}

Texts are escaped (a literal ``<`` becomes ``<<``), so any text is safe in the structured format.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ..files import atomic_write
from ..tokenizer import escape

__all__ = ["QUESTION", "ccpm_to_bee", "choice_sample", "convert_ccpm_file", "iter_ccpm_file", "parse_ccpm"]

QUESTION = "这段话形容了哪句诗的意境？"
_PREFIX, _SUFFIX = "[翻译]", "[答案]"
_MARKER = re.compile(r"\[(\d+)\]")


def _split_packed(text: str) -> tuple[str, list[str]]:
    """``[翻译]p[0]a[1]b…[答案]`` → (p, [a, b, …]); option markers must count up from 0."""
    if not (text.startswith(_PREFIX) and text.endswith(_SUFFIX)):
        raise ValueError(f"input must look like '{_PREFIX}…[0]…[1]…{_SUFFIX}', got {text[:40]!r}")
    body = text[len(_PREFIX) : -len(_SUFFIX)]
    cuts: list[tuple[int, int]] = []  # (start, end) of each accepted marker
    for match in _MARKER.finditer(body):
        if int(match.group(1)) == len(cuts):  # "[12]" inside a text is not the next marker unless it counts
            cuts.append(match.span())
    if len(cuts) < 2:
        raise ValueError(f"input has {len(cuts)} option markers [0], [1], …; need at least 2")
    paraphrase = body[: cuts[0][0]]
    ends = [start for start, _ in cuts[1:]] + [len(body)]
    options = [body[end:stop] for (_, end), stop in zip(cuts, ends)]
    return paraphrase, options


def parse_ccpm(record: Mapping[str, Any]) -> tuple[str, list[str], int]:
    """One CCPM record (either shape, see the module docstring) → (paraphrase, option lines, answer index),
    texts as they are (not escaped)."""
    if "input" in record and "target" in record:
        paraphrase, options = _split_packed(str(record["input"]))
        target = record["target"]
    elif "translation" in record and "choices" in record:
        paraphrase, options, target = (
            str(record["translation"]),
            list(record["choices"]),
            record.get("answer"),
        )
    else:
        raise ValueError(f"not a CCPM record: keys {sorted(record)}")
    try:
        answer = int(target)
    except (TypeError, ValueError):
        raise ValueError(f"target/answer must be an option number, got {target!r}") from None
    if not 0 <= answer < len(options):
        raise ValueError(f"answer {answer} is not one of the {len(options)} options")
    return paraphrase, [str(o) for o in options], answer


def choice_sample(paraphrase: str, options: list[str], answer: int) -> dict[str, Any]:
    """The CPM-Bee choice sample for a parsed CCPM record (texts escaped)."""
    return {
        "input": escape(paraphrase),
        "options": {f"<option_{i}>": escape(text) for i, text in enumerate(options)},
        "question": QUESTION,
        "<ans>": f"<option_{answer}>",
    }


def ccpm_to_bee(record: Mapping[str, Any]) -> dict[str, Any]:
    """One CCPM record (either shape) → a CPM-Bee choice sample."""
    return choice_sample(*parse_ccpm(record))


def iter_ccpm_file(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """CPM-Bee samples of a CCPM JSONL file; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield ccpm_to_bee(json.loads(line))
            except (ValueError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}:{number}: {err}") from None


def convert_ccpm_file(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Convert a CCPM JSONL file into a CPM-Bee JSONL file (written atomically); returns the sample count."""
    count = 0
    with atomic_write(dst) as out:
        for sample in iter_ccpm_file(src):
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")
            count += 1
    return count
