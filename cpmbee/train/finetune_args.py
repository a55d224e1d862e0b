"""The options of ``cpmbee finetune`` (``FinetuneArgs``): each field's ``help`` is its ``--option`` help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .schedule import SCHEDULES

__all__ = ["FinetuneArgs"]


def _opt(help: str, choices: tuple[str, ...] | None = None, **kwargs: Any) -> Any:
    return field(metadata={"help": help, "choices": choices}, **kwargs)


@dataclass
class FinetuneArgs:
    """Options of a fine-tuning run (``cpmbee finetune --help`` shows the same text)."""

    train: str = _opt("Training data: JSONL, one CPM-Bee dict with its filled <ans> per line.")
    out: str = _opt("Run directory (metrics, checkpoints, best/, final/, merged/).")
    eval: str | None = _opt("Evaluation data (JSONL); enables eval, best/ and early stopping.", default=None)
    model: str | None = _opt("Base model: a checkpoint directory or cpm-bee-*.pt file.", default=None)
    preset: str | None = _opt("Random-init a preset shape instead of --model (demos, CI).", default=None)
    config: str | None = _opt("Random-init the shape of this config JSON instead of --model.", default=None)
    vocab: str | None = _opt("vocab.txt (default: the one in/beside --model).", default=None)
    method: str = _opt("lora: train adapters only; full: all parameters.", ("lora", "full"), default="lora")
    lora_r: int = _opt("LoRA rank.", default=8)
    lora_alpha: float = _opt("LoRA alpha; the branch is scaled by alpha / r.", default=16.0)
    lora_dropout: float = _opt("Dropout on the LoRA branch input.", default=0.0)
    lora_targets: str = _opt("Comma-separated linears that get adapters.", default="project_q,project_v")
    dtype: str | None = _opt(
        "Storage dtype of the frozen base with LoRA; full tuning keeps float32 master weights.",
        ("float32", "bfloat16", "float16"),
        default=None,
    )
    mixed_precision: str = _opt("Autocast compute (fp16 needs a GPU).", ("no", "bf16", "fp16"), default="no")
    gradient_checkpointing: bool = _opt("Recompute layer activations in backward.", default=False)
    max_length: int = _opt("Most tokens per sample; longer ones lose context text.", default=512)
    batch_size: int = _opt("Samples per micro-batch per process.", default=8)
    grad_accum: int = _opt("Micro-batches per optimizer step.", default=1)
    epochs: int = _opt("Passes over the training data (unless --max-steps).", default=1)
    max_steps: int | None = _opt("Optimizer steps in total (overrides --epochs).", default=None)
    lr: float = _opt("Peak learning rate.", default=1e-4)
    schedule: str = _opt("LR schedule after the warm-up.", SCHEDULES, default="cosine")
    warmup_steps: int = _opt("Linear warm-up steps.", default=0)
    min_lr_ratio: float = _opt("Final LR of linear/cosine as a fraction of --lr.", default=0.0)
    weight_decay: float = _opt("AdamW weight decay (matrices only).", default=0.01)
    adam_eps: float = _opt("AdamW epsilon.", default=1e-8)
    clip_grad: float = _opt("Clip the gradient norm to this (0: no clipping).", default=1.0)
    eval_every: int = _opt("Evaluate every N steps (and at the end).", default=100)
    eval_batch_size: int = _opt("Rows per evaluation forward.", default=16)
    eval_max_samples: int | None = _opt("Evaluate on the first N eval samples only.", default=None)
    eval_at_start: bool = _opt("Evaluate before training (the 'before' figures).", default=True)
    early_stop_metric: str = _opt(
        "Eval metric for best/ and early stopping.", ("loss", "accuracy", "exact_match"), default="loss"
    )
    patience: int | None = _opt("Stop after N evals without improvement (0/none: never).", default=5)
    min_delta: float = _opt("Smallest change that counts as an improvement.", default=0.0)
    save_every: int = _opt("Write a resumable checkpoint every N steps (0: only at the end).", default=200)
    keep_last: int = _opt("Resumable checkpoints to keep.", default=2)
    merge: bool = _opt("LoRA: also write merged/ (best adapter folded into the base).", default=False)
    resume: bool = _opt("Continue from the run directory's latest checkpoint if there is one.", default=True)
    stop_after_steps: int | None = _opt(
        "Leave (checkpoint written, state 'stopped') after this many steps of this invocation.", default=None
    )
    seed: int = _opt("Seed for data order and initialization.", default=0)
    shuffle: bool = _opt("Shuffle the training data each epoch.", default=True)
    shuffle_answer: bool = _opt("Permute dict answers per sample (as pre-training).", default=False)
    pad_to_multiple_of: int | None = _opt("Round padded lengths up to a multiple of N.", default=None)
    tensorboard: bool = _opt("Also write TensorBoard scalars to RUN_DIR/tensorboard.", default=False)
    progress: bool = _opt("Show a progress bar.", default=True)
    cpu: bool = _opt("Run on the CPU even when a GPU is present.", default=False)
    task_name: str = _opt("Name of the task in task_loss records.", default="finetune")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def validate(self) -> None:
        """Raise one ``ValueError`` listing every bad option."""
        problems = []
        sources = [x for x in (self.model, self.preset, self.config) if x]
        if len(sources) != 1:
            problems.append("give exactly one of --model, --preset, --config")
        if self.method not in ("lora", "full"):
            problems.append(f"--method must be 'lora' or 'full', got {self.method!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.method == "full" and self.dtype not in (None, "float32"):
            problems.append(
                "--dtype applies to the frozen base of LoRA; full tuning keeps float32 master weights"
            )
        if self.method == "full" and self.merge:
            problems.append("--merge is for LoRA (full tuning already writes whole models)")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.early_stop_metric not in ("loss", "accuracy", "exact_match"):
            problems.append(
                f"--early-stop-metric must be loss, accuracy or exact_match, got {self.early_stop_metric!r}"
            )
        for name in ("max_length", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "keep_last"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs < 1:
            problems.append("give --epochs >= 1 or --max-steps")
        if self.lr <= 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if self.method == "lora" and not self.targets():
            problems.append("--lora-targets names no module")
        if problems:
            raise ValueError("invalid fine-tuning options:\n  " + "\n  ".join(problems))
