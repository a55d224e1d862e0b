"""Task files → metrics: what ``cpmbee eval`` runs (``docs/evaluation.md`` has the report format).

A task is a file of examples of one *kind*:

* ``choice`` — CPM-Bee choice samples: an ``options`` dict (``{"<option_0>": text, …}``) and the gold option
  (its key or its text) in ``<ans>``. Scored by option likelihood (``likelihood.py``: every option filled
  in, batched forwards, the most likely one wins) and, with ``by_generation``, by generating the answer
  (``cpmbee.generation.generate``) and reading it back as an option (``metrics.parse_choice``).
* ``generation`` — CPM-Bee samples whose ``<ans>`` holds the reference text (or a dict of them): the
  answers are generated and compared by exact match and token F1 (``metrics.py``); a dict answer counts
  as exact when every leaf is, and its F1 is the mean over leaves. The reference's likelihood
  (``gold_nll``, nats per token) comes for free.
* ``perplexity`` — plain text: JSONL of ``{"text": …}`` or a ``.txt`` file (one text per non-empty line),
  scored as ``perplexity.py`` describes.

``auto`` picks the kind from the file: ``.txt`` or records with ``text`` and no ``<ans>`` → perplexity;
every record a choice sample → choice; every record with ``<ans>`` → generation.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.finetune import FinetuneCollator, choice_candidates
from ..data.jsonl import iter_jsonl
from ..generation import generate
from ..model import CpmBeeForCausalLMBase
from ..objective import AnswerObjective
from ..prompt import ANSWER_KEY
from ..tokenizer import CpmBeeTokenizerBase
from .answer_metrics import exact_match, parse_choice, token_f1
from .likelihood import best_candidate, candidate_samples, score_answers
from .perplexity import score_texts, summarize

__all__ = ["KINDS", "detect_kind", "format_table", "load_task", "run_task"]

KINDS = ("choice", "generation", "perplexity")

Progress = Callable[[int], Any]


# ---------------------------------------------------------------------------------------------------- files
def load_task(path: str | os.PathLike, *, limit: int | None = None) -> list[Any]:
    """Records of a task file: dicts from ``.jsonl``, strings from ``.txt``; the first ``limit`` only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            records: list[Any] = list(itertools.islice((ln.rstrip("\n") for ln in f if ln.strip()), limit))
    else:
        records = [record for _, record in itertools.islice(iter_jsonl(path), limit)]
    if not records:
        raise ValueError(f"{path}: no examples")
    return records


def detect_kind(records: Sequence[Any]) -> str:
    """The task kind of loaded records (module docstring); ``ValueError`` when they fit none or are mixed."""
    if all(isinstance(r, str) for r in records):
        return "perplexity"
    if all(
        isinstance(r, Mapping) and isinstance(r.get("text"), str) and ANSWER_KEY not in r for r in records
    ):
        return "perplexity"
    if all(choice_candidates(r) is not None for r in records):
        return "choice"
    if all(isinstance(r, Mapping) and ANSWER_KEY in r for r in records):
        return "generation"
    raise ValueError(
        "cannot tell the task kind: records must all be choice samples (options + <ans>), all have <ans>"
        " (generation), or all be {'text': …} (perplexity); pass --kind to say which"
    )


def _check_records(kind: str, records: Sequence[Any]) -> None:
    for number, record in enumerate(records, start=1):
        if kind == "perplexity":
            ok = isinstance(record, str) or (
                isinstance(record, Mapping) and isinstance(record.get("text"), str)
            )
            problem = "a perplexity example needs a 'text' string"
        elif kind == "choice":
            ok = choice_candidates(record) is not None
            problem = "a choice example needs an 'options' dict and its gold key or text in '<ans>'"
        else:
            ok = isinstance(record, Mapping) and ANSWER_KEY in record
            problem = "a generation example needs its reference in '<ans>'"
        if not ok:
            raise ValueError(f"example {number}: {problem}")


# ---------------------------------------------------------------------------------------------------- kinds
def _generate(
    model: CpmBeeForCausalLMBase,
    tokenizer: CpmBeeTokenizerBase,
    samples: Sequence[Any],
    options: Mapping[str, Any],
    batch_size: int,
    progress: Progress,
) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        out.extend(generate(model, tokenizer, chunk, **options))
        progress(len(chunk))
    return out


