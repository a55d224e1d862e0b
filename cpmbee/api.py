"""Loading a model and its tokenizer in one call: what the CLI, the server and the evaluator share.

``load_model_and_tokenizer(None)`` gives the embedded default model shipped inside the package (a small
demo model trained with this project's own tools, see ``docs/embedded-model.md``), so every command works
offline on a fresh machine.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch

from .checkpoint import load_model
from .dtypes import compute_dtype
from .files import find_vocab
from .hf import CpmBeeForCausalLM, CpmBeeTokenizer

__all__ = ["DEFAULT_MODEL_NAME", "default_model_path", "load_model_and_tokenizer", "resolve_device"]

DEFAULT_MODEL_NAME = "cpmbee-demo"


def default_model_path() -> Path:
    """Directory of the embedded default model (``cpmbee/models/cpmbee-demo``)."""
    path = Path(str(resources.files("cpmbee") / "models" / DEFAULT_MODEL_NAME))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {path}; reinstall cpmbee or pass --model DIR"
        )
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → the first CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_and_tokenizer(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    attn_implementation: str | None = None,
    compile: bool = False,
    **dispatch: Any,
) -> tuple[CpmBeeForCausalLM, CpmBeeTokenizer]:
    """Load a model (HF directory, original ``.pt`` file or checkpoint directory) and its tokenizer.

    Args:
        path: the model; ``None`` → the embedded default model.
        device: ``"cpu"``, ``"cuda:0"``, …; ``None``/``"auto"`` picks CUDA when available.
        dtype: compute dtype (any spelling, ``cpmbee.dtypes``); default float32 on the CPU and the
            checkpoint's own elsewhere; half precision on the CPU warns.
        quantize: ``"int8"`` or ``"nf4"`` (bitsandbytes weight-only), after loading.
        compile: compile the decode step (``cpmbee.generation.compile_decoding``): slow first call, faster
            decoding after.
        dispatch: ``max_memory``/``offload_folder`` spread the layers over devices (see ``cpmbee.offload``).
    """
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    target = resolve_device(device)
    model = load_model(path, dtype=compute_dtype(dtype, target), attn_implementation=attn_implementation)
    tokenizer = CpmBeeTokenizer(find_vocab(path))
    if quantize is not None:
        from .quantize import quantize_model

        bits = {"int8": 8, "nf4": 4, "fp4": 4}.get(quantize)
        if bits is None:
            raise ValueError(f"quantize must be 'int8', 'nf4' or 'fp4', got {quantize!r}")
        model = cast(CpmBeeForCausalLM, quantize_model(_moved(model, target), bits, quant_type=quantize))
    elif dispatch.get("max_memory"):
        from .offload import dispatch_with_memory_limit

        model = cast(CpmBeeForCausalLM, dispatch_with_memory_limit(model, **dispatch))
    else:
        _moved(model, target)
    if compile:
        from .generation import compile_decoding

        compile_decoding(model)
    model.eval()
    return model, tokenizer


def _moved(model: CpmBeeForCausalLM, device: torch.device) -> CpmBeeForCausalLM:
    """``model.to(device)`` (in place), typed: transformers' wrapper of ``to`` hides nn.Module's signature."""
    torch.nn.Module.to(model, device)
    return model
