"""The run-directory reader behind the live dashboard (cpmbee.live.state)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cpmbee.live.state import RunState, downsample, estimate_eta, log_offset_hours
from cpmbee.train.metrics import JsonlSink, MetricsLogger

from .live_helpers import (
    GROUPS,
    PLAN_TOKENS,
    TOKENS_PER_STEP,
    append_live_steps,
    build_run,
    train_record,
    write_status,
)


@pytest.fixture
def run_dir(tmp_path):
    return build_run(tmp_path / "run")


def test_reads_the_whole_run(run_dir):
    state = RunState(run_dir)
    update = state.refresh()
    assert state.counts["train"] == 160  # 60 + 40 + 30 + 30, steps 91..100 logged twice
    assert len(update.records) == state.seq == sum(state.counts.values())
    assert [r["seq"] for r in update.records] == list(range(1, state.seq + 1))
    # the resume from step 90 cut the series back: one point per step, the resumed values
    assert list(state.train["step"]) == list(range(1, 151))
    assert state.rewinds == [{"from_step": 100, "to_step": 91, "time": state.rewinds[0]["time"]}]
    assert state.train["tokens_seen"][-1] == 150 * TOKENS_PER_STEP
    assert state.task_loss.keys() == {"lm", "mlm"}
    assert state.task_loss["mlm"][74] == pytest.approx(train_record(75, spike=True)["task_loss"]["mlm"])
    assert state.nonfinite_steps == [80]
    assert math.isnan(state.train["loss"][79])
    assert [c["step"] for c in state.checkpoints] == [30, 60, 90, 120, 150]
    assert [c["exists"] for c in state.checkpoint_list()] == [False, False, False, True, True]  # keep-last-2
    assert len(state.samples) == 5 and state.samples[-1]["samples"][0]["output"]["<ans>"].startswith(
        "answer of step 150"
    )
    assert [i["kind"] for i in state.incidents] == ["loss_spike", "nan"]
    assert [e["event"] for e in state.events] == ["start", "crash", "resume", "finish"]
    assert state.eval == [state.eval[0]] and state.eval[0]["step"] == 90
    assert list(state.inspect_steps) == list(range(10, 151, 10))
    assert sorted(state.inspect) == sorted(GROUPS)
    assert state.mixtures[-1]["shares"] == {"ccpm": 0.75, "wiki": 0.25}
    assert state.data["skipped_too_long"] == {"ccpm": 5, "wiki": 1}
    assert log_offset_hours(state.run_info) == 16.0


def test_refresh_reads_only_what_was_appended(run_dir):
    state = RunState(run_dir)
    state.refresh()
    seq = state.seq
    assert not state.refresh()  # nothing new
    append_live_steps(run_dir, 151, 3)
    update = state.refresh()
    assert [r["step"] for r in update.records] == [151, 152, 153]
    assert [r["seq"] for r in update.records] == [seq + 1, seq + 2, seq + 3]
    assert update.status_changed and state.status()["state"] == "running"
    assert list(state.train["step"][-3:]) == [151, 152, 153]
    assert state.records_after(seq) == update.records
    assert state.records_after(state.seq) == []


def test_torn_line_waits_for_its_end(tmp_path):
    sink = JsonlSink(tmp_path / "metrics")
    sink.log({"type": "train", "step": 1, "time": "2024-05-01T00:00:00+00:00", "loss": 2.0})
    sink.close()
    path = next((tmp_path / "metrics").glob("*.jsonl"))
    line = json.dumps({"type": "train", "step": 2, "time": "2024-05-01T00:01:00+00:00", "loss": 1.5})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line[:20])
    state = RunState(tmp_path)
    state.refresh()
    assert list(state.train["step"]) == [1]
    with open(path, "a", encoding="utf-8") as f:
        f.write(line[20:] + "\n")
    assert [r["step"] for r in state.refresh().records] == [2]
    assert list(state.train["loss"]) == [2.0, 1.5]


def test_new_day_files_and_job_restart_are_followed(tmp_path):
    """A job that restarts appends to the files and opens new day files; the reader follows both."""
    state = RunState(tmp_path)
    assert not state.refresh().records and state.status()["state"] == "unknown"
    sink = JsonlSink(tmp_path / "metrics")
    for step, when in [(1, "2024-05-01T23:59:00"), (2, "2024-05-02T00:01:00"), (3, "2024-05-02T00:02:00")]:
        sink.log({"type": "train", "step": step, "time": when + "+00:00", "loss": 3.0 / step})
    sink.close()
    assert [r["step"] for r in state.refresh().records] == [1, 2, 3]
    assert len(list((tmp_path / "metrics").glob("*.jsonl"))) == 2
    # the job died after step 3 and resumes from a checkpoint at step 2, on a new day
    sink = JsonlSink(tmp_path / "metrics")
    sink.log({"type": "event", "step": 2, "time": "2024-05-03T10:00:00+00:00", "event": "resume"})
    for step in (3, 4):
        sink.log({"type": "train", "step": step, "time": f"2024-05-03T10:0{step}:00+00:00", "loss": 1.0})
    sink.close()
    update = state.refresh()
    assert [r.get("step") for r in update.records] == [2, 3, 4]
    assert list(state.train["step"]) == [1, 2, 3, 4] and list(state.train["loss"]) == [3.0, 1.5, 1.0, 1.0]
    assert state.rewinds[0]["from_step"] == 3 and state.rewinds[0]["to_step"] == 3


def test_status_states(run_dir):
    state = RunState(run_dir, stale_after_s=30)
    state.refresh()
    assert state.status()["state"] == "finished"
    write_status(run_dir, "running", 150)
    assert state.refresh().status_changed
    status = state.status()
    assert status["state"] == "running" and status["age_s"] < 30
    assert state.status(now=status["age_s"] + 10_000 + _updated(run_dir))["state"] == "stale"
    # a running job on this host whose process is gone (kill -9 leaves "running" behind)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    write_status(run_dir, "running", 150, pid=int(dead.stdout))
    raw = json.loads((run_dir / "status.json").read_text())
    raw["host"] = socket.gethostname()
    (run_dir / "status.json").write_text(json.dumps(raw))
    state.refresh()
    assert state.status()["state"] == "lost"
    raw["pid"] = os.getpid()
    (run_dir / "status.json").write_text(json.dumps(raw))
    state.refresh()
    assert state.status()["state"] == "running"


def _updated(run_dir):
    from cpmbee.live.state import parse_time

    return parse_time(json.loads((run_dir / "status.json").read_text())["updated"])


def test_attach_reads_in_bounded_chunks(tmp_path, monkeypatch):
    """Attaching reads the files a chunk at a time; a line longer than a chunk is still read whole."""
    import cpmbee.live.state as state_module

    monkeypatch.setattr(state_module, "_CHUNK_BYTES", 300)
    with MetricsLogger([JsonlSink(tmp_path / "metrics")]) as logger:
        for step in range(1, 51):
            logger.log("train", step, loss=1.0 / step, task_loss={"lm": 1.0})
        logger.log("inspect", 50, params={f"group{i}": {"norm": float(i)} for i in range(100)})  # ~2.5 kB
        logger.log("train", 51, loss=0.5)
    state = RunState(tmp_path)
    polls = []
    poll = state._tailer.poll
    monkeypatch.setattr(state._tailer, "poll", lambda max_bytes=None: polls.append(p := poll(max_bytes)) or p)
    update = state.refresh()
    assert len(update.records) == 52 and list(state.train["step"]) == list(range(1, 52))
    assert len(polls) > 10 and max(len(p) for p in polls) < 10
    assert state.latest_inspect()["params"]["group99"] == {"norm": 99.0}
    assert not state.refresh(collect=False).records
    with MetricsLogger([JsonlSink(tmp_path / "metrics")]) as logger:
        logger.log("train", 52, loss=0.4)
    assert state.refresh(collect=False).records == [] and state.train["step"][-1] == 52


def test_records_after_reports_a_gap(tmp_path):
    with MetricsLogger([JsonlSink(tmp_path / "metrics")]) as logger:
        for step in range(1, 11):
            logger.log("train", step, loss=1.0)
    state = RunState(tmp_path, history=5)
    state.refresh()
    assert [r["step"] for r in state.records_after(6)] == [7, 8, 9, 10]
    assert [r["step"] for r in state.records_after(5)] == [6, 7, 8, 9, 10]
    assert state.records_after(4) is None  # record 5 is no longer kept: the client must reload


def test_snapshot_is_browser_json(run_dir):
    state = RunState(run_dir)
    state.refresh()
    snap = state.snapshot(max_points=40)
    text = json.dumps(snap, allow_nan=False)  # NaN/inf became null
    assert json.loads(text)["train"]["points"] == 150
    train = snap["train"]
    assert len(train["step"]) <= 40 and train["step"][-1] == 150
    assert set(train["task_loss"]) == {"lm", "mlm"} and len(train["task_loss"]["lm"]) == len(train["step"])
    assert "mfu" not in train and "loss_scale" not in train  # never logged: no empty columns
    assert snap["nonfinite_steps"] == [80]
    assert snap["status"]["state"] == "finished"
    assert snap["eta"]["progress"] == pytest.approx(150 * TOKENS_PER_STEP / PLAN_TOKENS)
    assert snap["inspect"]["stats"][:4] == ["mean", "std", "max_abs", "norm"]
    assert snap["inspect"]["latest"]["step"] == 150


def test_downsample_buckets():
    steps = list(range(1, 11))
    loss = [float(s) for s in steps]
    loss[3] = math.nan
    out = downsample(
        {"step": steps, "loss": loss, "tokens_seen": [s * 10 for s in steps], "x": [None] * 10}, 4
    )
    # buckets of 3: [1,2,3] [4,5,6] [7,8,9] [10]
    assert out["step"] == [3, 6, 9, 10]
    assert out["tokens_seen"] == [30, 60, 90, 100]
    assert out["loss"] == [2.0, 5.5, 8.0, 10.0]  # the NaN is left out of its bucket's mean
    assert out["x"] == [None] * 4
    same = downsample({"step": steps}, 10)
    assert same == {"step": steps}
    rng = np.random.default_rng(0)
    values = rng.normal(size=1001).tolist()
    sampled = downsample({"step": list(range(1001)), "v": values}, 100)
    assert len(sampled["step"]) <= 100 and sampled["step"][-1] == 1000
    assert np.mean(sampled["v"][:-1]) == pytest.approx(np.mean(values[: 11 * (len(sampled["v"]) - 1)]))
    with pytest.raises(ValueError, match="different lengths"):
        downsample({"a": [1], "b": [1, 2]}, 5)


def test_estimate_eta():
    times = [0.0, 100.0, 200.0, 300.0]
    tokens = [0, 1000, 2000, 3000]
    eta = estimate_eta(times, [0, 1, 2, 3], tokens, {"total_tokens": 6000})
    assert eta["unit"] == "tokens" and eta["progress"] == 0.5
    assert eta["rate"] == pytest.approx(10.0) and eta["eta_s"] == pytest.approx(300.0)
    by_steps = estimate_eta(times, [0, 1, 2, 3], [None] * 4, {"total_steps": 9})
    assert by_steps["unit"] == "steps" and by_steps["eta_s"] == pytest.approx(600.0)
    # only the last window counts: a slow start does not hide the current rate
    slow_start = estimate_eta(
        [0.0, 5000.0, 5100.0], [0, 1, 2], [0, 1000, 3000], {"total_tokens": 5000}, window_s=200
    )
    assert slow_start["rate"] == pytest.approx(20.0)
    assert estimate_eta(times, [0, 1, 2, 3], tokens, {})["progress"] is None


def test_inspect_series_and_incident_files(run_dir):
    state = RunState(run_dir)
    state.refresh()
    data = state.inspect_series("norm", r"layers\.\d+\.", limit=5)
    assert data["groups"] == sorted(g for g in GROUPS if "layers" in g)
    assert data["step"] == list(range(10, 151, 10))
    assert data["series"][GROUPS[1]][-1] == pytest.approx(1.0 + 0.01 * 150 + 1)
    assert state.inspect_series("norm", None, limit=1)["matched"] == 3
    with pytest.raises(ValueError, match="groups"):
        state.inspect_series("norm", "([")
    detail = state.incident_detail("incidents/step-00000075-loss_spike.json")
    assert detail["samples"][0]["input"] == "一个很奇怪的样本"
    for bad in ("../status.json", "x/../../run.json", ".hidden.json", "a.txt"):
        with pytest.raises(ValueError, match="incident"):
            state.incident_detail(bad)
    with pytest.raises(FileNotFoundError):
        state.incident_detail("step-00000001-nan.json")