def _run_choice(
    objective: AnswerObjective,
    model: CpmBeeForCausalLMBase,
    tokenizer: CpmBeeTokenizerBase,
    records: Sequence[Any],
    collator: FinetuneCollator,
    batch_size: int,
    by_generation: bool,
    generation: Mapping[str, Any],
    progress: Callable[[str, int], Progress],
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    rows = [candidate_samples(r) for r in records]
    flat = [row for filled in rows for row in filled]  # type: ignore[union-attr]
    start = time.perf_counter()
    scores = score_answers(
        objective, flat, collator, batch_size=batch_size, progress=progress("likelihood", len(flat))
    )
    timing = {"likelihood_s": time.perf_counter() - start}
    correct = correct_norm = 0
    chance = 0.0
    predictions: list[dict[str, Any]] = []
    offset = 0
    for record, filled in zip(records, rows):
        candidates = choice_candidates(record)
        assert candidates is not None  # the records were sorted into this task kind by it
        mine = scores[offset : offset + len(filled)]  # type: ignore[arg-type]
        offset += len(filled)  # type: ignore[arg-type]
        gold = candidates.index(record[ANSWER_KEY])
        best = best_candidate(s.nll() for s in mine)
        best_norm = best_candidate(s.nll() / s.tokens() for s in mine)
        correct += best == gold
        correct_norm += best_norm == gold
        chance += 1 / len(candidates)
        predictions.append(
            {
                "gold": candidates[gold],
                "likelihood": candidates[best],
                "nll": [round(s.nll(), 4) for s in mine],
            }
        )
    n = len(records)
    metrics: dict[str, Any] = {
        "accuracy": correct / n,
        "accuracy_norm": correct_norm / n,
        "chance": chance / n,
    }
    counts: dict[str, Any] = {"examples": n, "candidates": len(flat)}
    if by_generation:
        start = time.perf_counter()
        filled = _generate(model, tokenizer, records, generation, batch_size, progress("generation", n))
        timing["generation_s"] = time.perf_counter() - start
        hits = unparsed = 0
        for record, out, prediction in zip(records, filled, predictions):
            answer = out[ANSWER_KEY] if isinstance(out, Mapping) else None
            options = record["options"]
            key = parse_choice(answer if isinstance(answer, str) else None, options)
            # the gold may be given as the option's key or its text
            picked = key if key is None or record[ANSWER_KEY] in options else options[key]
            hits += picked == record[ANSWER_KEY]
            unparsed += key is None
            prediction.update(generated=answer, generation=picked)
        metrics["accuracy_generation"] = hits / n
        counts["unparsed_generations"] = unparsed
    return metrics, counts, predictions, timing


def _answer_leaves(value: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(value, Mapping):
        leaves: dict[tuple[str, ...], Any] = {}
        for key, child in value.items():
            leaves.update(_answer_leaves(child, (*path, key)))
        return leaves
    return {path: value}


def _run_generation(
    objective: AnswerObjective,
    model: CpmBeeForCausalLMBase,
    tokenizer: CpmBeeTokenizerBase,
    records: Sequence[Any],
    collator: FinetuneCollator,
    batch_size: int,
    generation: Mapping[str, Any],
    progress: Callable[[str, int], Progress],
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    start = time.perf_counter()
    scores = score_answers(
        objective, records, collator, batch_size=batch_size, progress=progress("likelihood", len(records))
    )
    timing = {"likelihood_s": time.perf_counter() - start}
    start = time.perf_counter()
    outputs = _generate(
        model, tokenizer, records, generation, batch_size, progress("generation", len(records))
    )
    timing["generation_s"] = time.perf_counter() - start
    exact = f1 = 0.0
    missing = 0
    predictions = []
    for record, out in zip(records, outputs):
        gold = _answer_leaves(record[ANSWER_KEY])
        got = _answer_leaves(out[ANSWER_KEY]) if isinstance(out, Mapping) else {}
        pairs = [(got.get(path), str(ref)) for path, ref in gold.items()]
        pairs = [(p if isinstance(p, str) else None, r) for p, r in pairs]
        missing += any(p is None for p, _ in pairs)
        exact += all(exact_match(p, r) for p, r in pairs)
        f1 += sum(token_f1(p, r) for p, r in pairs) / len(pairs)
        predictions.append(
            {"gold": record[ANSWER_KEY], "generated": out[ANSWER_KEY] if isinstance(out, Mapping) else None}
        )
    n = len(records)
    nll = sum(s.nll() for s in scores)
    tokens = sum(s.tokens() for s in scores)
    metrics = {
        "exact_match": exact / n,
        "f1": f1 / n,
        "gold_nll": nll / tokens,
        "gold_greedy": sum(s.greedy() for s in scores) / n,
    }
    counts = {"examples": n, "unanswered": missing, "gold_tokens": tokens}
    return metrics, counts, predictions, timing


def _run_perplexity(
    objective: AnswerObjective,
    tokenizer: CpmBeeTokenizerBase,
    records: Sequence[Any],
    batch_size: int,
    window: int,
    progress: Callable[[str, int], Progress],
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    texts = [r if isinstance(r, str) else r["text"] for r in records]
    start = time.perf_counter()
    scores = score_texts(
        objective, tokenizer, texts, window=window, batch_size=batch_size, progress=progress("windows", 0)
    )
    timing = {"likelihood_s": time.perf_counter() - start}
    summary = summarize(scores)
    metrics = {k: summary[k] for k in ("nll", "perplexity", "bits_per_char")}
    counts = {"examples": len(texts), "tokens": summary["tokens"], "chars": summary["chars"]}
    predictions = [
        {
            "nll": round(s.nll, 4),
            "tokens": s.tokens,
            "perplexity": math.exp(s.nll / s.tokens) if s.tokens else None,
        }
        for s in scores
    ]
    return metrics, counts, predictions, timing


# ---------------------------------------------------------------------------------------------------- entry
class _ProgressBars:
    """``bars(what, total)`` opens a tqdm bar (hidden unless ``show``) and returns its ``update``; all are
    closed when the ``with`` block ends."""

    def __init__(self, name: str, show: bool) -> None:
        self.name, self.show = name, show
        self.bars: list[Any] = []

    def __call__(self, what: str, total: int) -> Progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total or None, desc=f"{self.name} {what}", unit="row", disable=not self.show)
        self.bars.append(bar)
        update: Progress = bar.update
        return update

    def __enter__(self) -> _ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars:
            bar.close()


def run_task(
    model: CpmBeeForCausalLMBase,
    tokenizer: CpmBeeTokenizerBase,
    path: str | os.PathLike,
    *,
    kind: str = "auto",
    batch_size: int = 8,
    limit: int | None = None,
    by_generation: bool = False,
    generation: Mapping[str, Any] | None = None,
    max_length: int = 2048,
    window: int = 256,
    predictions: bool = False,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on one task file; returns the task's report entry (``docs/evaluation.md``).

    Args:
        model: a ``CpmBeeForCausalLM`` (plain or with adapters injected).
        tokenizer: its ``CpmBeeTokenizer``.
        path: the task file (``.jsonl`` or, for perplexity, ``.txt``).
        kind: ``choice``, ``generation``, ``perplexity`` or ``auto`` (module docstring).
        batch_size: samples (choice: filled candidates; perplexity: windows) per forward / generate call.
        limit: evaluate the first ``limit`` examples only.
        by_generation: choice tasks are also scored by generating the answer.
        generation: options for ``cpmbee.generation.generate`` (e.g. ``beam_size``, ``max_new_tokens``).
        max_length: likelihood rows longer than this are truncated (context text only, as in fine-tuning).
        window: perplexity window in tokens.
        predictions: include per-example predictions in the entry.
        show_progress: a tqdm progress bar on stderr.
    """
    if kind not in (*KINDS, "auto"):
        raise ValueError(f"kind must be one of {[*KINDS, 'auto']}, got {kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    records = load_task(path, limit=limit)
    resolved = detect_kind(records) if kind == "auto" else kind
    _check_records(resolved, records)
    options = dict(generation or {})
    objective = AnswerObjective(model, unk_id=tokenizer.unk_id)
    collator = FinetuneCollator(tokenizer, max_length=max_length)
    start = time.perf_counter()
    with _ProgressBars(Path(path).stem, show_progress) as progress:
        if resolved == "choice":
            result = _run_choice(
                objective, model, tokenizer, records, collator, batch_size, by_generation, options, progress
            )
        elif resolved == "generation":
            result = _run_generation(
                objective, model, tokenizer, records, collator, batch_size, options, progress
            )
        else:
            result = _run_perplexity(objective, tokenizer, records, batch_size, window, progress)
    metrics, counts, per_example, timing = result
    elapsed = time.perf_counter() - start
    timing.update(total_s=elapsed, examples_per_s=len(records) / elapsed if elapsed else float("inf"))
    entry: dict[str, Any] = {
        "path": str(path),
        "kind": resolved,
        "metrics": metrics,
        "counts": {**counts, "truncated": collator.truncated},
        "timing": {k: round(v, 4) for k, v in timing.items()},
    }
    if predictions:
        entry["predictions"] = per_example
    return entry


def format_table(report: Mapping[str, Any]) -> str:
    """A fixed-width table of a report's tasks: one line per task, its metrics, examples and time."""
    rows = [("task", "kind", "examples", "metrics", "seconds")]
    for name, entry in report["tasks"].items():
        shown = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["metrics"].items()
        )
        rows.append(
            (
                name,
                entry["kind"],
                str(entry["counts"]["examples"]),
                shown,
                f"{entry['timing']['total_s']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
