"""Weight-only quantization of CPM-Bee's linear layers with bitsandbytes (CPU and CUDA).

``quantize_model(model, bits=8)`` replaces every ``CpmBeeLinear`` (attention projections and feed-forward
weights, 97% of the 10B model's parameters) by a bitsandbytes layer that keeps CPM-Bee's
``1/sqrt(fan_in)`` output scaling, under the same module name:

* ``bits=8``: LLM.int8 (``Linear8bitLt``): int8 weights with per-row scales, outlier features kept in
  16 bit (``threshold``);
* ``bits=4``: 4-bit NormalFloat (``Linear4bit``, ``quant_type="nf4"`` or ``"fp4"``) in blocks of 64
  weights, computed in ``compute_dtype``.

The embedding (also the output projection) stays in the model's dtype. Quantize right after loading:
weights are converted one layer at a time, so peak memory is the quantized model plus one layer.
bitsandbytes is an optional dependency (``pip install 'cpmbee[quant]'``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .model import CpmBeeLinear

__all__ = ["model_memory_bytes", "quantize_model"]


class _ExpectedNotes(logging.Filter):
    """Drops bitsandbytes' notes about what it does by design: LLM.int8 rounds its inputs through float16
    (logged on every matmul, thousands of lines a minute when serving) and the CPU 4-bit path falls back to
    its own kernel when the optional ``kernels`` package is absent. Other records pass."""

    NOTES = ("MatMul8bitLt: inputs will be cast from", "Failed to load CPU gemm_4bit_forward")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTES)


@contextlib.contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """Importing bitsandbytes on a machine without its optional CPU kernel package logs a warning ("Failed
    to load CPU gemm_4bit_forward from kernels-community …") that no cpmbee path needs; hold it back while
    bitsandbytes, or peft (which imports it), loads."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _bnb() -> Any:
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedNotes) for f in log.filters):
            log.addFilter(_ExpectedNotes())
    try:
        with quiet_bitsandbytes_import():
            import bitsandbytes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("quantization needs bitsandbytes: pip install 'cpmbee[quant]'") from err
    return bitsandbytes


def _scaled(base: type, scale: float) -> type:
    """A subclass of a bitsandbytes linear whose output is divided by ``scale`` like ``CpmBeeLinear``."""

    class Scaled(base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) / self.cpmbee_scale

    Scaled.__name__ = Scaled.__qualname__ = f"CpmBee{base.__name__}"
    return Scaled


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    *,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    threshold: float = 6.0,
    skip: tuple[str, ...] = (),
) -> nn.Module:
    """Quantize the linear weights of ``model`` in place and return it.

    Args:
        bits: 8 (LLM.int8) or 4 (NF4/FP4).
        quant_type: ``"nf4"`` or ``"fp4"`` for 4 bits.
        compute_dtype: dtype of the 4-bit matmul (default: the embedding's dtype).
        threshold: LLM.int8 outlier threshold (0 disables the 16-bit outlier path).
        skip: module-name substrings to leave unquantized (e.g. ``("layers.0.",)``).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    bnb = _bnb()
    dtype = compute_dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, CpmBeeLinear)]
    if not targets:
        raise ValueError("no CpmBeeLinear layers to quantize (already quantized?)")
    for name, linear in targets:
        if any(s in name for s in skip):
            continue
        weight = linear.weight.data
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        if bits == 8:
            new = _scaled(bnb.nn.Linear8bitLt, linear.scale)(
                linear.in_features,
                linear.out_features,
                bias=False,
                has_fp16_weights=False,
                threshold=threshold,
            )
            new.weight = bnb.nn.Int8Params(
                weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
            )
        else:
            new = _scaled(bnb.nn.Linear4bit, linear.scale)(
                linear.in_features,
                linear.out_features,
                bias=False,
                compute_dtype=dtype,
                quant_type=quant_type,
            )
            new.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type=quant_type)
        new.cpmbee_scale = linear.scale
        new = new.to(device)  # bitsandbytes quantizes when the weight is moved
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    config: Any = model.config  # a PreTrainedConfig: quantization is recorded there for /health and saves
    config.quantization = {"bits": bits, "quant_type": quant_type if bits == 4 else "llm.int8"}
    return model


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized storage counted as stored)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
        scb = getattr(t, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total
