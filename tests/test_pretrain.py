"""``cpmbee pretrain``: config validation, the run directory it writes, loss spikes, inspection, and exact
resume after ``kill -9`` (1 process) and with 2 processes (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cpmbee.data.shards import ShardWriter
from cpmbee.train.metrics import read_records
from cpmbee.train.monitor import LossSpikeDetector, inspect_parameters
from cpmbee.train.pretrain_config import load_pretrain_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup(tmp_path, tiny_vocab_file):
    rng = np.random.RandomState(0)
    words = ["the", "a", "is", "in", "on", "abc", "xyz", "hello", "world", "今天", "天气", "不错"]
    with ShardWriter(tmp_path / "text", block_records=8) as w:
        for _ in range(200):
            w.write({"text": " ".join(rng.choice(words, int(rng.randint(3, 12))))})
    with ShardWriter(tmp_path / "qa", block_records=8) as w:
        for i in range(100):
            w.write({"question": f"q {i % 7} is", "answer": "abc" if i % 2 else "xyz"})
    (tmp_path / "lm.py").write_text(
        "def transform(data, num_incontext, rng):\n"
        "    t = data['text']\n    cut = rng.randint(1, len(t) - 1)\n"
        "    return {'input': t[:cut], '<ans>': t[cut:]}\n"
    )
    mixture = [
        {
            "dataset_name": "text",
            "task_name": "lm",
            "path": "text",
            "transforms": "lm.py",
            "incontext_weight": [0.7, 0.3],
        },
        {
            "dataset_name": "qa",
            "task_name": "qa",
            "path": "qa",
            "transforms": [{"question": "$question", "<ans>": "$answer"}],
        },
    ]
    (tmp_path / "datasets.json").write_text(json.dumps(mixture))
    vocab_size = len(tiny_vocab_file.read_text(encoding="utf-8").splitlines())
    config = {
        "run_dir": "run",
        "seed": 7,
        "model": {
            "preset": "tiny",
            "vocab": str(tiny_vocab_file),
            "overrides": {"vocab_size": vocab_size, "position_bias_num_segment_buckets": 32},
        },
        "data": {"config": "datasets.json", "max_length": 48, "batch_size": 2, "num_workers": 0},
        "train": {
            "max_steps": 6,
            "lr": 0.01,
            "warmup_steps": 2,
            "schedule": "cosine",
            "decay_steps": 50,
            "grad_accum": 2,
        },
        "checkpoint": {"every": 3, "keep_last": 2},
        "logging": {"inspect_every": 3, "console": False, "data_every": 2, "peak_flops": 1e12},
    }

    def write(name="run.yaml", **sections):
        data = json.loads(json.dumps(config))
        for key, value in sections.items():
            if isinstance(value, dict):
                data[key] = {**data.get(key, {}), **value}
            else:
                data[key] = value
        (tmp_path / name).write_text(yaml.safe_dump(data))
        return tmp_path / name

    return write


def losses(run_dir, after_resume=False):
    out = {}
    seen_resume = not after_resume
    for r in read_records(Path(run_dir) / "metrics"):
        if r["type"] == "event" and r["event"] == "resume":
            seen_resume = True
        if r["type"] == "train" and seen_resume:
            out[r["step"]] = (r["loss"], r["task_loss"], r["grad_norm"])
    return out


def test_config_errors_name_the_field(setup, tmp_path):
    path = setup(train={"lr": "fast"})
    with pytest.raises(ValueError, match=r"train\.lr"):
        load_pretrain_config(path)
    path = setup(train={"max_stpes": 3})
    with pytest.raises(ValueError, match=r"train\.max_stpes"):
        load_pretrain_config(path)
    path = setup(model={"path": "x"})
    with pytest.raises(ValueError, match=r"exactly one of model\.preset or model\.path"):
        load_pretrain_config(path)
    cfg = load_pretrain_config(setup(), {"train.max_steps": 9})
    assert cfg.train.max_steps == 9 and Path(cfg.run_dir) == tmp_path / "run"


def run_cli(config, *extra, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cpmbee", "pretrain", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_run_directory_contract(setup, tmp_path, monkeypatch):
    from cpmbee.checkpoint import load_model
    from cpmbee.train.pretrain import run_pretrain

    real_update = LossSpikeDetector.update

    def update(self, step, task_loss):  # a tiny model's loss only falls: pretend step 2 jumped
        spikes = real_update(self, step, task_loss)
        return {k: [v / 4, v] for k, v in task_loss.items()} if step == 2 else spikes

    monkeypatch.setattr(LossSpikeDetector, "update", update)
    summary = run_pretrain(load_pretrain_config(setup()))
    assert summary["state"] == "finished" and summary["step"] == 6
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert {"name", "created", "config", "plan", "model", "world_size"} <= set(info)
    assert info["plan"] == {"total_tokens": None, "total_steps": 6} and info["model"]["parameters"] > 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 6
    records = list(read_records(run / "metrics"))
    types = {r["type"] for r in records}
    assert {"config", "event", "mixture", "train", "inspect", "data", "checkpoint", "incident"} <= types
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    first = train[0]
    for key in (
        "loss",
        "task_loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_seen",
        "tokens_per_s",
        "step_time",
        "mfu",
        "mem_gb",
        "fill",
    ):
        assert key in first, key
    assert set(first["task_loss"]) <= {"lm", "qa"} and first["lr"] == pytest.approx(0.005)
    assert train[-1]["tokens_seen"] == sum(r["tokens"] for r in train)
    inspect = [r for r in records if r["type"] == "inspect"]
    assert [r["step"] for r in inspect] == [3, 6]
    emb = inspect[0]["params"]["cpmbee.input_embedding.weight"]
    assert {"mean", "std", "max_abs", "norm", "grad_norm"} <= set(emb)
    spikes = [r for r in records if r["type"] == "incident" and r["kind"] == "loss_spike"]
    assert [r["step"] for r in spikes] == [2] and set(spikes[0]["detail"]) == set(train[1]["task_loss"])
    detail = json.loads((run / spikes[0]["file"]).read_text())
    assert detail["samples"][0]["raw"][0]["dataset"] in ("lm.text", "qa.qa")
    assert [r["path"] for r in records if r["type"] == "checkpoint"] == [
        "checkpoints/step-00000003",
        "checkpoints/step-00000006",
    ]
    model = load_model(run / "checkpoints" / "step-00000006")  # each checkpoint is a model directory
    assert model.config.num_hidden_layers == 2
    assert (run / "checkpoints" / "latest").read_text() == "step-00000006"
    assert [e["event"] for e in records if e["type"] == "event"] == ["start", "finish"]


def test_exact_resume_after_kill_9(setup, tmp_path):
    reference = setup("ref.yaml", run_dir="ref", train={"max_steps": 12}, checkpoint={"every": 4})
    res = run_cli(reference)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = losses(tmp_path / "ref")

    config = setup("kill.yaml", run_dir="killed", train={"max_steps": 400}, checkpoint={"every": 4})
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpmbee", "pretrain", "--config", str(config)], stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "killed" / "checkpoints" / "latest").exists():
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = int((tmp_path / "killed" / "checkpoints" / "latest").read_text().split("-")[1])
    assert resumed_from < 12
    status = json.loads((tmp_path / "killed" / "status.json").read_text())
    assert status["state"] == "running"  # what a kill -9 leaves

    res = run_cli(config, "--set", "train.max_steps=12")
    assert res.returncode == 0, res.stderr[-3000:]
    got = losses(tmp_path / "killed", after_resume=True)
    assert sorted(got) == list(range(resumed_from + 1, 13))
    for step, value in got.items():
        assert value == expected[step], step  # bit-identical losses, task losses and grad norms
    records = list(read_records(tmp_path / "killed" / "metrics"))
    assert any(r["type"] == "incident" and r["kind"] == "restart" for r in records)


def test_sigterm_checkpoints_and_stops(setup, tmp_path):
    config = setup("term.yaml", run_dir="term", train={"max_steps": 100000}, checkpoint={"every": 100000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpmbee", "pretrain", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "term" / "metrics").glob("*.jsonl")):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    status = json.loads((tmp_path / "term" / "status.json").read_text())
    assert status["state"] == "stopped"
    assert (tmp_path / "term" / "checkpoints" / f"step-{status['step']:08d}").is_dir()


def test_spike_detector_and_inspection():
    det = LossSpikeDetector(3.0)
    assert det.update(1, {"a": 1.0}) == {}
    assert det.update(2, {"a": 3.5, "b": 9.0}) == {"a": [1.0, 3.5]}
    assert det.update(3, {"a": float("nan")}) == {}
    assert det.update(4, {"a": 10.0}) == {}  # compared with 3.5 (NaN ignored)
    off = LossSpikeDetector(None)
    off.update(1, {"a": 1.0})
    assert off.update(2, {"a": 100.0}) == {}
    import torch

    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    lin(torch.ones(1, 3)).sum().backward()
    stats = inspect_parameters(lin)
    assert set(stats) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert stats["0.weight"]["norm"] == pytest.approx(lin[0].weight.norm().item())
    assert "grad_std" in stats["1.bias"]
    deep = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])})
    pooled = inspect_parameters(deep, "module")
    assert set(pooled) == {"layers.*.weight", "layers.*.bias"}
    assert pooled["layers.*.weight"]["max_abs"] == pytest.approx(
        max(m.weight.abs().max().item() for m in deep["layers"])
    )


def torchrun(config, nproc, *extra):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "-m", "cpmbee", "pretrain", "--config", str(config), *extra],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_two_processes_exact_resume_and_world_size_change(setup, tmp_path):
    config = setup("ddp.yaml", run_dir="ddp", checkpoint={"every": 3, "keep_last": 5})
    res = torchrun(config, 2)
    assert res.returncode == 0, res.stderr[-4000:]
    full = losses(tmp_path / "ddp")
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert info["world_size"] == 2 and sorted(full) == [1, 2, 3, 4, 5, 6]
    tokens = [r["tokens"] for r in read_records(tmp_path / "ddp" / "metrics", kind="train")]
    assert max(tokens) > 2 * 2 * 48 / 2  # two ranks' worth of tokens per step

    for name, nproc in (("again", 2), ("single", 1)):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        import shutil

        shutil.copytree(
            tmp_path / "ddp" / "checkpoints" / "step-00000003", run / "checkpoints" / "step-00000003"
        )
        (run / "checkpoints" / "latest").write_text("step-00000003")
        cfg = setup(f"{name}.yaml", run_dir=name)
        res = torchrun(cfg, nproc) if nproc > 1 else run_cli(cfg)
        assert res.returncode == 0, res.stderr[-4000:]
        got = losses(run, after_resume=True)
        assert sorted(got) == [4, 5, 6]
        if nproc == 2:
            assert got == {s: full[s] for s in (4, 5, 6)}
        else:
            events = list(read_records(run / "metrics", kind="event"))
            assert "re-sharded for world size 1" in events[0]["message"]


def test_samples_at_checkpoints(setup, tmp_path, monkeypatch):
    import torch

    from cpmbee import CpmBeeForCausalLM
    from cpmbee.train.pretrain import run_pretrain

    calls = []

    def generate(self, data, tokenizer, **options):  # stands in for cpmbee.generation (another module)
        calls.append((not self.training, options))
        torch.rand(3)  # generation may draw random numbers: they must not change training
        return [{**d, "<ans>": "abc"} for d in data]

    prompts = [{"input": "hello", "<ans>": ""}]
    base = run_pretrain(
        load_pretrain_config(setup("a.yaml", run_dir="a", train={"max_steps": 2}, checkpoint={"every": 1}))
    )
    monkeypatch.setattr(CpmBeeForCausalLM, "generate", generate)
    cfg = setup(
        "b.yaml", run_dir="b", train={"max_steps": 2}, checkpoint={"every": 1}, samples={"prompts": prompts}
    )
    run_pretrain(load_pretrain_config(cfg))
    assert base["state"] == "finished" and calls == [(True, {"max_new_tokens": 32})] * 2
    samples = list(read_records(tmp_path / "b" / "metrics", kind="sample"))
    assert [s["checkpoint"] for s in samples] == ["checkpoints/step-00000001", "checkpoints/step-00000002"]
    assert samples[0]["samples"] == [{"prompt": prompts[0], "output": {"input": "hello", "<ans>": "abc"}}]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")

    def missing(self, data, tokenizer, **options):
        raise ImportError("No module named 'cpmbee.generation'")

    monkeypatch.setattr(CpmBeeForCausalLM, "generate", missing)
    cfg = setup(
        "c.yaml", run_dir="c", train={"max_steps": 2}, checkpoint={"every": 1}, samples={"prompts": prompts}
    )
    assert run_pretrain(load_pretrain_config(cfg))["state"] == "finished"
    incidents = list(read_records(tmp_path / "c" / "metrics", kind="incident"))
    assert [i["kind"] for i in incidents] == ["samples"]


def test_nonfinite_step_is_skipped_and_reported(setup, tmp_path, monkeypatch):
    import types

    import torch.nn.functional as F

    import cpmbee.objective as objective
    import cpmbee.train.pretrain as pretrain

    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        out = F.cross_entropy(*args, **kwargs)
        return out * float("nan") if calls["n"] in (3, 4) else out  # both micro-batches of step 2

    monkeypatch.setattr(objective, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    cfg = setup("nan.yaml", run_dir="nan", train={"max_steps": 3}, logging={"inspect_every": None})
    assert pretrain.run_pretrain(load_pretrain_config(cfg))["state"] == "finished"
    train = list(read_records(tmp_path / "nan" / "metrics", kind="train"))
    assert [r.get("skipped", False) for r in train] == [False, True, False]
    assert np.isnan(train[1]["loss"]) and np.isfinite(train[2]["loss"])
    assert train[1]["lr"] == train[2]["lr"]  # the schedule did not advance on the skipped step
    (incident,) = read_records(tmp_path / "nan" / "metrics", kind="incident")
    assert incident["kind"] == "nan" and incident["step"] == 2 and "skipped" in incident["message"]
    assert (tmp_path / "nan" / incident["file"]).is_file()


@pytest.mark.slow
def test_data_workers_die_with_a_killed_job(setup, tmp_path):
    config = setup("w.yaml", run_dir="w", data={"num_workers": 2}, train={"max_steps": 100000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpmbee", "pretrain", "--config", str(config)], stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "w" / "metrics").glob("*.jsonl")):
        time.sleep(0.1)
    time.sleep(2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)


def test_run_directory_previous_state(tmp_path):
    import socket

    from cpmbee.train.rundir import RunDirectory

    run = RunDirectory(tmp_path / "r")
    run.create()
    assert run.previous_state() is None
    run.write_status("running", 3, 100, force=True)
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["pid"] == os.getpid() and status["host"] == socket.gethostname()
    assert run.previous_state() == "running"  # this pid is alive but not a cpmbee job: a recycled pid
    run.write_run({"name": "r", "world_size": 1})
    created = json.loads((tmp_path / "r" / "run.json").read_text())["created"]
    time.sleep(0.01)
    run.write_run({"name": "r", "world_size": 2})
    again = json.loads((tmp_path / "r" / "run.json").read_text())
    assert again["created"] == created and again["world_size"] == 2


def test_live_flag_starts_the_dashboard_with_the_job(setup, tmp_path, monkeypatch):
    import cpmbee.train.pretrain as pretrain

    started = []

    class FakeDashboard:  # records how the dashboard would be started, and that it is stopped
        def __init__(self, args):
            started.append(args)
            self.pid, self.stopped = 12345, False

        def terminate(self):
            self.stopped = True

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(pretrain.subprocess, "Popen", FakeDashboard)
    run = pretrain._Run(load_pretrain_config(setup(train={"max_steps": 1})), live=True)
    assert run.fit()["state"] == "finished"
    assert started == [[sys.executable, "-m", "cpmbee", "live", str(tmp_path / "run")]]
    assert run.live_process.stopped


def test_gradient_checkpointing_gives_the_same_losses(setup, tmp_path):
    from cpmbee.train.pretrain import run_pretrain

    for name, flag in (("plain", False), ("recompute", True)):
        cfg = setup(f"{name}.yaml", run_dir=name, train={"max_steps": 2, "gradient_checkpointing": flag})
        run_pretrain(load_pretrain_config(cfg))
    plain, recompute = losses(tmp_path / "plain"), losses(tmp_path / "recompute")
    assert sorted(plain) == [1, 2]
    for step in plain:
        assert recompute[step][0] == pytest.approx(plain[step][0], rel=1e-6)
        assert recompute[step][2] == pytest.approx(plain[step][2], rel=1e-5)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_cleanly(setup, tmp_path):
    config = setup("sig.yaml", run_dir="sig", train={"max_steps": 100000}, checkpoint={"every": 100000})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "cpmbee", "pretrain", "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "sig" / "metrics").glob("*.jsonl")):
        time.sleep(0.1)
    time.sleep(3)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[-1]), signal.SIGTERM)  # only one rank hears it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    status = json.loads((tmp_path / "sig" / "status.json").read_text())
    assert status["state"] == "stopped"
    assert (tmp_path / "sig" / "checkpoints" / f"step-{status['step']:08d}").is_dir()


def test_real_sample_generation_at_checkpoints_leaves_training_unchanged(setup, tmp_path):
    from cpmbee.train.pretrain import run_pretrain

    prompts = [{"input": "hello", "<ans>": ""}, {"input": "x", "<ans>": {"a": "", "b": ""}}]
    base = run_pretrain(
        load_pretrain_config(setup("a.yaml", run_dir="a", train={"max_steps": 2}, checkpoint={"every": 1}))
    )
    options = {"max_new_tokens": 4, "beam_size": 1, "do_sample": True, "seed": 1}
    cfg = setup(
        "b.yaml",
        run_dir="b",
        train={"max_steps": 2},
        checkpoint={"every": 1},
        samples={"prompts": prompts, "options": options},
    )
    assert run_pretrain(load_pretrain_config(cfg))["state"] == base["state"] == "finished"
    samples = list(read_records(tmp_path / "b" / "metrics", kind="sample"))
    assert len(samples) == 2
    outputs = [s["output"] for s in samples[-1]["samples"]]
    assert outputs[0]["input"] == "hello" and isinstance(outputs[0]["<ans>"], str)
    assert set(outputs[1]["<ans>"]) == {"a", "b"}
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
