"""``cpmbee finetune``: full-parameter or LoRA fine-tuning on CPM-Bee JSONL, on 🤗 accelerate.

``run_finetune(FinetuneArgs(...))`` is the whole job; the command only parses options into the dataclass
(every field's ``help`` is its ``--option`` help). One process or many: ``accelerate launch
--num_processes N -m cpmbee finetune …`` (DDP; FSDP/DeepSpeed through an accelerate config).

What a step does. Each process takes its slice of a *global* batch of ``batch_size × processes`` samples,
``grad_accum`` such micro-batches make an optimizer step, and the loss is the mean over every answer token
of the step across processes and micro-batches (each process scales its sum by the step's global token
count) — so N processes with batch B compute what one process with batch N·B does. The data order is a
seeded permutation per epoch; the last global batch of an epoch is filled up from the epoch's first
samples. The position in that stream is part of every checkpoint, so ``--resume`` continues exactly.

Everything goes into the run directory (``docs/run-directory.md``): ``run.json``, ``status.json``, metrics
JSONL (``train`` every step, ``eval``, ``checkpoint``, ``event``), ``checkpoints/step-*`` (resumable;
model + config + vocab for full tuning, adapter for LoRA), and the deliverables ``best/`` (best eval),
``final/`` and, with ``--merge``, ``merged/`` (adapter folded into the base: a plain model directory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from ..data.finetune import FinetuneCollator, GlobalBatchOrder, read_jsonl, scan_samples
from ..evaluation.likelihood import evaluate
from ..files import atomic_directory
from ..inputs import to_device
from ..objective import AnswerObjective
from .checkpointing import CheckpointManager
from .finetune_args import FinetuneArgs
from .metrics import ConsoleSink, JsonlSink, MetricsLogger, TensorBoardSink
from .monitor import memory_gb
from .rundir import RunDirectory
from .schedule import build_scheduler

__all__ = ["FinetuneArgs", "run_finetune"]


# ---------------------------------------------------------------------------------------------------- helpers
def _peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's peak resident memory on the CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _adamw(groups: list[dict[str, Any]], **options: Any) -> torch.optim.Optimizer:
    """AdamW, the fused kernel where the parameters allow it (5x faster steps on the CPU than the loop)."""
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **options)


@contextlib.contextmanager
def _quiet_saves() -> Any:
    """No "Writing model shards" progress bar from ``save_pretrained`` inside the training progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------- the job
