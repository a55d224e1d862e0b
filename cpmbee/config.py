"""Model configuration for CPM-Bee.

`CpmBeeConfig` is a `transformers.PreTrainedConfig` (``model_type="cpmbee"``). It reads both spellings of
the fields: the Hugging Face names (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``) and the
names of the original OpenBMB JSON files (``dim_model``, ``num_heads``, ``num_layers``), so the official
``cpm-bee-10b.json`` loads as it is.

Presets cover the released shapes (``cpm-bee-10b``/``-5b``/``-2b``/``-1b``, the ``-3b`` research shape) and a
``tiny`` shape for tests: ``CpmBeeConfig.from_preset("cpm-bee-1b")``.

This module imports no torch at import time, so tooling can read configs cheaply.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

from transformers import PreTrainedConfig

__all__ = ["PRESETS", "CpmBeeConfig"]

DTYPES = ("float32", "float16", "bfloat16")  # what a CPM-Bee model computes in

# The released 5B/2B/1B models are structured-pruned versions of the 10B skeleton: every one keeps the 48
# layers but drops whole attention or FFN sub-blocks. The kept/dropped pattern is the same in all three
# official configs (19 attention and 24 FFN sub-blocks kept), written here as (mask_att, mask_ffn) per layer.
_PRUNED_48 = (
    "FF TF FF TF TT TF TT TT FF FF TT TF TF TT FF TT FF FT TF TT FF FT TT TT "
    "FF TT FF TT TT FF TT FF TT FF TT TF TT TT TT FF TT FF TT TT FF TT FF FF"
)
PRUNED_MASK_MODULES: list[list[bool]] = [[pair[0] == "T", pair[1] == "T"] for pair in _PRUNED_48.split()]

_COMMON = {
    "vocab_size": 86583,
    "position_bias_num_buckets": 256,
    "position_bias_num_segment_buckets": 256,
    "position_bias_max_distance": 2048,
    "eps": 1e-6,
    "dropout_p": 0.0,
}

# The 10B's outer shape, shared by the pruned 5B/2B/1B (they differ in head and FFN widths and mask modules).
_BEE_48_LAYERS: dict[str, Any] = {
    **_COMMON,
    "hidden_size": 4096,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "half": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    "cpm-bee-10b": {**_BEE_48_LAYERS, "dim_head": 128, "dim_ff": 10240},
    "cpm-bee-5b": {**_BEE_48_LAYERS, "dim_head": 128, "dim_ff": 10240, "mask_modules": PRUNED_MASK_MODULES},
    "cpm-bee-2b": {**_BEE_48_LAYERS, "dim_head": 64, "dim_ff": 5120, "mask_modules": PRUNED_MASK_MODULES},
    "cpm-bee-1b": {**_BEE_48_LAYERS, "dim_head": 40, "dim_ff": 1024, "mask_modules": PRUNED_MASK_MODULES},
    # The research shape of the official `cpm-bee-3b.json` (its vocabulary is 3 entries shorter).
    "cpm-bee-3b": {
        **_COMMON,
        "vocab_size": 86580,
        "hidden_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "dim_head": 80,
        "dim_ff": 3072,
        "half": True,
    },
    # For tests and demos: the real vocabulary size, everything else small.
    "tiny": {
        **_COMMON,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "dim_head": 8,
        "dim_ff": 64,
    },
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CpmBeeConfig(PreTrainedConfig):
    """Configuration of a CPM-Bee model.

    Fields (original OpenBMB names in brackets):
        vocab_size: rows of the (tied) input/output embedding.
        hidden_size [dim_model]: width of the residual stream.
        num_attention_heads [num_heads]: attention heads per layer.
        dim_head: width of one head; the attention width is ``num_attention_heads * dim_head`` and need not
            equal ``hidden_size`` (the pruned 2B/1B models shrink it).
        dim_ff: inner width of the gated-GELU feed-forward block.
        num_hidden_layers [num_layers]: transformer layers.
        dropout_p: dropout on attention probabilities and on both residual branches (training only).
        position_bias_num_buckets: buckets of the in-segment relative-position bias.
        position_bias_num_segment_buckets: buckets of the segment-relation bias. Inputs encoded with
            ``max_depth = M`` use relation buckets up to ``M * M``, so this must be at least ``M * M + 1``
            (65 for the default M = 8; the released models have 256).
        position_bias_max_distance: distance at which the log-spaced position buckets saturate.
        eps: RMSNorm epsilon.
        init_std: std of the linear weights at random init (the linears divide by sqrt(fan_in)).
        distance_scale: rotary step per sub-token index in the embedding (``theta = distance_scale * sub``).
        mask_modules: per layer ``[mask_att, mask_ffn]``; a masked sub-block has no parameters and is skipped.
        half: the checkpoint was trained/saved in float16. It only chooses the *default* dtype when the user
            asks for none; an explicit ``dtype`` always wins.
        pad_token_id / unk_token_id / bos_token_id / eos_token_id: the ids of ``<pad>``, ``<unk>``, ``<s>``
            and ``</s>``, the same in every CPM-Bee vocabulary; generation from plain token ids (transformers'
            ``generate(input_ids)``, which gets no tokenizer) reads them here.
    """

    model_type = "cpmbee"
    attribute_map = {
        "dim_model": "hidden_size",
        "num_heads": "num_attention_heads",
        "num_layers": "num_hidden_layers",
    }

    vocab_size: int = 86583
    hidden_size: int = 4096
    num_attention_heads: int = 32
    dim_head: int = 128
    dim_ff: int = 10240
    num_hidden_layers: int = 48
    dropout_p: float = 0.0
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048
    eps: float = 1e-6
    init_std: float = 1.0
    distance_scale: float = 16
    mask_modules: list[list[bool]] | None = None
    half: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    unk_token_id: int = 1
    bos_token_id: int = 6
    eos_token_id: int = 7

    def __post_init__(self, **kwargs: Any) -> None:
        for name, value in (("dtype", self.dtype), ("torch_dtype", kwargs.get("torch_dtype"))):
            # checked before transformers turns the name into a torch attribute (AttributeError otherwise)
            if value is not None and str(value).removeprefix("torch.") not in DTYPES:
                raise ValueError(
                    f"CpmBeeConfig.{name} must be one of {', '.join(DTYPES)} or null, got {value!r}"
                )
        if self.half and self.dtype is None and kwargs.get("torch_dtype") is None:
            # Only a default: `from_pretrained(..., dtype=torch.float32)` still gives float32.
            self.dtype = "float16"
        super().__post_init__(**kwargs)
        self._validate()
        if self.mask_modules is not None:
            self.mask_modules = [[bool(a), bool(f)] for a, f in self.mask_modules]

    def _validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "dim_head",
            "dim_ff",
            "num_hidden_layers",
            "position_bias_num_buckets",
            "position_bias_num_segment_buckets",
            "position_bias_max_distance",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CpmBeeConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % 2:
            raise ValueError(
                f"CpmBeeConfig.hidden_size must be even (rotary embedding), got {self.hidden_size}"
            )
        for name in ("eps", "init_std", "distance_scale"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"CpmBeeConfig.{name} must be a positive number, got {value!r}")
        if not _is_number(self.dropout_p) or not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"CpmBeeConfig.dropout_p must be a number in [0, 1), got {self.dropout_p!r}")
        for name in ("half", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CpmBeeConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.mask_modules is not None:
            if len(self.mask_modules) != self.num_hidden_layers:
                raise ValueError(
                    f"CpmBeeConfig.mask_modules has {len(self.mask_modules)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give one [mask_att, mask_ffn] pair per layer"
                )
            for i, pair in enumerate(self.mask_modules):
                if (
                    not isinstance(pair, (list, tuple))
                    or len(pair) != 2
                    or any(flag not in (True, False) for flag in pair)  # also 0 and 1
                ):
                    raise ValueError(
                        f"CpmBeeConfig.mask_modules[{i}] must be a [mask_att, mask_ffn] pair of true/false,"
                        f" got {pair!r}"
                    )

    # ------------------------------------------------------------------ helpers
    def layer_masks(self) -> list[tuple[bool, bool]]:
        """``(mask_att, mask_ffn)`` for every layer (all ``False`` when ``mask_modules`` is unset)."""
        if self.mask_modules is None:
            return [(False, False)] * self.num_hidden_layers
        return [(bool(a), bool(f)) for a, f in self.mask_modules]

    @property
    def attention_width(self) -> int:
        return self.num_attention_heads * self.dim_head

    def num_parameters_estimate(self) -> int:
        """Parameter count implied by the shape (no model is built)."""
        d, a, ff = self.hidden_size, self.attention_width, self.dim_ff
        total = self.vocab_size * d + d  # embedding + output_layernorm
        total += (
            self.position_bias_num_buckets + self.position_bias_num_segment_buckets
        ) * self.num_attention_heads
        for mask_att, mask_ffn in self.layer_masks():
            if not mask_att:
                total += d + 4 * d * a
            if not mask_ffn:
                total += d + 3 * d * ff
        return total

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CpmBeeConfig:
        """A config of a named shape: one of ``PRESETS`` (``cpm-bee-10b``, ``cpm-bee-1b``, ``tiny`` …)."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[key])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> CpmBeeConfig:
        """Read a config JSON in either naming style (HF ``config.json`` or the original OpenBMB file);
        ``ValueError`` names the file and the field."""
        with open(json_file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{json_file}: not a valid JSON config ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{json_file}: a config must be a JSON object")
        for key in (
            "auto_map",
            "architectures",
            "_name_or_path",
            "_from_model_config",
            "transformers_version",
        ):
            data.pop(key, None)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"{json_file}: model_type is {model_type!r}, expected {cls.model_type!r}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{json_file}: {err}") from None
