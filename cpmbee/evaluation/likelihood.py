"""Scoring CPM-Bee answers by likelihood: the one scorer behind fine-tuning eval, ``cpmbee eval`` and lm-eval.

A *filled* sample (a CPM-Bee dict whose ``<ans>`` holds text) is encoded as for fine-tuning
(``cpmbee.data.finetune``): the answer tokens are labelled, each predicted from everything before it, and the
answer segment's last token predicts the closing ``</s>``. ``score_answers`` runs batched forwards through
``AnswerObjective`` (which projects only the labelled positions) and returns, per sample, the negative
log-likelihood and the greedy check of every labelled position, the closing ``</s>`` last.

* ``evaluate`` — fine-tuning's eval set metrics (below), split across processes.
* choice samples (``choice_candidates``: an ``options`` dict and an answer among its keys or values) are
  scored by filling each candidate in turn and taking the one of highest summed log-likelihood (answer tokens
  and ``</s>``; the first on ties) — one forward per candidate, batched, never beam search.

``evaluate`` metrics:

* ``loss`` — cross-entropy per answer token over the whole set (token-weighted).
* ``exact_match`` — share of samples whose answer greedy decoding would reproduce token for token: with
  teacher forcing, every answer token (and the closing ``</s>``) is the highest-scoring allowed column
  (``cpmbee.generation.allowed_output_columns``). Greedy decoding makes the same choices as long as they are right, so
  this equals "greedy output == reference" without running generation.
* ``accuracy`` — on choice samples, the most likely candidate against the reference; random guessing scores
  ``1 / number of options``.

Samples are split across processes (a choice sample's candidates stay together), each process pads its
share to the same number of batches so collective wrappers (DDP/FSDP) see matching forwards, and the sums
are reduced across processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.finetune import FinetuneCollator, choice_candidates
from ..distributed import all_reduce
from ..inputs import to_device
from ..prompt import ANSWER_KEY

__all__ = ["AnswerScore", "best_candidate", "candidate_samples", "evaluate", "score_answers", "score_batch"]


@dataclass
class AnswerScore:
    """Per labelled position of one sample, in order (the closing ``</s>`` last): NLL and greedy check."""

    token_nll: np.ndarray  # (n,) float64, natural log
    token_greedy: np.ndarray  # (n,) bool: the label is the highest-scoring allowed column

    def _part(self, values: np.ndarray, include_eos: bool) -> np.ndarray:
        return values if include_eos else values[:-1]

    def nll(self, include_eos: bool = True) -> float:
        """Summed negative log-likelihood of the answer (with or without its closing ``</s>``)."""
        return float(self._part(self.token_nll, include_eos).sum())

    def tokens(self, include_eos: bool = True) -> int:
        return int(self._part(self.token_nll, include_eos).shape[0])

    def greedy(self, include_eos: bool = True) -> bool:
        """Whether greedy decoding reproduces the answer (and stops there, with ``include_eos``)."""
        return bool(self._part(self.token_greedy, include_eos).all())


@torch.no_grad()
def score_batch(objective: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[AnswerScore]:
    """One forward of a fine-tuning batch (``FinetuneCollator`` output on the objective's device)."""
    out = objective(token_stats=True, token_greedy=True, **batch)
    mask = out["label_mask"]  # (B, L), row-major order of the flat statistics
    counts = mask.sum(dim=1).tolist()
    nll = out["token_loss"].double().cpu().numpy()
    greedy = out["token_greedy"].cpu().numpy()
    scores, start = [], 0
    for n in counts:
        scores.append(AnswerScore(nll[start : start + n], greedy[start : start + n]))
        start += n
    return scores


def score_answers(
    objective: torch.nn.Module,
    samples: Sequence[Any],
    collator: FinetuneCollator,
    *,
    batch_size: int = 8,
    device: Any = None,
    progress: Callable[[int], Any] | None = None,
) -> list[AnswerScore]:
    """Score filled samples in batches of ``batch_size``; ``progress(n)`` is called after each batch.

    Samples are sorted by encoded length first so a batch pads little; results come back in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = next(objective.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: _rough_length(samples[i]))
    results: list[AnswerScore | None] = [None] * len(samples)
    was_training = objective.training
    objective.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = to_device(collator([samples[i] for i in chunk]), device)
            for i, score in zip(chunk, score_batch(objective, batch)):
                results[i] = score
            if progress is not None:
                progress(len(chunk))
    finally:
        objective.train(was_training)
    return results  # type: ignore[return-value]


def _rough_length(sample: Any) -> int:
    """Characters of all strings in a sample: a cheap stand-in for its token count when sorting."""
    if isinstance(sample, str):
        return len(sample)
    if isinstance(sample, dict):
        return sum(len(k) + _rough_length(v) for k, v in sample.items())
    return 0


def candidate_samples(sample: Any) -> list[Any] | None:
    """Copies of a choice sample with each candidate answer filled in (None when it is not one)."""
    candidates = choice_candidates(sample)
    if candidates is None:
        return None
    out = []
    for candidate in candidates:
        data = copy.copy(sample)
        data[ANSWER_KEY] = candidate
        out.append(data)
    return out


def best_candidate(nlls: Iterable[float]) -> int:
    """Index of the most likely candidate (lowest NLL), the first one on ties."""
    values = list(nlls)
    if not values:
        raise ValueError("best_candidate needs at least one candidate")
    return min(range(len(values)), key=lambda c: (values[c], c))


# ---------------------------------------------------------------------------------------------------- fine-tuning
@dataclass
class _Row:
    sample: int  # index into the eval samples
    candidate: int  # index into the sample's candidates, -1 for a non-choice sample
    data: Any


def _rows_for(index: int, sample: Any, choices: bool) -> list[_Row]:
    filled = candidate_samples(sample) if choices else None
    if filled is None:
        return [_Row(index, -1, sample)]
    return [_Row(index, k, data) for k, data in enumerate(filled)]


@torch.no_grad()
def evaluate(
    objective: torch.nn.Module,
    samples: Sequence[Any],
    collator: FinetuneCollator,
    *,
    accelerator: Any = None,
    batch_size: int = 8,
    choices: bool = True,
    device: Any = None,
) -> dict[str, float]:
    """Evaluate ``objective`` (an ``AnswerObjective``, possibly wrapped by ``accelerator.prepare``).

    Returns ``loss``, ``exact_match``, ``samples`` and, when there are choice samples, ``accuracy`` and
    ``choice_samples``. With an ``accelerator`` every process must call this with the same ``samples``.
    """
    if not samples:
        raise ValueError("evaluate needs at least one sample")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    if device is None:
        device = accelerator.device if accelerator is not None else next(objective.parameters()).device
    rows = [row for i in range(rank, len(samples), world) for row in _rows_for(i, samples[i], choices)]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    count = all_reduce(torch.tensor([len(batches)], dtype=torch.float64, device=device), "max")
    filler = _rows_for(0, samples[0], False)  # forwards whose results are dropped, to keep processes in step

    was_training = objective.training
    objective.eval()
    # loss_sum, tokens, exact, samples, choice_correct, choice_samples
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    per_sample: dict[int, dict[int, AnswerScore]] = {}  # sample → candidate → score
    try:
        for k in range(int(count.item())):
            real = k < len(batches)
            chunk = batches[k] if real else filler
            batch = to_device(collator([r.data for r in chunk]), device)
            scores = score_batch(objective, batch)
            if real:
                for row, score in zip(chunk, scores):
                    per_sample.setdefault(row.sample, {})[row.candidate] = score
    finally:
        objective.train(was_training)

    for index, results in per_sample.items():
        if -1 in results:  # not a choice sample: its one row is the reference
            gold = -1
        else:
            candidates = choice_candidates(samples[index])
            assert candidates is not None  # a choice sample: its rows were built from these candidates
            gold = candidates.index(samples[index][ANSWER_KEY])
            totals[4] += best_candidate(results[c].nll() for c in range(len(results))) == gold
            totals[5] += 1
        score = results[gold]
        totals[0] += score.nll()
        totals[1] += score.tokens()
        totals[2] += score.greedy()
        totals[3] += 1
    totals = all_reduce(totals)
    loss_sum, tokens, exact, n, correct, n_choice = (float(x) for x in totals)
    metrics = {
        "loss": loss_sum / max(tokens, 1.0),
        "exact_match": exact / max(n, 1.0),
        "samples": int(n),
    }
    if n_choice:
        metrics["accuracy"] = correct / n_choice
        metrics["choice_samples"] = int(n_choice)
    return metrics
