"""Evaluation of a fine-tuned model: answer loss, greedy exact match and multiple-choice accuracy.

* ``loss`` — cross-entropy per answer token over the whole set (token-weighted).
* ``exact_match`` — share of samples whose answer greedy decoding would reproduce token for token: with
  teacher forcing, every answer token (and the closing ``</s>``) is the highest-scoring allowed column
  (``objective.allowed_columns``). Greedy decoding makes the same choices as long as they are right, so
  this equals "greedy output == reference" without running generation.
* ``accuracy`` — on choice samples (``cpmbee.data.finetune.choice_candidates``: an ``options`` dict and an
  answer among its keys or values), the candidate with the highest log-likelihood (summed over its answer
  tokens and ``</s>``) against the reference; random guessing scores ``1 / number of options``.

Samples are split across processes (a choice sample's candidates stay together), each process pads its
share to the same number of batches so collective wrappers (DDP/FSDP) see matching forwards, and the sums
are reduced across processes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.finetune import FinetuneCollator, choice_candidates
from ..prompt import ANSWER_KEY

__all__ = ["evaluate"]


@dataclass
class _Row:
    sample: int  # index into the eval samples
    candidate: int  # index into the sample's candidates, -1 for a non-choice sample
    data: Any


def _rows_for(index: int, sample: Any, choices: bool) -> list[_Row]:
    candidates = choice_candidates(sample) if choices else None
    if candidates is None:
        return [_Row(index, -1, sample)]
    rows = []
    for k, candidate in enumerate(candidates):
        data = copy.copy(sample)
        data[ANSWER_KEY] = candidate
        rows.append(_Row(index, k, data))
    return rows


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
    count = torch.tensor([len(batches)], dtype=torch.float64, device=device)
    if accelerator is not None and world > 1:
        count = accelerator.gather(count).max().reshape(1)
    filler = _rows_for(0, samples[0], False)  # forwards whose results are dropped, to keep processes in step

    was_training = objective.training
    objective.eval()
    # loss_sum, tokens, exact, samples, choice_correct, choice_samples
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    per_sample: dict[int, dict[int, tuple[float, float, bool]]] = {}  # sample → candidate → stats
    try:
        for k in range(int(count.item())):
            real = k < len(batches)
            chunk = batches[k] if real else filler
            batch = {n: t.to(device) for n, t in collator([r.data for r in chunk]).items()}
            out = objective(row_stats=True, **batch)
            if not real:
                continue
            for j, row in enumerate(chunk):
                stats = (float(out["row_loss"][j]), float(out["row_tokens"][j]), bool(out["row_exact"][j]))
                per_sample.setdefault(row.sample, {})[row.candidate] = stats
    finally:
        objective.train(was_training)

    for index, results in per_sample.items():
        if -1 in results:  # not a choice sample: its one row is the reference
            gold = -1
        else:
            candidates = choice_candidates(samples[index])
            gold = candidates.index(samples[index][ANSWER_KEY])
            best = min(results, key=lambda c: (results[c][0], c))  # highest likelihood, first on ties
            totals[4] += best == gold
            totals[5] += 1
        loss, tokens, exact = results[gold]
        totals[0] += loss
        totals[1] += tokens
        totals[2] += exact
        totals[3] += 1
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, "sum")
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
