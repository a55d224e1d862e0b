"""Cost of the live dashboard's reader on a long run.

    python benchmarks/bench_live.py [--steps 200000] [--groups 400] [--inspect-every 100] [--days 4]

Writes a synthetic run directory (``train`` records every step with two task losses, ``inspect`` records
with ``--groups`` parameter groups, spread over ``--days`` daily files at UTC+16) and times what the
dashboard and the report generator do with it: attaching (reading everything once), building the page's
snapshot, one live poll after a new step, an ``/api/inspect`` query, and one daily report. The memory the
attached reader holds is the growth of the process's resident set (Linux ``/proc``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpmbee.live import report as rp  # noqa: E402
from cpmbee.live.state import RunState  # noqa: E402
from cpmbee.train.metrics import JsonlSink, MetricsLogger  # noqa: E402


def write_run(run_dir: Path, steps: int, groups: int, inspect_every: int, days: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(
        json.dumps({"name": "bench", "plan": {"total_tokens": steps * 2 * 4096}, "utc_offset_hours": 16}),
        encoding="utf-8",
    )
    sink = JsonlSink(run_dir / "metrics", utc_offset_hours=16)
    start = dt.datetime(2024, 5, 1, 8, 0, tzinfo=dt.timezone.utc)
    seconds_per_step = days * 86400 / steps
    names = [f"encoder.layers.{i // 8}.param{i % 8}.weight" for i in range(groups)]
    for step in range(1, steps + 1):
        when = (start + dt.timedelta(seconds=step * seconds_per_step)).isoformat()
        loss = 2 + 8 * math.exp(-step / (steps / 10))
        sink.log(
            {
                "type": "train",
                "time": when,
                "step": step,
                "loss": loss,
                "task_loss": {"lm": loss, "mlm": loss * 1.1},
                "lr": 1e-4,
                "grad_norm": 1.0,
                "tokens": 4096,
                "tokens_seen": step * 4096,
                "tokens_per_s": 50000.0,
                "step_time": 0.08,
                "mem_gb": 30.0,
                "fill": 0.95,
            }
        )
        if step % inspect_every == 0:
            params = {
                n: {"mean": 0.0, "std": 0.02, "max_abs": 0.1, "norm": 1.0, "grad_norm": 0.01} for n in names
            }
            sink.log({"type": "inspect", "time": when, "step": step, "params": params})
    sink.close()


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--groups", type=int, default=400)
    parser.add_argument("--inspect-every", type=int, default=100)
    parser.add_argument("--days", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _, t_write = timed(lambda: write_run(run_dir, args.steps, args.groups, args.inspect_every, args.days))
        size = sum(p.stat().st_size for p in (run_dir / "metrics").glob("*.jsonl"))
        print(f"# {platform.machine()} Python {platform.python_version()}, {dt.date.today()}")
        print(
            f"run: {args.steps:,} steps, {args.groups} groups every {args.inspect_every} steps, {size / 2**20:.0f} MiB JSONL (written in {t_write:.1f} s)"
        )

        before = rss_mib()
        state = RunState(run_dir)
        _, t_attach = timed(lambda: state.refresh(collect=False))  # as the server attaches
        print(
            f"attach (read everything once): {t_attach:.2f} s, {args.steps / t_attach:,.0f} steps/s, "
            f"{size / 2**20 / t_attach:.1f} MiB/s; memory held by the reader {rss_mib() - before:.0f} MiB (RSS growth)"
        )
        snap, t_snap = timed(lambda: json.dumps(state.snapshot(3000)))
        print(f"/api/snapshot (3,000 points per series): {t_snap * 1000:.0f} ms, {len(snap) / 2**10:.0f} KiB")
        with MetricsLogger([JsonlSink(run_dir / "metrics", utc_offset_hours=16)]) as logger:
            logger.log("train", args.steps + 1, loss=2.0, tokens_seen=(args.steps + 1) * 4096)
        update, t_poll = timed(state.refresh)
        assert len(update.records) == 1
        _, t_idle = timed(state.refresh)
        _, t_eta = timed(state.eta)
        print(
            f"live poll with one new step: {t_poll * 1000:.1f} ms (nothing new: {t_idle * 1000:.2f} ms); ETA: {t_eta * 1000:.1f} ms"
        )
        _, t_inspect = timed(lambda: state.inspect_series("norm", r"layers\.1\d\.", limit=12))
        print(f"/api/inspect (regex over {args.groups} groups, 12 series): {t_inspect * 1000:.0f} ms")
        days = rp.available_days(run_dir)
        _, t_report = timed(lambda: rp.build_report(run_dir, days[1]))
        print(f"daily report for {days[1]} ({args.steps // args.days:,} steps): {t_report:.2f} s")


if __name__ == "__main__":
    main()
