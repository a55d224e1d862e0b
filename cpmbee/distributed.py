"""Collectives that are a no-op in a single process: "gather only if world > 1", written once.

They talk to ``torch.distributed`` directly, so they work the same under ``torchrun``, ``accelerate launch``
(which initializes the default process group) and FSDP2. Every process of the group must make the same call.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_reduce", "rank", "world_size"]


def world_size() -> int:
    """Processes in the default group; 1 when ``torch.distributed`` is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when ``torch.distributed`` is not initialized."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    n = world_size()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj)
    return out


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """``tensor`` reduced over all processes (a new tensor; the argument is not modified); ``tensor``
    itself in a single process."""
    if op not in _OPS:
        raise ValueError(f"all_reduce: op must be one of {sorted(_OPS)}, got {op!r}")
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=getattr(dist.ReduceOp, _OPS[op]))
    return out
