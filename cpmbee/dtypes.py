"""Dtype names, and the rule for the dtype a loaded model computes in.

Names: ``float32``, ``bfloat16`` and ``float16`` are the canonical spellings; ``fp32``, ``bf16``, ``fp16``
and ``half`` are accepted everywhere a dtype is given (Python and the command line).

The rule: asked for no dtype, a model loaded to compute with gets

* **float32 on a CPU** — a float16 or bfloat16 checkpoint is converted: half precision is a storage format
  there, not a compute dtype (most CPUs run it many times slower, and float16 overflows in training: a
  plain loop on the fp16 demo model got losses ``6.34, nan, nan``);
* **its checkpoint's dtype on a GPU** (``half: true`` configs: float16; pass ``dtype="bfloat16"`` to train).

An explicit dtype always wins; float16/bfloat16 on a CPU then gets one warning. Loaders that only move
weights (``cpmbee.checkpoint.load_model``, ``convert``, ``merge-lora``) keep the stored dtype unless told.

This module imports torch only inside its functions (the command line reads the names without it).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "canonical_dtype", "compute_dtype", "torch_dtype", "warn_if_half_on_cpu"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
ALIASES_HELP = "fp32, bf16, fp16 accepted"


def canonical_dtype(name: str) -> str:
    """``"bf16"`` → ``"bfloat16"``; an unknown name is a ``ValueError`` listing the accepted ones."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise ValueError(f"unknown dtype {name!r}: use {', '.join(DTYPE_NAMES)} ({ALIASES_HELP})")
    return _ALIASES[key]


def torch_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name (any spelling) or a dtype; ``None`` stays ``None``."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    dtype: torch.dtype = getattr(torch, canonical_dtype(value))
    return dtype


def _is_cpu(device: Any) -> bool:
    import torch

    if device is None:
        return not torch.cuda.is_available()
    return torch.device(device).type == "cpu"


def compute_dtype(requested: str | torch.dtype | None, device: Any = None) -> torch.dtype | None:
    """The dtype to load a model in for computing on ``device`` (``None``: this machine's accelerator when
    it has one). ``requested`` wins (warning for half precision on a CPU); without it: float32 on a CPU,
    ``None`` (the checkpoint's own) elsewhere."""
    import torch

    dtype = torch_dtype(requested)
    if dtype is None:
        return torch.float32 if _is_cpu(device) else None
    warn_if_half_on_cpu(dtype, device)
    return dtype


def warn_if_half_on_cpu(dtype: torch.dtype | str, device: Any = None) -> None:
    """One warning when half precision is asked for on a CPU (slow, and float16 overflows in training)."""
    import torch

    resolved = torch_dtype(dtype)
    if resolved in (torch.float16, torch.bfloat16) and _is_cpu(device):
        name = canonical_dtype(str(resolved))
        warnings.warn(
            f"{name} on the CPU: half precision is a storage format there, not a compute dtype (much slower"
            f"{', and float16 overflows in training' if name == 'float16' else ''}); float32 is the CPU default",
            UserWarning,
            stacklevel=3,
        )
