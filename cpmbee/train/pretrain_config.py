"""The ``cpmbee pretrain`` run config (YAML), validated with clear errors naming the bad field.

Every option is documented in ``docs/pretrain.md``; ``configs/pretrain/tiny.yaml`` is a runnable example.
Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["PretrainConfig", "load_pretrain_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    preset: str | None = None
    """A ``CpmBeeConfig`` preset (``tiny``, ``cpm-bee-1b`` …) to initialise randomly."""
    path: str | None = None
    """A model directory or original checkpoint to continue training from."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Config fields changed on the preset (e.g. ``num_hidden_layers: 4``)."""
    vocab: str | None = None
    """``vocab.txt``; default: the one in ``path``, else required for a preset."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype (keep float32 master weights and use ``train.mixed_precision`` for speed)."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of model.preset or model.path")
        return self


class DataSection(_Section):
    config: str
    """The mixture config (``datasets.json``/YAML, hot-reloaded while the run goes)."""
    max_length: int = Field(default=512, ge=8)
    """Tokens per row."""
    batch_size: int = Field(default=4, ge=1)
    """Rows per micro-batch per rank."""
    num_workers: int = Field(default=1, ge=0)
    """Data-loader worker processes (mixture streams) per rank; 0 builds batches in the training process."""
    max_depth: int = Field(default=8, ge=1)
    """Segment-relation depth cap of the encoder."""


class TrainSection(_Section):
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run (the run finishes there)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Or stop after this many (non-padding) tokens; the planned token budget of daily reports."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    schedule: Literal["constant", "linear", "cosine", "noam"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Floor of linear/cosine decay as a fraction of ``lr``."""
    decay_steps: int | None = Field(default=None, ge=1)
    """Length of the decay (default ``max_steps``)."""
    clip_grad: float | None = Field(default=1.0, gt=0)
    """Max global gradient norm (null: no clipping; the norm is still logged)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    skip_nonfinite: bool = True
    """Skip the optimizer step (and log a ``nan`` incident) when the loss or gradient norm is not finite."""


class CheckpointSection(_Section):
    every: int = Field(default=1000, ge=1)
    """Save every this many steps (and at the end, and on SIGTERM/SIGINT)."""
    keep_last: int | None = Field(default=3, ge=1)
    keep_every: int | None = Field(default=None, ge=1)
    """Also keep checkpoints whose step is a multiple of this."""
    resume: str = "auto"
    """``auto`` (latest checkpoint of the run if any), ``never``, or a checkpoint directory."""


class LoggingSection(_Section):
    tensorboard: bool = False
    """Also write TensorBoard scalars to ``RUN_DIR/tensorboard`` (needs the ``tensorboard`` package)."""
    console: bool = True
    utc_offset_hours: float = 0.0
    """Day boundary of the daily metrics files (the original CPM-Live used 16: 16:00 Beijing time)."""
    inspect_every: int | None = Field(default=100, ge=1)
    """Parameter/gradient statistics every this many steps (null: never)."""
    inspect_groups: Literal["parameter", "module"] = "parameter"
    """One entry per parameter, or per parameter name with the layer number folded (``layers.*``)."""
    data_every: int = Field(default=50, ge=1)
    """``data`` records (records read, skipped too long, epochs) every this many steps."""
    peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s per process for the MFU estimate (null: a table for known GPUs, else no MFU)."""
    status_every_s: float = Field(default=5.0, gt=0)


class LossSpikeSection(_Section):
    factor: float | None = Field(default=3.0, gt=1)
    """A task's loss above ``factor`` × its previous value is a spike (null: off)."""
    min_step: int = Field(default=0, ge=0)
    """Ignore spikes before this step (early training is noisy)."""


class SamplesSection(_Section):
    prompts: list[dict[str, Any]] = Field(default_factory=list)
    """Fixed CPM-Bee prompts generated at every checkpoint (``sample`` records); empty: off."""
    options: dict[str, Any] = Field(default_factory=lambda: {"max_new_tokens": 32})
    """Keyword options for ``model.generate``."""


class PretrainConfig(_Section):
    run_dir: str
    """Where everything about the run goes (``docs/run-directory.md``)."""
    name: str | None = None
    seed: int = 1234
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    loss_spike: LossSpikeSection = Field(default_factory=LossSpikeSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)

    @model_validator(mode="after")
    def _stop(self) -> PretrainConfig:
        if self.train.max_steps is None and self.train.max_tokens is None:
            raise ValueError("set train.max_steps or train.max_tokens")
        if (
            self.train.schedule in ("linear", "cosine")
            and self.train.max_steps is None
            and self.train.decay_steps is None
        ):
            raise ValueError(
                f"train.schedule {self.train.schedule!r} needs train.max_steps or train.decay_steps"
            )
        return self


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else (base / p))


def _resolve_optional(base: Path, value: str | None) -> str | None:
    return None if value is None else _resolve(base, value)


def load_pretrain_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Read a run YAML (relative paths against its directory); ``ValueError`` names the bad field.

    ``overrides`` are dotted keys applied first, e.g. ``{"train.max_steps": 10}``.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"config file {path} not found") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections (run_dir, model, data, train, ...)")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}: {p} is not a section")
        node[leaf] = value
    try:
        config = PretrainConfig.model_validate(data)
    except ValidationError as err:
        lines = [
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        ]
        raise ValueError("\n".join(lines)) from None
    base = path.resolve().parent
    config.run_dir = _resolve(base, config.run_dir)
    config.data.config = _resolve(base, config.data.config)
    config.model.path = _resolve_optional(base, config.model.path)
    config.model.vocab = _resolve_optional(base, config.model.vocab)
    if config.checkpoint.resume not in ("auto", "never"):
        config.checkpoint.resume = _resolve(base, config.checkpoint.resume)
    return config
