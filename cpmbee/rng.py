"""JSON-able snapshots of random number generators (numpy ``RandomState``, Python ``random``, torch).

Used by data pipelines (read positions must resume with the same draws) and by checkpoints.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "rng_from_json", "rng_to_json"]


def rng_to_json(rng: np.random.RandomState | random.Random) -> list[Any]:
    """A JSON-able snapshot of a numpy ``RandomState`` or a Python ``random.Random``."""
    if isinstance(rng, np.random.RandomState):
        name, keys, pos, has_gauss, cached = rng.get_state(legacy=True)
        return ["numpy", name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]
    version, internal, gauss = rng.getstate()
    return ["python", version, list(internal), gauss]


def rng_from_json(data: list[Any], rng: np.random.RandomState | random.Random) -> None:
    if isinstance(rng, np.random.RandomState):
        if data[0] != "numpy":
            raise ValueError(f"a {data[0]} RNG state cannot seed a numpy RandomState")
        rng.set_state((data[1], np.asarray(data[2], dtype=np.uint32), data[3], data[4], data[5]))
    else:
        if data[0] != "python":
            raise ValueError(f"a {data[0]} RNG state cannot seed a Python Random")
        rng.setstate((data[1], tuple(data[2]), data[3]))


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch (CPU and every CUDA device) as tensors, numpy and Python as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    numpy_global = np.random.RandomState()
    numpy_global.set_state(np.random.get_state())
    python_global = random.Random()
    python_global.setstate(random.getstate())
    return tensors, {"numpy": rng_to_json(numpy_global), "python": rng_to_json(python_global)}


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in meta:
        numpy_global = np.random.RandomState()
        rng_from_json(meta["numpy"], numpy_global)
        np.random.set_state(numpy_global.get_state())
    if "python" in meta:
        python_global = random.Random()
        rng_from_json(meta["python"], python_global)
        random.setstate(python_global.getstate())
