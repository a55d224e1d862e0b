"""CPM-Live style pre-training: ``run_pretrain(config)`` behind ``cpmbee pretrain --config run.yaml``.

One process per data-parallel rank (``accelerate launch`` / ``torchrun``; DDP, or FSDP/DeepSpeed from an
accelerate config). Each rank reads its own share of the mixture (``cpmbee.data.pipeline``); the loss is
the cross-entropy summed over every target token of the step (all ranks, all micro-batches) divided by
their number, so gradients do not depend on how tokens fall on ranks and micro-batches. Per-task losses
are computed from the same per-token losses.

Everything goes to the run directory (``docs/run-directory.md``): ``run.json``, ``status.json``,
metrics records, atomic checkpoints (model, optimizer, scheduler, RNG, data positions), incidents. A run
resumed from a checkpoint reproduces the losses of an uninterrupted run exactly (same world size).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .checkpointing import CheckpointManager
from .metrics import ConsoleSink, JsonlSink, MetricsLogger, TensorBoardSink
from .monitor import LossSpikeDetector, flops_per_token, inspect_parameters, memory_gb, peak_flops_guess
from .pretrain_config import PretrainConfig
from .rundir import RunDirectory
from .schedule import build_scheduler

__all__ = ["run_pretrain"]


class _Stop:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit with status ``stopped``."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _build_model(config: PretrainConfig) -> tuple[Any, str]:
    """The model (float32 unless configured) and the vocabulary file."""
    from ..checkpoint import load_model
    from ..config import CpmBeeConfig
    from ..hf import CpmBeeForCausalLM

    dtype = getattr(torch, config.model.dtype)
    if config.model.path is not None:
        vocab = config.model.vocab or str(Path(config.model.path) / "vocab.txt")
        model = load_model(config.model.path, dtype=dtype)
    else:
        if config.model.vocab is None or config.model.preset is None:
            raise ValueError("model.vocab: a vocab.txt is required when the model comes from a preset")
        vocab = config.model.vocab
        try:
            model_config = CpmBeeConfig.from_preset(config.model.preset, **config.model.overrides)
        except TypeError as err:
            raise ValueError(f"model.overrides: {err}") from err
        torch.manual_seed(config.seed)
        model = CpmBeeForCausalLM(model_config).to(dtype)
    if not Path(vocab).is_file():
        raise ValueError(f"model.vocab: {vocab} not found")
    return model, vocab


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Run:
    """The state of one invocation; ``fit()`` runs the loop."""

    def __init__(self, config: PretrainConfig, live: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from ..hf import CpmBeeTokenizer

        self.config = config
        if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError(
                "train.mixed_precision: fp16 (loss-scaled) needs a CUDA GPU; use bf16 on the CPU"
            )
        self.acc = Accelerator(
            mixed_precision=config.train.mixed_precision, cpu=not torch.cuda.is_available()
        )
        self.main = self.acc.is_main_process
        self.world = self.acc.num_processes
        set_seed(config.seed)
        self.run_dir = Path(config.run_dir)
        self.rundir = RunDirectory(self.run_dir, status_every_s=config.logging.status_every_s)
        if self.main:
            self.rundir.create()
        self.acc.wait_for_everyone()
        self.manager = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=config.checkpoint.keep_last,
            keep_every=config.checkpoint.keep_every,
        )

        model, self.vocab = _build_model(config)
        self.tokenizer = CpmBeeTokenizer(self.vocab)
        if self.tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"model.vocab has {self.tokenizer.vocab_size} entries but the model's vocab_size is {model.config.vocab_size}"
            )
        if config.train.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.num_params = sum(p.numel() for p in model.parameters())
        t = config.train
        optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
        self.scheduler = build_scheduler(
            optimizer,
            t.schedule,
            t.warmup_steps,
            t.decay_steps or t.max_steps,
            t.min_lr_ratio if t.schedule != "constant" else 0.0,
        )
        self.spikes = LossSpikeDetector(config.loss_spike.factor, config.loss_spike.min_step)

        # resume before wrapping: the checkpoint holds plain (unwrapped) state
        self.step, self.tokens_seen, data_state, self.resumed_from = 0, 0, None, None
        self.saved_step = -1
        resume = config.checkpoint.resume
        path = None if resume == "never" else (self.manager.latest() if resume == "auto" else Path(resume))
        if resume not in ("auto", "never") and not (Path(resume) / "state.json").is_file():
            raise ValueError(f"checkpoint.resume: {resume} is not a checkpoint directory")
        from accelerate.utils import DistributedType

        # FSDP / DeepSpeed shard the optimizer state: what rank 0 saved is only its shard (not resumable)
        self.sharded = self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.optimizer_restored = True
        if path is not None:
            self.optimizer_restored = not self.sharded
            meta = self.manager.load(
                path, model=model, optimizer=None if self.sharded else optimizer, scheduler=self.scheduler
            )
            self.step = int(meta["step"])
            state = meta["state"]
            self.tokens_seen = int(state.get("tokens_seen", 0))
            data_state = state.get("data")
            self.spikes.load_state_dict(state.get("loss_spike", {}))
            self.resumed_from = str(path)
            self.saved_step = self.step

        from ..objective import AnswerObjective

        # the objective wraps the model so DDP/FSDP see one module; logits only where there are labels
        self.model, self.optimizer = self.acc.prepare(
            AnswerObjective(model, unk_id=self.tokenizer.unk_id), optimizer
        )
        self.raw_model = self.acc.unwrap_model(self.model).model

        from ..data.pipeline import DataPipeline

        self.data = DataPipeline(
            config.data.config,
            self.tokenizer,
            max_length=config.data.max_length,
            batch_size=config.data.batch_size,
            rank=self.acc.process_index,
            world_size=self.world,
            num_workers=config.data.num_workers,
            seed=config.seed,
            max_depth=config.data.max_depth,
            state=data_state,
            resume_step=self.step,
        )
        self.flops_token = flops_per_token(self.raw_model.config, self.num_params, config.data.max_length)
        self.peak_flops = config.logging.peak_flops or peak_flops_guess()
        self.counters: dict[int, dict[str, dict[str, int]]] = {}
        self.last_shares: dict[str, float] | None = None
        self.stop = _Stop()
        self.stop_now = False
        self.live = live
        self.live_process: subprocess.Popen | None = None
        self.samples_enabled = True
        self.logger = MetricsLogger(self._sinks(), enabled=self.main)

    # ------------------------------------------------------------------------------ run directory
    def _sinks(self) -> list[Any]:
        if not self.main:
            return []
        log = self.config.logging
        sinks: list[Any] = [JsonlSink(self.run_dir / "metrics", utc_offset_hours=log.utc_offset_hours)]
        if log.tensorboard:
            sinks.append(TensorBoardSink(self.run_dir / "tensorboard"))
        if log.console:
            sinks.append(
                ConsoleSink(
                    self.config.train.max_steps, initial=self.step, fields=("loss", "lr", "tokens_per_s")
                )
            )
        return sinks

    def _write_run_json(self) -> None:
        c = self.config
        model = {"preset": c.model.preset} if c.model.preset else {"path": c.model.path}
        model |= {"parameters": self.num_params, "config": self.raw_model.config.to_diff_dict()}
        self.rundir.write_run(
            {
                "name": c.name or self.run_dir.name,
                "config": c.model_dump(mode="json"),
                "plan": {"total_tokens": c.train.max_tokens, "total_steps": c.train.max_steps},
                "model": model,
                "world_size": self.world,
                "tokens_per_step": self.world * c.train.grad_accum * c.data.batch_size * c.data.max_length,
                "utc_offset_hours": c.logging.utc_offset_hours,
            }
        )

    def _write_status(self, state: str, force: bool = False) -> None:
        if self.main:
            t = self.config.train
            self.rundir.write_status(
                state,
                self.step,
                self.tokens_seen,
                force,
                world_size=self.world,
                max_steps=t.max_steps,
                max_tokens=t.max_tokens,
            )

    def _incident(self, kind: str, message: str, detail: Any = None, raw: Any = None) -> None:
        if not self.main:
            return
        fields: dict[str, Any] = {"kind": kind, "message": message}
        if detail is not None:
            fields["detail"] = detail
        if raw is not None:
            fields["file"] = self.rundir.write_incident(self.step, kind, message, detail, raw)
        self.logger.log("incident", self.step, **fields)

    def _start_live(self) -> None:
        """``--live``: the dashboard (``cpmbee live RUN_DIR``) as a child process that stops with the job."""
        from .. import __main__ as cli

        if "live" not in cli.COMMANDS:
            print(
                f"no live dashboard in this version; follow {self.run_dir}/metrics instead", file=sys.stderr
            )
            return
        self.live_process = subprocess.Popen([sys.executable, "-m", "cpmbee", "live", str(self.run_dir)])
        print(
            f"live dashboard started (pid {self.live_process.pid}); it stops with this job — "
            f"`cpmbee live {self.run_dir}` watches the run at any time",
            file=sys.stderr,
        )

    # ---------------------------------------------------------------------------------- the loop
    def _done(self) -> bool:
        t = self.config.train
        return (t.max_steps is not None and self.step >= t.max_steps) or (
            t.max_tokens is not None and self.tokens_seen >= t.max_tokens
        )

    def _train_step(self) -> None:
        acc, c = self.acc, self.config
        started = time.perf_counter()
        micro = [next(self.data) for _ in range(c.train.grad_accum)]
        for pb in micro:
            self.counters[pb.stream] = pb.counters
            if self.main:
                self._log_events(pb.events)
        local = torch.tensor(
            [
                sum(float((pb.batch.labels != -100).sum()) for pb in micro),
                sum(float(pb.batch.length.sum()) for pb in micro),
                float(self.stop.requested),
            ],
            dtype=torch.float64,
            device=acc.device,
        )
        targets, tokens, stop = (float(x) for x in acc.reduce(local, "sum"))
        self.stop_now = stop > 0  # every rank agrees to stop after this step (a signal may reach one rank)
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        task_sums: dict[str, list[float]] = {}
        for i, pb in enumerate(micro):
            inputs = pb.batch.model_inputs(acc.device)
            labels = inputs.pop("labels")
            sync = (
                contextlib.nullcontext()
                if i == len(micro) - 1 or self.world == 1
                else acc.no_sync(self.model)
            )
            with sync:
                out = self.model(token_stats=True, labels=labels, **inputs)
                acc.backward(out["loss_sum"] * (self.world / max(targets, 1.0)))
            with torch.no_grad():
                per_token = out["token_loss"].double()  # (N,), labelled positions in row-major order
                loss_sum += per_token.sum()
                task_ids = torch.from_numpy(pb.batch.task_ids).to(per_token.device)[
                    out["label_mask"].to(per_token.device)
                ]
                for t, name in enumerate(pb.batch.task_names):
                    sel = task_ids == t
                    n = int(sel.sum())
                    if n:
                        entry = task_sums.setdefault(name, [0.0, 0])
                        entry[0] += float(per_token[sel].sum())
                        entry[1] += n
        total_loss = float(acc.reduce(loss_sum, "sum")) / max(targets, 1.0)
        task_loss = self._gather_task_loss(task_sums)

        clip = c.train.clip_grad if c.train.clip_grad is not None else math.inf
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), clip))
        finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
        step = self.step + 1
        inspect_now = c.logging.inspect_every is not None and step % c.logging.inspect_every == 0
        inspect = (
            inspect_parameters(self.raw_model, c.logging.inspect_groups)
            if inspect_now and self.main
            else None
        )
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        scaler = getattr(acc, "scaler", None)
        # with fp16 loss scaling an overflow is routine: the scaler skips the update and lowers the scale
        # (so the optimizer must always be called); otherwise a non-finite step is skipped here
        skipped = False
        if finite or not c.train.skip_nonfinite or scaler is not None:
            self.optimizer.step()
            skipped = bool(acc.optimizer_step_was_skipped)
        else:
            skipped = True
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.tokens_seen += int(tokens)

        elapsed = time.perf_counter() - started
        record: dict[str, Any] = {
            "loss": total_loss,
            "task_loss": task_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "step_time": elapsed,
            "fill": tokens / (self.world * len(micro) * c.data.batch_size * c.data.max_length),
            "targets": int(targets),
            "mem_gb": memory_gb(),
        }
        if self.peak_flops:
            record["mfu"] = self.flops_token * record["tokens_per_s"] / (self.peak_flops * self.world)
        if scaler is not None:
            record["loss_scale"] = float(scaler.get_scale())
        if skipped:
            record["skipped"] = True
        self.logger.log("train", step, **record)
        if inspect is not None:
            self.logger.log("inspect", step, params=inspect)

        if not math.isfinite(total_loss) or (not finite and scaler is None):
            raw = self._gather_raw(micro)
            action = "optimizer step skipped" if skipped else "step taken anyway"
            self._incident("nan", f"non-finite loss {total_loss} or grad norm {grad_norm}; {action}", raw=raw)
        spikes = self.spikes.update(step, task_loss)
        if spikes:
            raw = self._gather_raw(micro)
            summary = ", ".join(f"{k}: {p:.4g} → {q:.4g}" for k, (p, q) in spikes.items())
            self._incident("loss_spike", f"loss spike ({summary})", detail=spikes, raw=raw)

    def _gather_task_loss(self, task_sums: dict[str, list[float]]) -> dict[str, float]:
        if self.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([task_sums])
        else:
            parts = [task_sums]
        merged: dict[str, list[float]] = {}
        for part in parts:
            for name, (s, n) in part.items():
                entry = merged.setdefault(name, [0.0, 0])
                entry[0] += s
                entry[1] += n
        return {name: s / n for name, (s, n) in sorted(merged.items())}

    def _gather_raw(self, micro: list[Any]) -> list[Any]:
        raw = [
            {"rank": self.acc.process_index, "micro_batch": i, "raw": pb.batch.raw_data}
            for i, pb in enumerate(micro)
        ]
        if self.world > 1:
            from accelerate.utils import gather_object

            return gather_object(raw)
        return raw

    def _log_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["type"]
            fields = {k: v for k, v in event.items() if k != "type"}
            if kind == "mixture":
                if fields["shares"] == self.last_shares:
                    continue
                self.last_shares = fields["shares"]
            if kind == "incident":
                self._incident(fields.pop("kind"), fields.pop("message"), detail=fields or None)
            else:
                self.logger.log(kind, self.step, **fields)

    def _log_data(self) -> None:
        if self.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([self.counters])
        else:
            parts = [self.counters]
        skipped: dict[str, int] = {}
        epochs: dict[str, int] = {}
        consumed: dict[str, int] = {}
        for part in parts:
            for counters in part.values():
                for k, v in counters.get("skipped_too_long", {}).items():
                    skipped[k] = skipped.get(k, 0) + v
                for k, v in counters.get("consumed", {}).items():
                    consumed[k] = consumed.get(k, 0) + v
                for k, v in counters.get("epochs", {}).items():
                    epochs[k] = max(epochs.get(k, 0), v)
        self.logger.log("data", self.step, skipped_too_long=skipped, epochs=epochs, consumed=consumed)

    def _checkpoint(self) -> None:
        from ..data.pipeline import gather_state

        part = self.data.state_dict()
        if self.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([part])
        else:
            parts = [part]
        state_dict = self.acc.get_state_dict(self.model)  # keys of the objective: "model." + the LM's
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.saved_step = self.step  # on every rank: the final-checkpoint decision must agree
        if self.main:
            data_state = gather_state(parts, self.world, self.data.per_rank)
            path = self.manager.save(
                self.step,
                model_state=state_dict,
                config=self.raw_model.config,
                optimizer=None if self.sharded else self.optimizer.optimizer,
                scheduler=self.scheduler,
                state={
                    "tokens_seen": self.tokens_seen,
                    "data": data_state,
                    "loss_spike": self.spikes.state_dict(),
                    "world_size": self.world,
                },
                files={"vocab.txt": self.vocab},
            )
            rel = str(path.relative_to(self.run_dir))
            self.logger.log("checkpoint", self.step, path=rel, tokens_seen=self.tokens_seen)
            self._samples(rel)
        self.acc.wait_for_everyone()

    def _samples(self, checkpoint: str) -> None:
        prompts = self.config.samples.prompts
        if not prompts or not self.samples_enabled:
            return
        model = self.raw_model
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                outputs = model.generate(
                    [json.loads(json.dumps(p)) for p in prompts],
                    self.tokenizer,
                    **self.config.samples.options,
                )
        except ImportError as err:  # generation is an optional part of the package
            self.samples_enabled = False
            self._incident("samples", f"sample generation unavailable, samples off for this run: {err}")
            return
        finally:
            model.train(was_training)
        self.logger.log(
            "sample",
            self.step,
            checkpoint=checkpoint,
            samples=[{"prompt": p, "output": o} for p, o in zip(prompts, outputs)],
        )

    def fit(self) -> dict[str, Any]:
        from ..data.mixture import mixture_summary

        c = self.config
        previous = self.rundir.previous_state() if self.main else None
        if self.main:
            self._write_run_json()
            self.logger.log("config", config=c.model_dump(mode="json"))
            if self.resumed_from:
                message = f"resumed from {Path(self.resumed_from).name} at step {self.step}"
                if self.data.resharded:
                    message += f"; data re-sharded for world size {self.world}"
                self.logger.log("event", self.step, event="resume", message=message)
                if not self.optimizer_restored:
                    self._incident(
                        "resume",
                        "optimizer state not restored: sharded engine (FSDP/DeepSpeed) checkpoints hold rank 0's shard only",
                    )
                if previous in ("running", "crashed"):
                    self._incident(
                        "restart", f"restart after an unclean exit (last state {previous}); {message}"
                    )
            else:
                self.logger.log("event", self.step, event="start", message=f"world size {self.world}")
            mix = mixture_summary(c.data.config)
            self.logger.log("mixture", self.step, **mix)
            self.last_shares = mix["shares"]
            if self.live:
                self._start_live()
        self._write_status("running", force=True)
        self.stop.install()
        state = "running"
        try:
            while not self._done() and not self.stop_now:
                self._train_step()
                if self.step % c.logging.data_every == 0:
                    self._log_data()
                if self.step % c.checkpoint.every == 0 and not self._done():
                    self._checkpoint()
                self._write_status("running")
            self._log_data()
            if self.saved_step != self.step:
                self._checkpoint()
            state = "finished" if self._done() else "stopped"
            self.logger.log("event", self.step, event="finish" if state == "finished" else "stop")
        except BaseException as err:
            state = "crashed"
            self.logger.log("event", self.step, event="crash", message=f"{type(err).__name__}: {err}")
            raise
        finally:
            self.stop.restore()
            self._write_status(state, force=True)
            self.logger.close()
            self.data.close()
            if self.live_process is not None:
                self.live_process.terminate()
                self.live_process.wait(timeout=30)
        return {
            "state": state,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "run_dir": str(self.run_dir),
        }


def run_pretrain(config: PretrainConfig, *, live: bool = False) -> dict[str, Any]:
    """Train as configured (resuming from the run's latest checkpoint by default); returns a summary."""
    return _Run(config, live=live).fit()
