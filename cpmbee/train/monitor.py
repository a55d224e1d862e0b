"""Training-health helpers: loss-spike detection, parameter/gradient inspection, FLOPs/MFU and memory."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["LossSpikeDetector", "flops_per_token", "inspect_parameters", "memory_gb", "peak_flops_guess"]


class LossSpikeDetector:
    """Flags tasks whose loss jumps above ``factor`` × the value it had the last time it was seen.

    The original CPM-Live trainer used a factor of 3 against the previous iteration. Non-finite losses
    are reported by the trainer as ``nan`` incidents instead, and do not replace the reference value.
    """

    def __init__(self, factor: float | None = 3.0, min_step: int = 0) -> None:
        self.factor = factor
        self.min_step = min_step
        self.previous: dict[str, float] = {}

    def update(self, step: int, task_loss: Mapping[str, float]) -> dict[str, list[float]]:
        """Record this step's task losses; returns ``{task: [previous, current]}`` for the spikes."""
        spikes: dict[str, list[float]] = {}
        for task, loss in task_loss.items():
            if not math.isfinite(loss):
                continue
            prev = self.previous.get(task)
            if (
                self.factor is not None
                and prev is not None
                and step >= self.min_step
                and loss > self.factor * prev
            ):
                spikes[task] = [prev, loss]
            self.previous[task] = loss
        return spikes

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self.previous)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.previous = {k: float(v) for k, v in state.get("previous", {}).items()}


_LAYER = re.compile(r"\.(\d+)\.")


def inspect_parameters(model: torch.nn.Module, groups: str = "parameter") -> dict[str, dict[str, float]]:
    """Mean, std, max |x| and L2 norm of every parameter group's weights and (when present) gradients.

    ``groups="parameter"``: one entry per parameter; ``"module"``: parameters of the same name in
    different layers are pooled (``encoder.layers.*.ffn...``).
    """
    pooled: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for name, p in model.named_parameters():
        key = _LAYER.sub(".*.", name) if groups == "module" else name
        pooled.setdefault(key, []).append((p.detach(), None if p.grad is None else p.grad.detach()))
    out: dict[str, dict[str, float]] = {}
    for key, items in pooled.items():
        stats = _stats(torch.cat([w.float().flatten() for w, _ in items]))
        grads = [g for _, g in items if g is not None]
        if grads:
            g = _stats(torch.cat([x.float().flatten() for x in grads]))
            stats.update({f"grad_{k}": v for k, v in g.items()})
        out[key] = stats
    return out


def _stats(x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {"mean": 0.0, "std": 0.0, "max_abs": 0.0, "norm": 0.0}
    return {
        "mean": x.mean().item(),
        "std": x.std(unbiased=False).item(),
        "max_abs": x.abs().max().item(),
        "norm": x.norm().item(),
    }


def flops_per_token(config: Any, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 × parameters`` (forward + backward of the matmuls, the tied
    projection included) plus attention, ``12 × layers × heads × dim_head × seq_len``."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.dim_head * seq_len
    return 6.0 * num_params + attention


_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40": 181e12,
    "A10": 125e12,
    "V100": 125e12,
}


def peak_flops_guess() -> float | None:
    """Dense bf16/fp16 peak FLOP/s of the current CUDA device if it is a known one, else ``None``."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def memory_gb() -> float:
    """Peak CUDA memory allocated (GiB) on a GPU, else this process's resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
