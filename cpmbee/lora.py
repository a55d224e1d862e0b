"""LoRA for CPM-Bee on PEFT: add adapters, load PEFT or OpenDelta deltas, merge them into the weights.

CPM-Bee's linears divide their output by ``sqrt(in_features)`` (``CpmBeeLinear``). A LoRA branch sits
*beside* the linear, after that scaling, exactly as OpenDelta's LoRA on the original model::

    y = x @ W.T / sqrt(in) + (x @ A.T @ B.T) * (alpha / r)

so in weight space the delta is ``sqrt(in) * (alpha / r) * B @ A``. PEFT's stock merge would add it without
the ``sqrt(in)`` factor; here adapters are built with ``CpmBeeLoraLinear``, whose delta includes it, so
``merge_lora`` and PEFT's own ``merge_and_unload`` / ``merge_adapter`` are all exact.

Deltas trained by the original tooling (``finetune_cpm_bee.py --use-delta``: OpenDelta, rank 8, alpha 16,
scaling 2) hold ``encoder.layers.N.self_att.self_attention.project_q.lora.lora_A`` ``[r, in]`` and
``…lora.lora_B`` ``[out, r]`` (keys with or without ``cpmbee.``; unused ``…lora.lin.*`` entries are ignored);
``load_adapter`` reads them as well as PEFT adapter directories. ``peft`` is imported on first use.

Example::

    model = load_model("cpm-bee-1b/", dtype="bfloat16")
    model = load_adapter(model, "cpm-bee-1b-delta-best.pt")     # or a PEFT adapter directory
    merged = merge_lora(model)                                   # a plain CpmBeeForCausalLM again
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .files import atomic_directory
from .hf import CpmBeeForCausalLM
from .model import CpmBeeLinear
from .quantize import quiet_bitsandbytes_import

__all__ = [
    "DEFAULT_TARGETS",
    "LINEAR_NAMES",
    "add_lora",
    "load_adapter",
    "load_opendelta",
    "lora_config",
    "lora_linear_class",
    "merge_lora",
    "save_merged",
    "trainable_parameters",
]

DEFAULT_TARGETS = ("project_q", "project_v")
# Leaf names of CpmBeeLinear modules (what target_modules may name).
LINEAR_NAMES = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")
OPENDELTA_ALPHA = 16.0  # OpenDelta's default lora_alpha (with its default r = 8: scaling 2)
_OPENDELTA_KEY = re.compile(r"(?P<module>.+)\.lora\.lora_(?P<which>[AB])")
_PREFIX = "cpmbee."


def _peft() -> Any:
    try:
        with quiet_bitsandbytes_import():
            import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "LoRA needs the `peft` package: pip install 'cpmbee[lora]' (or pip install peft)"
        ) from err
    return peft


_LORA_LINEAR: type[nn.Module] | None = None


def _weight(module: Any) -> torch.Tensor:
    """``module.weight``, typed (PEFT's layers type their sub-modules loosely)."""
    weight: torch.Tensor = module.weight
    return weight


def lora_linear_class() -> type[nn.Module]:
    """``CpmBeeLoraLinear``: PEFT's LoRA ``Linear`` whose weight-space delta includes ``sqrt(in_features)``."""
    global _LORA_LINEAR
    if _LORA_LINEAR is None:
        from peft.tuners.lora.layer import Linear

        class CpmBeeLoraLinear(Linear):
            """LoRA around a ``CpmBeeLinear``; forward is PEFT's, ``get_delta_weight`` is rescaled for merging."""

            def get_delta_weight(self, adapter: str) -> torch.Tensor:
                base = self.get_base_layer()
                a, b = _weight(self.lora_A[adapter]).float(), _weight(self.lora_B[adapter]).float()
                delta = (b @ a) * (self.scaling[adapter] * getattr(base, "scale", 1.0))
                return delta.to(_weight(base).dtype)

        _LORA_LINEAR = CpmBeeLoraLinear
    return _LORA_LINEAR


def lora_config(
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> Any:
    """A ``peft.LoraConfig`` for CPM-Bee (its linears get ``CpmBeeLoraLinear``); scaling is ``alpha / r``."""
    peft = _peft()
    if r < 1:
        raise ValueError(f"lora r must be a positive integer, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
    targets = list(targets)
    if not targets:
        raise ValueError("lora targets must name at least one module")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    config._register_custom_module({CpmBeeLinear: lora_linear_class()})
    return config


def _check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, CpmBeeLinear)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(
                f"lora target {target!r} matches no linear of the model; targets are leaf names among "
                f"{', '.join(LINEAR_NAMES)} (or full module paths)"
            )


def add_lora(
    model: CpmBeeForCausalLM,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    adapter_name: str = "default",
) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with fresh LoRA adapters (B = 0: the output is unchanged).

    Only the adapter parameters are trainable; the adapters are float32 even over a bf16/fp16 base.
    Defaults are OpenDelta's as the original fine-tuning used them: ``project_q``/``project_v``, r 8, alpha 16.
    """
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        raise ValueError("the model already has adapters (it is a PeftModel)")
    _check_targets(model, targets)
    return peft.get_peft_model(model, lora_config(r, alpha, dropout, targets), adapter_name=adapter_name)


def _read_delta(delta: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(delta, Mapping):
        return dict(delta)
    from .checkpoint import load_state_dict

    return load_state_dict(delta)


def load_opendelta(
    model: CpmBeeForCausalLM,
    delta: str | os.PathLike | Mapping[str, torch.Tensor],
    alpha: float = OPENDELTA_ALPHA,
    adapter_name: str = "default",
) -> Any:
    """Add the LoRA adapters of an OpenDelta delta (a ``*-delta-best.pt`` file or its state dict).

    The rank comes from the tensors; scaling is ``alpha / r`` with OpenDelta's default ``alpha = 16``. Only
    the modules present in the delta get adapters. Returns a ``peft.PeftModel``.
    """
    peft = _peft()
    if isinstance(model, peft.PeftModel):
        raise ValueError("the model already has adapters (it is a PeftModel)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_delta(delta).items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if ".lora.lin." in name:  # registered but unused by some OpenDelta versions
            continue
        match = _OPENDELTA_KEY.fullmatch(name)
        if match is None:
            raise ValueError(
                f"{key!r} is not an OpenDelta LoRA key (expected '….lora.lora_A' / '….lora.lora_B')"
            )
        pairs.setdefault(_PREFIX + match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise ValueError("the delta holds no LoRA weights")
    ranks = set()
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{module}: the delta has lora_{'B' if 'A' in ab else 'A'} missing")
        if ab["A"].ndim != 2 or ab["B"].ndim != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(
                f"{module}: lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)} are not [r, in] and [out, r]"
            )
        ranks.add(int(ab["A"].shape[0]))
    if len(ranks) != 1:
        raise ValueError(f"the delta mixes LoRA ranks {sorted(ranks)}; one rank is supported")
    rank = ranks.pop()
    modules = dict(model.named_modules())
    for module in pairs:
        target = modules.get(module)
        if not isinstance(target, CpmBeeLinear):
            raise ValueError(f"the delta adapts {module!r}, which is not a linear of this model")
        a, b = pairs[module]["A"], pairs[module]["B"]
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise ValueError(
                f"{module}: delta shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the linear "
                f"[{target.out_features}, {target.in_features}]"
            )
    config = lora_config(r=rank, alpha=alpha, dropout=0.0, targets=sorted(pairs))
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for module, ab in pairs.items():
            layer = inner.get_submodule(module)
            layer.lora_A[adapter_name].weight.copy_(ab["A"])
            layer.lora_B[adapter_name].weight.copy_(ab["B"])
    return peft_model


def load_adapter(
    model: CpmBeeForCausalLM,
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
    alpha: float = OPENDELTA_ALPHA,
    adapter_name: str = "default",
) -> Any:
    """Attach saved LoRA adapters: a PEFT adapter directory (``adapter_config.json``) or an OpenDelta delta
    file (``alpha`` applies to these only). Returns a ``peft.PeftModel``."""
    peft = _peft()
    path = Path(path)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path}: no adapter_config.json (not a PEFT adapter directory)")
        config = peft.LoraConfig.from_pretrained(str(path))
        if getattr(config, "use_dora", False):
            raise ValueError(f"{path}: DoRA adapters are not supported")
        config._register_custom_module({CpmBeeLinear: lora_linear_class()})
        config.inference_mode = not is_trainable
        return peft.PeftModel.from_pretrained(
            model, str(path), config=config, adapter_name=adapter_name, is_trainable=is_trainable
        )
    if not path.is_file():
        raise FileNotFoundError(f"adapter {str(path)!r} does not exist")
    peft_model = load_opendelta(model, path, alpha=alpha, adapter_name=adapter_name)
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
    return peft_model


@torch.no_grad()
def merge_lora(model: nn.Module) -> CpmBeeForCausalLM:
    """Fold the active LoRA adapters into the base weights and return the plain model (adapters removed).

    Exact for any LoRA layer over a ``CpmBeeLinear`` (its delta is multiplied by ``sqrt(in_features)``), also
    for adapters that PEFT built with its stock layer; deltas are computed in float32.
    """
    peft = _peft()
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, peft.PeftModel):
        raise ValueError(f"merge_lora expects a peft.PeftModel, got {type(model).__name__}")
    custom = lora_linear_class()
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A or adapter in getattr(layer, "merged_adapters", ()):
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                raise ValueError(f"{name}: LoRA variants (DoRA, …) cannot be merged here")
            if isinstance(layer, custom):
                delta: torch.Tensor = cast(Any, layer).get_delta_weight(adapter).float()
            else:
                a, b = _weight(layer.lora_A[adapter]).float(), _weight(layer.lora_B[adapter]).float()
                delta = (b @ a) * layer.scaling[adapter]
                if isinstance(base, CpmBeeLinear):
                    delta = delta * base.scale
            weight = _weight(base)
            weight.copy_((weight.float() + delta).to(weight.dtype))
    merged: CpmBeeForCausalLM = model.unload()  # swaps every LoRA layer back for its (now updated) base layer
    return merged


def save_merged(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Merge (when ``model`` has adapters) and write a model directory that ``load_model`` /
    ``from_pretrained`` read: safetensors + ``config.json`` (+ the tokenizer files). Written atomically."""
    peft = _peft()
    plain: Any = merge_lora(model) if isinstance(model, peft.PeftModel) else model
    directory = Path(directory)
    with atomic_directory(directory) as out:
        plain.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return directory


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require gradients, by name (the adapters of a LoRA model)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
