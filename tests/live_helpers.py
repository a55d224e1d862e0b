"""Synthetic run directories for the live dashboard and daily-report tests.

``build_run`` writes a three-day run the way the trainer does (``docs/run-directory.md``): run.json,
status.json, daily JSONL files through ``JsonlSink`` (log days at UTC+16 as CPM-Live's), real checkpoints
through ``CheckpointManager`` (keep-last-2, so early ones are pruned), incident files, a loss spike, a NaN
step, a crash and a resume that rewinds the steps, parameter inspections, a data mixture and samples.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from cpmbee.train.checkpointing import CheckpointManager
from cpmbee.train.metrics import JsonlSink, MetricsLogger

UTC = dt.timezone.utc
OFFSET = 16.0
TOKENS_PER_STEP = 4096
PLAN_TOKENS = 200 * TOKENS_PER_STEP
PROMPTS = [{"input": "今天天气不错，", "<ans>": ""}, {"question": "1+1=?", "<ans>": ""}]
GROUPS = [
    "input_embedding.weight",
    "encoder.layers.0.self_att.project_q.weight",
    "encoder.layers.1.ffn.w_out.weight",
]

# log days at UTC+16: the day "2024-05-02" runs from 2024-05-01 08:00 UTC to 2024-05-02 08:00 UTC
DAY1, DAY2, DAY3 = "2024-05-01", "2024-05-02", "2024-05-03"
DAY1_START = dt.datetime(2024, 4, 30, 20, 0, tzinfo=UTC)  # steps 1..60, one a minute
DAY2_START = dt.datetime(2024, 5, 1, 9, 0, tzinfo=UTC)  # steps 61..100, crash, resume at 90 after 1 h, ..120
DAY3_START = dt.datetime(2024, 5, 2, 10, 0, tzinfo=UTC)  # steps 121..150, finished


def loss_at(step: int, task: str = "lm") -> float:
    base = 2.0 + 8.0 * math.exp(-step / 30.0)
    return base * (1.1 if task == "mlm" else 1.0) + 0.01 * ((step * 7919) % 13)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def write_status(
    run_dir: Path, state: str, step: int, when: dt.datetime | None = None, pid: int | None = None
) -> None:
    when = when or dt.datetime.now(UTC)
    write_json(
        run_dir / "status.json",
        {
            "state": state,
            "pid": os.getpid() if pid is None else pid,
            "host": "synthetic-host",
            "step": step,
            "tokens_seen": step * TOKENS_PER_STEP,
            "updated": when.isoformat(),
        },
    )


def train_record(
    step: int, *, loss: float | None = None, mlm: float | None = None, spike: bool = False
) -> dict[str, Any]:
    lm = loss_at(step) if loss is None else loss
    mlm_loss = (loss_at(step, "mlm") if mlm is None else mlm) * (4.0 if spike else 1.0)
    return {
        "loss": (lm + mlm_loss) / 2,
        "task_loss": {"lm": lm, "mlm": mlm_loss},
        "lr": 1e-3 * min(1.0, step / 20),
        "grad_norm": 1.0 + 5.0 / step,
        "tokens": TOKENS_PER_STEP,
        "tokens_seen": step * TOKENS_PER_STEP,
        "tokens_per_s": 2000.0 + step,
        "step_time": 2.0,
        "mem_gb": 1.5,
        "fill": 0.9,
    }


def inspect_record(step: int) -> dict[str, Any]:
    return {
        g: {
            "mean": 0.001 * i,
            "std": 0.02 + 0.0001 * step,
            "max_abs": 0.1 + i,
            "norm": 1.0 + 0.01 * step + i,
            "grad_norm": 0.1 / step,
        }
        for i, g in enumerate(GROUPS)
    }


class _Writer:
    """Records with explicit times through a real JsonlSink (MetricsLogger always stamps 'now')."""

    def __init__(self, run_dir: Path, offset: float) -> None:
        self.sink = JsonlSink(run_dir / "metrics", utc_offset_hours=offset)

    def log(self, record_type: str, step: int | None, when: dt.datetime, **fields: Any) -> None:
        record: dict[str, Any] = {"type": record_type, "time": when.isoformat()}
        if step is not None:
            record["step"] = step
        record.update(fields)
        self.sink.log(record)


def _checkpoint(run_dir: Path, manager: CheckpointManager, w: _Writer, step: int, when: dt.datetime) -> None:
    path = manager.save(
        step,
        model_state={"w": torch.full((2, 2), float(step))},
        state={"tokens_seen": step * TOKENS_PER_STEP},
    )
    rel = str(path.relative_to(run_dir))
    w.log("checkpoint", step, when, path=rel, tokens_seen=step * TOKENS_PER_STEP)
    outputs = [{**p, "<ans>": f"answer of step {step} to prompt {i}"} for i, p in enumerate(PROMPTS)]
    w.log(
        "sample",
        step,
        when,
        checkpoint=rel,
        samples=[{"prompt": p, "output": o} for p, o in zip(PROMPTS, outputs)],
    )


def _steps(
    run_dir: Path,
    manager: CheckpointManager,
    w: _Writer,
    first: int,
    last: int,
    start: dt.datetime,
    **special: Any,
) -> dt.datetime:
    when = start
    for step in range(first, last + 1):
        when = start + dt.timedelta(minutes=step - first)
        if step == special.get("nan"):
            rec = train_record(step, loss=math.nan)
            rec["loss"] = math.nan
            rec["grad_norm"] = math.inf
            w.log("train", step, when, **rec)
            w.log(
                "incident",
                step,
                when,
                kind="nan",
                message="non-finite loss nan or grad norm inf; optimizer step skipped",
            )
        elif step == special.get("spike"):
            w.log("train", step, when, **train_record(step, spike=True))
            name = f"step-{step:08d}-loss_spike.json"
            write_json(
                run_dir / "incidents" / name,
                {
                    "step": step,
                    "kind": "loss_spike",
                    "samples": [{"input": "一个很奇怪的样本", "<ans>": "<script>x</script>"}],
                },
            )
            w.log(
                "incident",
                step,
                when,
                kind="loss_spike",
                message="loss spike (mlm: 2.9 → 11.6)",
                detail={"mlm": [2.9, 11.6]},
                file=f"incidents/{name}",
            )
        else:
            w.log("train", step, when, **train_record(step))
        if step % 10 == 0:
            w.log("inspect", step, when, params=inspect_record(step))
        if step % 30 == 0:
            _checkpoint(run_dir, manager, w, step, when)
    return when


def build_run(run_dir: str | os.PathLike, *, offset: float = OFFSET, finished: bool = True) -> Path:
    """Write the synthetic three-day run into ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "tiny-synthetic",
        "logging": {"utc_offset_hours": offset},
        "train": {"max_tokens": PLAN_TOKENS},
    }
    write_json(
        run_dir / "run.json",
        {
            "name": "tiny-synthetic",
            "created": DAY1_START.isoformat(),
            "config": config,
            "plan": {"total_tokens": PLAN_TOKENS, "total_steps": None},
            "model": {"preset": "tiny", "parameters": 12345},
            "world_size": 2,
        },
    )
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=2)
    w = _Writer(run_dir, offset)
    # day 1: start, mixture, steps 1..60 (checkpoints at 30 and 60)
    w.log("config", None, DAY1_START, config=config)
    w.log("event", 0, DAY1_START, event="start", message="world size 2")
    mixture = {
        "shares": {"ccpm": 0.75, "wiki": 0.25},
        "records": {"ccpm": 300, "wiki": 100},
        "weights": {"ccpm": 1.0, "wiki": 1.0},
    }
    w.log("mixture", 0, DAY1_START, **mixture)
    _steps(run_dir, manager, w, 1, 60, DAY1_START)
    w.log(
        "data",
        60,
        DAY1_START + dt.timedelta(minutes=59),
        skipped_too_long={"ccpm": 3, "wiki": 0},
        epochs={"ccpm": 0, "wiki": 1},
    )
    # day 2: a loss spike at 75, NaN at 80, checkpoint at 90, crash at 100; resumed from 90 an hour later
    when = _steps(run_dir, manager, w, 61, 100, DAY2_START, spike=75, nan=80)
    w.log("event", 100, when + dt.timedelta(seconds=30), event="crash", message="RuntimeError: simulated")
    restart = when + dt.timedelta(hours=1)
    w.log("event", 90, restart, event="resume", message="resumed from step-00000090 at step 90")
    w.log("eval", 90, restart, loss=3.5, task_loss={"lm": 3.4, "mlm": 3.6})
    when = _steps(run_dir, manager, w, 91, 120, restart + dt.timedelta(minutes=1))
    w.log("data", 120, when, skipped_too_long={"ccpm": 5, "wiki": 1}, epochs={"ccpm": 1, "wiki": 2})
    # day 3: steps 121..150, finished
    when = _steps(run_dir, manager, w, 121, 150, DAY3_START)
    if finished:
        w.log("event", 150, when, event="finish")
        write_status(run_dir, "finished", 150, when)
    else:
        write_status(run_dir, "running", 150)
    w.sink.close()
    return run_dir


def append_live_steps(run_dir: str | os.PathLike, first: int, count: int, *, offset: float = OFFSET) -> None:
    """Append ``count`` training steps stamped now, through ``MetricsLogger``, as a running job does."""
    run_dir = Path(run_dir)
    with MetricsLogger([JsonlSink(run_dir / "metrics", utc_offset_hours=offset)]) as logger:
        for step in range(first, first + count):
            logger.log("train", step, **train_record(step))
    write_status(run_dir, "running", first + count - 1)


class LiveServer:
    """``cpmbee live``'s app served by uvicorn on a free loopback port in a background thread (``url``)."""

    def __init__(
        self, run_dir: str | os.PathLike, *, poll_interval: float = 0.1, header_timeout_s: float = 10.0
    ) -> None:
        from cpmbee.live.server import create_app

        from .serve_helpers import live_server

        self.app = create_app(run_dir, poll_interval=poll_interval)
        self._serving = live_server(self.app, header_timeout_s=header_timeout_s)

    def __enter__(self) -> LiveServer:
        self.url = self._serving.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.app.state.hub.closing = True  # end the event streams, as a signal to `cpmbee live` does
        self._serving.__exit__(*exc)
