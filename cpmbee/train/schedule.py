"""Learning-rate schedules: a multiplier of the optimizer's base LR as a function of the step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SCHEDULES", "build_scheduler", "lr_multiplier"]

SCHEDULES = ("constant", "linear", "cosine", "noam")


def lr_multiplier(
    kind: str, warmup_steps: int, total_steps: int | None = None, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """``f(step) -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR``.

    * ``constant``: linear warm-up to 1, then 1.
    * ``linear`` / ``cosine``: warm-up, then decay to ``min_ratio`` at ``total_steps``.
    * ``noam``: the original CPM-Live schedule, ``min(step / warmup^1.5, 1 / sqrt(step))`` times the base LR,
      so the peak is ``base / sqrt(warmup)`` (with base 0.01 and 2000 warm-up steps: 2.2e-4).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if kind in ("linear", "cosine") and not total_steps:
        raise ValueError(f"the {kind!r} schedule needs total_steps")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def warm(step: int) -> float:
        return (step + 1) / warmup_steps if warmup_steps and step < warmup_steps else 1.0

    if kind == "constant":
        return warm
    if kind == "noam":
        w = max(warmup_steps, 1)

        def noam(step: int) -> float:
            n = step + 1
            return min(n * w**-1.5, n**-0.5)

        return noam

    def decay(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return warm(step)
        span = max((total_steps or 0) - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * shape

    return decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(kind, warmup_steps, total_steps, min_ratio)
    )