class _Finetune:
    def __init__(self, args: FinetuneArgs) -> None:
        from accelerate import Accelerator

        args.validate()
        self.args = args
        cpu = args.cpu or not torch.cuda.is_available()
        if cpu and args.mixed_precision == "fp16":
            raise ValueError("--mixed-precision fp16 needs a GPU; use bf16 on the CPU")
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision)
        self.main = self.accelerator.is_main_process
        kind = str(self.accelerator.distributed_type)
        # Parameters and optimizer state split across processes: only gathered models are saved (best/,
        # final/); resumable checkpoints and in-process merging need the whole state (DDP or one process).
        self.sharded = kind.endswith(("FSDP", "DEEPSPEED"))
        if kind.endswith("DEEPSPEED") and args.grad_accum > 1:
            raise ValueError(
                "with DeepSpeed set gradient_accumulation_steps in its config and keep --grad-accum 1"
                " (the engine steps on every backward here)"
            )
        self.out = Path(args.out)
        self.rundir = RunDirectory(self.out)
        self.stop_requested = False
        self.best: dict[str, Any] | None = None
        self.bad_evals = 0

    # ------------------------------------------------------------------ set-up
    def load(self) -> None:
        from ..checkpoint import load_model
        from ..config import CpmBeeConfig
        from ..hf import CpmBeeForCausalLM, CpmBeeTokenizer

        args = self.args
        vocab = args.vocab
        if vocab is None and args.model:
            base = Path(args.model)
            vocab = str((base if base.is_dir() else base.parent) / "vocab.txt")
        if vocab is None or not Path(vocab).is_file():
            raise FileNotFoundError(f"no vocabulary at {vocab}: pass --vocab")
        self.vocab_path = Path(vocab)
        self.tokenizer = CpmBeeTokenizer(vocab)
        torch.manual_seed(args.seed)
        if args.model:
            model = load_model(args.model, dtype=args.dtype if args.method == "lora" else "float32")
            self.model_info: dict[str, object] = {"path": str(args.model)}
        else:
            if args.preset:
                config = CpmBeeConfig.from_preset(args.preset, vocab_size=self.tokenizer.vocab_size)
                self.model_info = {"preset": args.preset}
            else:
                assert args.config is not None  # validate(): one of model, preset, config
                config = CpmBeeConfig.from_json_file(args.config)
                self.model_info = {"config": str(args.config)}
            if config.vocab_size != self.tokenizer.vocab_size:
                raise ValueError(
                    f"the config has vocab_size {config.vocab_size}, the vocabulary {self.tokenizer.vocab_size}"
                )
            model = CpmBeeForCausalLM(config)
            if args.method == "lora" and args.dtype:
                from ..dtypes import torch_dtype

                lora_dtype = torch_dtype(args.dtype)
                if lora_dtype is not None:
                    torch.nn.Module.to(model, lora_dtype)
        self.model_info["parameters"] = sum(p.numel() for p in model.parameters())
        model.train()
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable()
        if args.method == "lora":
            from ..lora import add_lora

            model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.targets())
        self.model_info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.model = model
        self.objective = AnswerObjective(model, unk_id=self.tokenizer.unk_id)

        self.train_samples = read_jsonl(args.train)
        self.eval_samples = read_jsonl(args.eval)[: args.eval_max_samples] if args.eval else []
        self.data_stats = {
            "train": scan_samples(self.tokenizer, self.train_samples, args.max_length, str(args.train))
        }
        if self.eval_samples:
            self.data_stats["eval"] = scan_samples(
                self.tokenizer, self.eval_samples, args.max_length, str(args.eval)
            )
        self.collator = FinetuneCollator(
            self.tokenizer,
            args.max_length,
            pad_to_multiple_of=args.pad_to_multiple_of,
            shuffle_answer=args.shuffle_answer,
            seed=args.seed,
        )
        self.eval_collator = FinetuneCollator(self.tokenizer, args.max_length)

        world = self.accelerator.num_processes
        self.order = GlobalBatchOrder(
            len(self.train_samples), args.batch_size * world, args.seed, args.shuffle
        )
        self.total_steps = args.max_steps or math.ceil(args.epochs * self.order.per_epoch / args.grad_accum)

        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = _adamw([g for g in groups if g["params"]], lr=args.lr, eps=args.adam_eps)
        # Not prepared by accelerate (it would step once per process): stepped here once per optimizer step.
        self.scheduler = build_scheduler(
            optimizer, args.schedule, args.warmup_steps, self.total_steps, args.min_lr_ratio
        )
        self.wrapped, self.optimizer = self.accelerator.prepare(self.objective, optimizer)
        self.params = params
        self.checkpoints = CheckpointManager(self.out / "checkpoints", keep_last=args.keep_last)

    # ------------------------------------------------------------------ state
    def _unwrapped_model(self) -> Any:
        return self.accelerator.unwrap_model(self.wrapped).model

    def _model_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: every weight (full) or the adapters (LoRA), keys of ``self.model``."""
        state = self.accelerator.get_state_dict(self.wrapped)  # gathers shards under FSDP/ZeRO-3
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        if self.args.method == "lora":
            names = {n for n, p in self._unwrapped_model().named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        return state

    def _export(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        """Write a deliverable: a PEFT adapter dir (LoRA) or a model dir with the tokenizer (full)."""
        with _quiet_saves(), atomic_directory(directory) as tmp:
            model = self._unwrapped_model()
            if self.args.method == "lora":
                model.save_pretrained(str(tmp), state_dict=state)
            else:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        if self.sharded:  # the optimizer state is split across processes: not resumable (see docs)
            return
        model_state = self._model_state()
        if self.main:
            files: dict[str, str] = {}
            extra_dir = None
            if self.args.method == "full":
                config, files["vocab.txt"] = self._unwrapped_model().config, str(self.vocab_path)
            else:
                config = None
                extra_dir = self.out / f".adapter-{os.getpid()}"
                self._export(extra_dir, model_state)
                files = {p.name: str(p) for p in extra_dir.iterdir()}
            scaler = self.accelerator.scaler
            if scaler is not None:
                state = {**state, "scaler": scaler.state_dict()}
            path = self.checkpoints.save(
                step,
                model_state=model_state,
                config=config,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state=state,
                files=files,
            )
            if extra_dir is not None:
                import shutil

                shutil.rmtree(extra_dir, ignore_errors=True)
            self.logger.log(
                "checkpoint", step, path=str(path.relative_to(self.out)), tokens_seen=self.tokens_seen
            )
        self.accelerator.wait_for_everyone()

    def restore(self) -> dict[str, Any] | None:
        if not self.args.resume:
            if self.checkpoints.latest() is not None or any((self.out / "metrics").glob("*.jsonl")):
                raise ValueError(
                    f"{self.out} already holds a run and --no-resume was given: choose a new --out (or resume)"
                )
            return None
        latest = self.checkpoints.latest()
        if latest is None:
            return None
        if self.sharded:
            raise ValueError(
                f"{latest}: resuming under FSDP/DeepSpeed is not supported; use DDP or --no-resume"
            )
        from safetensors.torch import load_file

        info = self.checkpoints.load(latest, optimizer=self.optimizer, scheduler=self.scheduler)
        weights = load_file(str(latest / "model.safetensors"))
        model = self._unwrapped_model()
        if self.args.method == "full":
            model.load_state_dict(weights, strict=True)
        else:
            params = dict(model.named_parameters())
            missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
            if missing or any(k not in params for k in weights):
                raise ValueError(f"{latest}: the adapter does not match the model (missing {missing[:3]})")
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor)
        scaler = self.accelerator.scaler
        if scaler is not None and "scaler" in info["state"]:
            scaler.load_state_dict(info["state"]["scaler"])
        return info

    def write_status(self, state: str, force: bool = False) -> None:
        if self.main:
            self.rundir.write_status(
                state,
                self.step,
                self.tokens_seen,
                force,
                world_size=self.accelerator.num_processes,
                max_steps=self.total_steps,
                max_tokens=None,
            )

    # ------------------------------------------------------------------ loop pieces
    def _micro_batches(self, first: int) -> list[dict[str, torch.Tensor]]:
        rank, size = self.accelerator.process_index, self.args.batch_size
        out = []
        for micro in range(first, first + self.args.grad_accum):
            picked = self.order.global_indices(micro)[rank * size : (rank + 1) * size]
            if self.collator.rng is not None:  # answer shuffles keyed to the position: exact on resume
                self.collator.rng.seed((self.args.seed * 1_000_003 + micro) % 2**32)
            batch = self.collator([self.train_samples[i] for i in picked])
            out.append(to_device(batch, self.accelerator.device))
        return out

    def _sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, "sum")
        return t.tolist()

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        acc, world = self.accelerator, self.accelerator.num_processes
        batches = self._micro_batches(self.micro)
        local_answer = sum(int((b["labels"] != -100).sum()) for b in batches)
        local_tokens = sum(int(b["length"].sum()) for b in batches)
        local_cells = sum(int(b["input_ids"].numel()) for b in batches)
        answer, tokens, cells = self._sum(local_answer, local_tokens, local_cells)
        scale = world / max(answer, 1.0)  # DDP averages gradients over processes
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(self.wrapped)
            with sync:
                out = self.wrapped(**batch)
                acc.backward(out["loss_sum"] * scale)
            loss_sum += float(out["loss_sum"].detach())
        max_norm = self.args.clip_grad if self.args.clip_grad > 0 else float("inf")
        norm = acc.clip_grad_norm_(self.params, max_norm)  # None under DeepSpeed (its config clips)
        grad_norm = float(norm) if norm is not None else math.nan
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_total,) = self._sum(loss_sum)
        self.micro += self.args.grad_accum
        self.step += 1
        self.tokens_seen += int(tokens)
        elapsed = time.perf_counter() - start
        loss = loss_total / max(answer, 1.0)
        return {
            "loss": loss,
            "task_loss": {self.args.task_name: loss},
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "answer_tokens": int(answer),
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": tokens / elapsed,
            "step_time": elapsed,
            "fill": tokens / max(cells, 1.0),
            "mem_gb": memory_gb(),  # as pre-training reports it
            "peak_mem_gb": _peak_memory_gb(acc.device),
            "epoch": self.order.epoch_of(self.micro),
        }

    def run_eval(self) -> dict[str, float]:
        return evaluate(
            self.wrapped,
            self.eval_samples,
            self.eval_collator,
            accelerator=self.accelerator,
            batch_size=self.args.eval_batch_size,
        )

    def improved(self, metrics: dict[str, float]) -> bool:
        key = self.args.early_stop_metric
        if key not in metrics:
            raise ValueError(f"--early-stop-metric {key}: the eval set gives no {key!r} (no choice samples?)")
        value = metrics[key]
        if self.best is None:
            return True
        if key == "loss":
            return value < self.best["value"] - self.args.min_delta
        return value > self.best["value"] + self.args.min_delta

    def _request_stop(self, *_: Any) -> None:
        self.stop_requested = True

    def _should_stop(self) -> bool:
        (flag,) = self._sum(float(self.stop_requested))
        return flag > 0

    # ------------------------------------------------------------------ main
    def _open_run(self, info: dict[str, Any] | None, changed: dict[str, Any]) -> None:
        """Metrics sinks, ``run.json`` and the opening records (config, start/resume, data)."""
        args = self.args
        sinks: list[Any] = [JsonlSink(self.out / "metrics")] if self.main else []
        if self.main and args.tensorboard:
            sinks.append(TensorBoardSink(self.out / "tensorboard"))
        if self.main and args.progress:
            sinks.append(ConsoleSink(self.total_steps, initial=self.step))
        self.logger = MetricsLogger(sinks, enabled=self.main)
        if self.main:
            self.rundir.write_run(
                {
                    "name": self.out.name,
                    "kind": "finetune",
                    "config": dataclasses.asdict(args),
                    "plan": {"total_tokens": None, "total_steps": self.total_steps},
                    "model": self.model_info,
                    "world_size": self.accelerator.num_processes,
                    "data": self.data_stats,
                }
            )
        self.logger.log("config", config=dataclasses.asdict(args))
        if info is None:
            self.logger.log(
                "event",
                self.step,
                event="start",
                message=f"{args.method} fine-tuning, {self.total_steps} steps",
            )
        else:
            self.logger.log(
                "event", self.step, event="resume", message=f"from {info['path']}", changed_options=changed
            )
        self.logger.log("data", self.step, truncated={k: v["truncated"] for k, v in self.data_stats.items()})

    def _evaluate_and_track(self) -> str | None:
        """Evaluate, keep ``best/`` and the patience count; returns the early-stop reason, if any."""
        args = self.args
        metrics = self.run_eval()
        better = self.improved(metrics)
        if better:
            self.best = {"step": self.step, "value": metrics[args.early_stop_metric], "metrics": metrics}
            self.bad_evals = 0
            state = self._model_state()  # every process: it may be a collective (FSDP)
            if self.main:
                self._export(self.out / "best", state)
        else:
            self.bad_evals += 1
        self.logger.log("eval", self.step, **metrics, best=better, bad_evals=self.bad_evals)
        if args.patience and self.bad_evals >= args.patience:
            return f"early stop: {self.bad_evals} evaluations without improvement"
        return None

    def run(self) -> dict[str, Any]:
        args = self.args
        previous = self.rundir.previous_state()  # every process: all refuse a directory in use
        if self.main:
            self.rundir.create()
        self.accelerator.wait_for_everyone()
        self.load()
        self.step = self.micro = self.tokens_seen = 0
        self.best = None
        self.bad_evals = 0
        info = self.restore()
        changed: dict[str, Any] = {}
        if info is not None:
            s = info["state"]
            self.step, self.micro, self.tokens_seen = info["step"], s["micro"], s["tokens_seen"]
            self.best, self.bad_evals = s["best"], s["bad_evals"]
            changed = {
                k: (v, getattr(args, k))
                for k, v in s.get("args", {}).items()
                if k not in ("resume", "stop_after_steps", "progress") and v != getattr(args, k, v)
            }
        self._open_run(info, changed)
        if info is not None and previous in ("running", "crashed"):
            self.logger.log(
                "incident",
                self.step,
                kind="restart",
                message=f"restart after an unclean exit (last state {previous})",
            )
        try:  # a SIGTERM (preemption) finishes the step, writes a checkpoint and leaves
            previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        except ValueError:  # not the main thread
            previous_handler = None
        state, reason = "crashed", None
        try:
            self.write_status("running", force=True)
            before = None
            if self.eval_samples and args.eval_at_start and self.step == 0:
                before = self.run_eval()
                self.logger.log("eval", 0, **before, baseline=True)
            steps_here = 0
            while self.step < self.total_steps:
                record = self.train_step()
                self.logger.log("train", self.step, **record)
                steps_here += 1
                self.write_status("running")
                last = self.step == self.total_steps
                if self.eval_samples and (self.step % args.eval_every == 0 or last):
                    reason = self._evaluate_and_track()
                    if reason:
                        break
                if args.save_every and self.step % args.save_every == 0 and not last:
                    self.save_checkpoint(self.step, self._state())
                if args.stop_after_steps is not None and steps_here >= args.stop_after_steps and not last:
                    reason = f"stopped after {steps_here} steps (--stop-after-steps)"
                    break
                if self._should_stop():
                    reason = "stopped on SIGTERM"
                    break
            self.save_checkpoint(self.step, self._state())
            interrupted = reason is not None and not reason.startswith("early stop")
            state = "stopped" if interrupted else "finished"
            summary: dict[str, Any] = {"best": self.best, "before": before}
            if not interrupted:
                summary.update(self.finish())
            self.logger.log(
                "event",
                self.step,
                event="stop" if interrupted else "finish",
                message=reason or "done",
                **summary,
            )
            return {"state": state, "step": self.step, "main_process": self.main, **summary}
        except KeyboardInterrupt:
            state = "stopped"
            raise
        except BaseException as err:
            self.logger.log("event", self.step, event="crash", message=f"{type(err).__name__}: {err}")
            raise
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            self.write_status(state, force=True)
            self.logger.close()

    def _state(self) -> dict[str, Any]:
        return {
            "micro": self.micro,
            "tokens_seen": self.tokens_seen,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "args": dataclasses.asdict(self.args),
            "world_size": self.accelerator.num_processes,
        }

    def finish(self) -> dict[str, Any]:
        """Write final/ (and merged/); check that every process holds the same weights."""
        state = self._model_state()
        digest = torch.tensor(
            [sum(float(t.double().sum()) * (i + 1) for i, t in enumerate(state[k] for k in sorted(state)))],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        digests = self.accelerator.gather(digest).tolist()
        if self.main:
            self._export(self.out / "final", state)
        out: dict[str, Any] = {"ranks_agree": len(set(digests)) == 1, "world_size": len(digests)}
        if self.args.merge and self.sharded:
            out["merged"] = "skipped under FSDP/DeepSpeed: run cpmbee merge-lora BASE RUN_DIR/best OUT"
        elif self.args.merge and self.main:
            out["merged"] = str(self.merge())
        self.accelerator.wait_for_everyone()
        return out

    def merge(self) -> Path:
        from safetensors.torch import load_file

        from ..lora import save_merged

        model = self._unwrapped_model()
        source = self.out / ("best" if self.best is not None else "final")
        adapter = load_file(str(source / "adapter_model.safetensors"))
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, adapter)
        with _quiet_saves():
            return save_merged(model, self.out / "merged", self.tokenizer)


def run_finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run (or resume) a fine-tuning job; returns a summary (``state``, ``step``, ``best``, ``before`` …)."""
    return _Finetune(args).run()
