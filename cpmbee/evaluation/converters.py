"""Benchmark rows → CPM-Bee choice samples (pure data mapping; ``docs/evaluation.md`` maps more tasks).

Every converter takes one row as the benchmark's own JSON lines give it and returns a sample for
``cpmbee eval`` (kind ``choice``): texts escaped, options keyed ``<option_0>``, ``<option_1>``, … in the
benchmark's label order, the gold option in ``<ans>``. A row without a usable label raises ``ValueError``
naming the field. ``CONVERTERS`` maps a task name to its converter; ``convert_file`` applies one to a JSONL
file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..tokenizer import escape

__all__ = ["CONVERTERS", "TNEWS_LABELS", "boolq", "choice", "convert_file", "copa", "ocnli", "tnews"]

# TNEWS label codes → the Chinese category names used as options (the dataset's 15 classes).
TNEWS_LABELS: dict[str, str] = {
    "100": "故事",
    "101": "文化",
    "102": "娱乐",
    "103": "体育",
    "104": "财经",
    "106": "房产",
    "107": "汽车",
    "108": "教育",
    "109": "科技",
    "110": "军事",
    "112": "旅游",
    "113": "国际",
    "114": "股票",
    "115": "农业",
    "116": "电竞",
}
OCNLI_LABELS = ("entailment", "neutral", "contradiction")
OCNLI_OPTIONS = ("蕴含", "中立", "矛盾")


def choice(
    fields: Mapping[str, str], options: Sequence[str], answer: int, question: str | None = None
) -> dict[str, Any]:
    """A CPM-Bee choice sample: ``fields`` (key → text) first, then ``options``, ``question`` and ``<ans>``."""
    if not 0 <= answer < len(options):
        raise ValueError(f"answer {answer} is not one of the {len(options)} options")
    sample: dict[str, Any] = {key: escape(text) for key, text in fields.items()}
    sample["options"] = {f"<option_{i}>": escape(text) for i, text in enumerate(options)}
    if question is not None:
        sample["question"] = escape(question)
    sample["<ans>"] = f"<option_{answer}>"
    return sample


def _field(row: Mapping[str, Any], name: str) -> Any:
    if name not in row:
        raise ValueError(f"row has no {name!r} field (keys: {sorted(row)})")
    return row[name]


def tnews(row: Mapping[str, Any]) -> dict[str, Any]:
    """TNEWS (news title → one of 15 categories): ``{"sentence", "label": "103", …}``."""
    codes = list(TNEWS_LABELS)
    label = str(_field(row, "label"))
    if label not in TNEWS_LABELS:
        raise ValueError(f"label {label!r} is not a TNEWS category code ({', '.join(codes)})")
    return choice(
        {"input": str(_field(row, "sentence"))},
        list(TNEWS_LABELS.values()),
        codes.index(label),
        "这条新闻属于哪个类别？",
    )


def ocnli(row: Mapping[str, Any]) -> dict[str, Any]:
    """OCNLI (premise, hypothesis → entailment / neutral / contradiction): ``{"sentence1", "sentence2", "label"}``."""
    label = str(_field(row, "label"))
    if label not in OCNLI_LABELS:
        raise ValueError(f"label {label!r} is not one of {OCNLI_LABELS}")
    return choice(
        {"input": str(_field(row, "sentence1")), "hypothesis": str(_field(row, "sentence2"))},
        list(OCNLI_OPTIONS),
        OCNLI_LABELS.index(label),
        "根据上文，假设是对的、可能对，还是错的？",
    )


def boolq(row: Mapping[str, Any]) -> dict[str, Any]:
    """BoolQ (passage, yes/no question): ``{"passage", "question", "answer": true|false}`` (or ``label`` 0/1)."""
    raw = row.get("answer", row.get("label"))
    if not isinstance(raw, (bool, int)) or raw not in (0, 1):
        raise ValueError(f"answer/label must be true/false or 0/1, got {raw!r}")
    question = str(_field(row, "question")).strip()
    if not question:
        raise ValueError("question is empty")
    question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
    return choice({"input": str(_field(row, "passage"))}, ["no", "yes"], int(raw), question)


def copa(row: Mapping[str, Any]) -> dict[str, Any]:
    """COPA (premise → the more plausible cause or effect): ``{"premise", "choice1", "choice2", "question",
    "label"}`` with ``question`` ``cause`` or ``effect``."""
    kind = str(_field(row, "question"))
    questions = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}
    if kind not in questions:
        raise ValueError(f"question must be 'cause' or 'effect', got {kind!r}")
    label = _field(row, "label")
    return choice(
        {"input": str(_field(row, "premise"))},
        [str(_field(row, "choice1")), str(_field(row, "choice2"))],
        int(label),
        questions[kind],
    )


CONVERTERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "boolq": boolq,
    "copa": copa,
    "ocnli": ocnli,
    "tnews": tnews,
}


def convert_file(task: str, src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Convert a benchmark JSONL file with ``CONVERTERS[task]``; returns the sample count.

    Errors name the file and line. Rows whose label is hidden (CLUE test sets: ``label`` missing or ``-1``)
    cannot be scored and raise too.
    """
    if task not in CONVERTERS:
        raise ValueError(f"task must be one of {sorted(CONVERTERS)}, got {task!r}")
    convert = CONVERTERS[task]
    count = 0
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                sample = convert(json.loads(line))
            except (ValueError, TypeError, json.JSONDecodeError) as err:
                raise ValueError(f"{src}:{number}: {err}") from None
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")
            count += 1
    return count
