"""Loading and converting CPM-Bee checkpoints.

Layouts understood:

* the original OpenBMB files: one ``cpm-bee-*.pt`` (``torch.save`` of the state dict, un-prefixed keys
  ``encoder.layers.0…``, ``input_embedding.weight``, ``position_bias.relative_attention_bias``) with a config
  JSON in the original names (``dim_model``, ``num_layers``, …);
* Hugging Face directories: ``config.json`` (either naming) with ``pytorch_model.bin``, ``model.safetensors``
  or sharded variants, keys with or without the ``cpmbee.`` prefix (the hub's ``pytorch_model.bin`` is the
  original state dict).

Tensors are read with ``safetensors`` or ``torch.load(weights_only=True, mmap=True)`` and assigned into a model
built on the meta device, so a 10B checkpoint is never held twice in memory. ``convert`` writes a
self-contained directory (safetensors, ``config.json``, ``generation_config.json``, ``vocab.txt``,
``tokenizer_config.json``) that
``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` read once ``cpmbee`` is imported.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import CpmBeeConfig
from .dtypes import torch_dtype
from .files import atomic_directory, find_vocab
from .hf import CpmBeeForCausalLM, CpmBeeTokenizer

__all__ = ["convert", "find_config", "load_model", "load_state_dict", "to_model_keys"]

PREFIX = "cpmbee."
_IGNORED_KEYS = ("lm_head.weight",)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _unsafe_pickle_error(path: Path, err: Exception) -> ValueError:
    """The error for a pickle that ``weights_only`` loading refused or could not read (never suggesting
    to load it unrestricted)."""
    blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
    if isinstance(err, pickle.UnpicklingError) and blocked:
        return ValueError(
            f"{path}: not a safe checkpoint: it holds {blocked.group(1)}, not only tensors and plain data,"
            " and unpickling such objects can run code, so it is not loaded. Have the program that wrote it"
            " save the weights alone as safetensors (safetensors.torch.save_file(model.state_dict(),"
            " 'model.safetensors')) and load that file."
        )
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"{path}: not a readable PyTorch checkpoint ({first_line})")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one weight file: ``.safetensors``, or a torch pickle read with ``weights_only=True`` (memory-mapped).
    A damaged or unsafe file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise _unsafe_pickle_error(path, err) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(load_state_dict(directory / file))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return load_state_dict(directory / name)
    candidates = sorted(directory.glob("*.pt")) + sorted(directory.glob("*.safetensors"))
    if len(candidates) == 1:
        return load_state_dict(candidates[0])
    raise FileNotFoundError(
        f"{directory}: no weights found (looked for {', '.join(_WEIGHT_FILES)} or one *.pt)"
    )


def to_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of ``CpmBeeForCausalLM.state_dict()``: add the ``cpmbee.`` prefix, drop the unused ``lm_head``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _IGNORED_KEYS:
            continue
        if ".lora." in key:
            raise ValueError(
                f"{key!r} is a LoRA delta: load the base checkpoint first, then the delta with"
                " cpmbee.lora.load_adapter (or merge it: cpmbee merge-lora BASE DELTA OUT)"
            )
        out[key if key.startswith(PREFIX) else PREFIX + key] = value
    return out


def find_config(path: str | os.PathLike) -> Path:
    """The config JSON of a checkpoint: ``config.json`` in the directory or beside the file, else the only
    ``*.json`` beside the file that looks like a model config."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if (directory / "config.json").is_file():
        return directory / "config.json"
    found = []
    for candidate in sorted(directory.glob("*.json")):
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and ("dim_model" in data or "hidden_size" in data):
            found.append(candidate)
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"no model config found for {path} (give one with --config / config=)")


def _count_nonfinite(tensor: torch.Tensor, chunk: int = 1 << 22) -> int:
    """NaN/inf values of a floating tensor, in slices (no full-size temporary). A slice's sum is finite
    unless it holds NaN/inf (or overflows), so only a slice whose sum is not finite is counted exactly."""
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    bad = 0
    for part in tensor.reshape(-1).split(chunk):
        if not torch.isfinite(part.sum(dtype=accumulate)):
            bad += int((~torch.isfinite(part)).sum())
    return bad


def load_model(
    path: str | os.PathLike,
    *,
    config: CpmBeeConfig | str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    check_finite: bool = True,
) -> CpmBeeForCausalLM:
    """Load a CPM-Bee model from a directory (any layout above) or a single checkpoint file.

    Args:
        path: checkpoint file or directory.
        config: a ``CpmBeeConfig``, a config JSON path, or None to find it beside the weights.
        dtype: compute dtype; None keeps the checkpoint's (an explicit one always wins over ``half``).
        device: where the weights go (default CPU).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` (the original's arithmetic, bit for bit).
        check_finite: refuse weights holding NaN or inf (a damaged checkpoint would otherwise generate
            garbage without a word); this reads every weight once. ``False`` loads them as they are.
    """
    path = Path(path)
    if not isinstance(config, CpmBeeConfig):
        config = CpmBeeConfig.from_json_file(config if config is not None else find_config(path))
    target_dtype = torch_dtype(dtype)
    state = to_model_keys(_read_weights(path) if path.is_dir() else load_state_dict(path))

    with torch.device("meta"):
        model = CpmBeeForCausalLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the config (check its shape and mask_modules); missing {missing[:5]}{'…' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    nonfinite: list[str] = []
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[key].shape)}"
            )
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise ValueError(
                f"{path}: {key} has dtype {tensor.dtype}; weights must be floating point"
                " (float32, float16 or bfloat16)"
            )
        if check_finite and tensor.is_floating_point():
            bad = _count_nonfinite(tensor)
            if bad:
                nonfinite.append(f"{key} has {bad} NaN/inf values")
        if target_dtype is not None and tensor.is_floating_point() and tensor.dtype != target_dtype:
            state[key] = tensor.to(target_dtype)
    if nonfinite:
        more = f" (and {len(nonfinite) - 3} more tensors)" if len(nonfinite) > 3 else ""
        raise ValueError(
            f"{path}: damaged weights: {'; '.join(nonfinite[:3])}{more}"
            " (load_model(..., check_finite=False) loads them anyway)"
        )
    model.load_state_dict(state, assign=True, strict=True)
    if target_dtype is not None:
        model.config.dtype = target_dtype
    if attn_implementation is not None:
        model.config._attn_implementation = attn_implementation
    if device is not None:
        torch.nn.Module.to(model, device)  # transformers' wrapper of `to` hides nn.Module's signature
    model.eval()
    return model


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    config: str | os.PathLike | CpmBeeConfig | None = None,
    vocab: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Convert a checkpoint (original ``.pt`` or any directory layout) into an HF-style safetensors directory.

    ``dst`` receives ``config.json`` (HF names, ``model_type: cpmbee``), ``generation_config.json``,
    ``model*.safetensors``, ``vocab.txt`` and ``tokenizer_config.json``: what ``save_pretrained`` writes.
    It is written to a temporary directory first, so an interrupted conversion never leaves a half-written
    ``dst``.
    """
    src, dst = Path(src), Path(dst)
    vocab_path = find_vocab(src, vocab)
    model = load_model(src, config=config, dtype=dtype)
    tokenizer = CpmBeeTokenizer(vocab_path)
    try:
        with atomic_directory(dst) as out:
            model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(out)
    except OSError as err:  # a full disk, a quota, a read-only file system: dst is left as it was
        raise OSError(
            f"{dst}: could not write the converted model ({err.strerror or err}); nothing was changed there"
        ) from err
    return dst
