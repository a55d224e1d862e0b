"""Shared training infrastructure: LR schedules, metrics sinks, atomic checkpoints."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cpmbee.train.checkpointing import CheckpointManager, rng_from_json, rng_to_json
from cpmbee.train.metrics import JsonlSink, MetricsLogger, RecordTailer, read_records
from cpmbee.train.schedule import build_scheduler, lr_multiplier

from .conftest import REPO_ROOT


def test_schedules():
    cosine = lr_multiplier("cosine", warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert (
        cosine(60) == pytest.approx(0.55)
        and cosine(110) == pytest.approx(0.1)
        and cosine(500) == pytest.approx(0.1)
    )
    linear = lr_multiplier("linear", 0, 100)
    assert linear(50) == pytest.approx(0.5)
    noam = lr_multiplier("noam", warmup_steps=2000)
    peak = max(noam(s) for s in range(0, 4000, 7))
    assert peak == pytest.approx(2000**-0.5, rel=1e-3)  # base 0.01 -> 2.2e-4 at the peak
    assert noam(199_999) == pytest.approx(200_000**-0.5)
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier("cosine", 10)
    with pytest.raises(ValueError, match="one of"):
        lr_multiplier("exp", 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "constant", warmup_steps=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_jsonl_sink_rotates_per_day_and_keeps_json_valid(tmp_path):
    sink = JsonlSink(tmp_path, utc_offset_hours=16)
    day1 = dt.datetime(2026, 1, 1, 7, 59, tzinfo=dt.timezone.utc)  # 23:59 at UTC+16
    for i, when in enumerate([day1, day1 + dt.timedelta(minutes=2)]):
        sink.log(
            {
                "type": "train",
                "step": i,
                "time": when.isoformat(),
                "loss": math.nan if i else 1.5,
                "task_loss": {"qa": math.inf},
            }
        )
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["metrics-2026-01-01.jsonl", "metrics-2026-01-02.jsonl"]
    raw = (tmp_path / files[1]).read_text()
    assert json.loads(raw)["loss"] == "NaN"  # strict JSON, readable by browsers
    records = list(read_records(tmp_path))
    assert [r["step"] for r in records] == [0, 1]
    assert math.isnan(records[1]["loss"]) and records[0]["task_loss"]["qa"] == math.inf


def test_tailer_sees_only_complete_lines(tmp_path):
    logger = MetricsLogger([JsonlSink(tmp_path)])
    tailer = RecordTailer(tmp_path)
    logger.log("train", 1, loss=2.0)
    assert [r["step"] for r in tailer.poll()] == [1]
    assert tailer.poll() == []
    path = next(tmp_path.glob("*.jsonl"))
    with open(path, "a") as f:
        f.write('{"type": "train", "step": 2')  # a writer caught mid-line
    assert tailer.poll() == []
    with open(path, "a") as f:
        f.write(', "loss": 1.0}\n')
    logger.log("eval", 2, loss=1.5)
    assert [(r["type"], r["step"]) for r in tailer.poll()] == [("train", 2), ("eval", 2)]
    logger.close()


def test_rng_json_roundtrip():
    for rng in (np.random.RandomState(3), random.Random(3)):
        snapshot = json.loads(json.dumps(rng_to_json(rng)))
        first = [rng.random() for _ in range(3)]
        rng_from_json(snapshot, rng)
        assert [rng.random() for _ in range(3)] == first


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, "cosine", 2, 10)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_checkpoint_roundtrip_and_pruning(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=20)
    model, opt, sched = _model_and_opt(0)
    for step in (10, 20, 30, 40):
        torch.manual_seed(step)
        manager.save(
            step,
            model_state=model.state_dict(),
            optimizer=opt,
            scheduler=sched,
            state={"data": {"pos": step}},
        )
    assert [s for s, _ in manager.checkpoints()] == [20, 30, 40]  # 10 pruned, 20 kept by keep_every
    assert manager.latest().name == "step-00000040"
    expected_next = torch.rand(3)

    other, opt2, sched2 = _model_and_opt(1)
    torch.manual_seed(999)
    meta = manager.load(model=other, optimizer=opt2, scheduler=sched2)
    assert meta["step"] == 40 and meta["state"] == {"data": {"pos": 40}}
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored to the moment of saving
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]


@pytest.mark.parametrize("die_at", ["before-rename", "before-pointer"])
def test_kill_during_save_never_corrupts_latest(tmp_path, die_at):
    """A process SIGKILLed in the middle of a save leaves a loadable latest checkpoint."""
    child = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        from pathlib import Path
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from cpmbee.train import checkpointing as ck
        manager = ck.CheckpointManager({str(tmp_path)!r})
        manager.save(1, model_state={{"w": torch.ones(3)}}, state={{"n": 1}})
        die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        if {die_at!r} == "before-rename":
            Path.rename = die
        else:
            ck.os.replace = die
        manager.save(2, model_state={{"w": torch.full((3,), 2.0)}}, state={{"n": 2}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    manager = CheckpointManager(tmp_path)
    latest = manager.latest()
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(3)))
    meta = manager.load(model=model)
    if die_at == "before-rename":
        assert latest.name == "step-00000001" and meta["state"] == {"n": 1} and model.w.sum() == 3
    else:  # the new directory was complete; the pointer still names the old one, both load
        assert meta["state"]["n"] in (1, 2) and model.w.sum() in (3, 6)
    manager.save(3, model_state={"w": torch.zeros(3)})
    assert not list(tmp_path.glob("*.partial-*")) and manager.latest().name == "step-00000003"
