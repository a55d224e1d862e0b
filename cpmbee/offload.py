"""Spreading a model over GPUs, the CPU and disk with accelerate (the model card's multi-GPU recipe).

Transformer blocks are never split (``no_split_module_classes=["CpmBeeTransformerBlock"]``); the input
embedding — which is also the output projection — and the final ``output_layernorm`` stay on the first
device, so the logits are computed where generation reads them. Layers that fit nowhere go to disk.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

import torch
from torch import nn

__all__ = ["device_map_for", "dispatch_with_memory_limit", "parse_memory_limit"]

NO_SPLIT = ["CpmBeeTransformerBlock"]
PINNED = ("cpmbee.input_embedding", "cpmbee.encoder.output_layernorm")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_memory_limit(text: str) -> dict[int | str, str | int]:
    """``"4GiB"`` (the first GPU, or the CPU without one) or ``"cuda:0=4GiB,cpu=8GiB"`` → accelerate's
    ``max_memory`` mapping (GPU indices as ints, ``"cpu"``)."""
    out: dict[int | str, str | int] = {}
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("memory limit: empty (expected e.g. '4GiB' or 'cuda:0=4GiB,cpu=8GiB')")
    for part in parts:
        if "=" in part:
            name, size = (s.strip() for s in part.split("=", 1))
        else:
            name, size = ("cuda:0" if torch.cuda.is_available() else "cpu"), part.strip()
        if not _SIZE.match(size):
            raise ValueError(f"memory limit: {size!r} is not a size like '4GiB' or '800MB'")
        if name == "cpu":
            key: int | str = "cpu"
        elif re.fullmatch(r"(cuda:)?\d+", name):
            key = int(name.split(":")[-1])
        else:
            raise ValueError(f"memory limit: unknown device {name!r} (use cpu, cuda:N or N)")
        size = size.replace(" ", "")
        out[key] = int(size.upper().removesuffix("B")) if size.upper().removesuffix("B").isdigit() else size
    return out


def device_map_for(model: nn.Module, max_memory: dict[int | str, str | int]) -> dict[str, Any]:
    """A device map filling devices in order (GPUs, then CPU, then disk) within ``max_memory``."""
    from accelerate import infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT)
    if len(set(device_map.values())) > 1:
        first = next(iter(max_memory))
        for name in PINNED:
            covering = [k for k in device_map if k == name or name.startswith(k + ".") or k == ""]
            if covering and all(device_map[k] != first for k in covering):
                device_map[name] = first
    return device_map


def dispatch_with_memory_limit(
    model: nn.Module,
    max_memory: dict[int | str, str | int] | str,
    offload_folder: str | None = None,
    device_map: dict[str, Any] | None = None,
) -> nn.Module:
    """Place ``model`` according to ``max_memory`` (a mapping or ``parse_memory_limit`` text) and return it.

    Layers mapped to ``"disk"`` are written to ``offload_folder`` (a temporary directory by default) and
    loaded layer by layer during the forward pass."""
    from accelerate import dispatch_model

    if isinstance(max_memory, str):
        max_memory = parse_memory_limit(max_memory)
    device_map = device_map or device_map_for(model, max_memory)
    if "disk" in device_map.values() and offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="cpmbee-offload-")
    if set(device_map.values()) == {"disk"}:
        raise ValueError(f"memory limit {max_memory} is too small: not even one layer fits")
    first = next(iter(max_memory))
    main = "cpu" if first == "cpu" else f"cuda:{int(first)}"  # accelerate compares it with "cpu" as a string
    return dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_folder)
