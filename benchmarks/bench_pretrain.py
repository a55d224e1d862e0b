"""Pre-training throughput: ``cpmbee pretrain`` on the real tiny corpus, 1 vs N processes.

    python benchmarks/bench_pretrain.py --corpus corpus --vocab ../shared/cpm-bee/vocab.txt --steps 30

Runs each setting as a fresh run (its own run directory under a temporary folder), then reports the
median over the steps after the first ``--skip`` of the ``train`` records' ``tokens_per_s`` and
``step_time``, plus the wall time. ``tokens`` are non-padding tokens of all ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    "tiny": {},
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "dim_head": 64,
        "dim_ff": 1024,
    },
}


def run(args: argparse.Namespace, nproc: int, shape: str, workers: int, root: Path) -> dict:
    import yaml

    base = yaml.safe_load((REPO / "configs/pretrain/tiny.yaml").read_text(encoding="utf-8"))
    mixture = yaml.safe_load((REPO / "configs/pretrain/datasets.yaml").read_text(encoding="utf-8"))
    for d in mixture["datasets"]:
        d["path"] = str(Path(args.corpus).resolve() / Path(d["path"]).name)
        if isinstance(d.get("transforms"), str):
            d["transforms"] = str(REPO / "configs/pretrain" / d["transforms"])
    name = f"{shape}-np{nproc}-w{workers}"
    (root / f"{name}.mix.yaml").write_text(yaml.safe_dump(mixture, allow_unicode=True), encoding="utf-8")
    base.update(run_dir=str(root / name))
    base["model"].update(vocab=str(Path(args.vocab).resolve()), overrides=SHAPES[shape])
    base["data"].update(config=str(root / f"{name}.mix.yaml"), num_workers=workers)
    base["train"].update(max_steps=args.steps)
    base["checkpoint"].update(every=10**9)
    base["logging"].update(console=False, inspect_every=None)
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(base, allow_unicode=True), encoding="utf-8")
    cmd = [sys.executable, "-m", "cpmbee", "pretrain", "--config", str(cfg)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            *cmd[1:],
        ]
    start = time.perf_counter()
    subprocess.run(
        cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    )
    wall = time.perf_counter() - start
    records = []
    for file in sorted((root / name / "metrics").glob("*.jsonl")):
        records += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r["type"] == "train"][args.skip :]
    return {
        "setting": name,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "step_time": statistics.median(r["step_time"] for r in train),
        "tokens_per_step": statistics.mean(r["tokens"] for r in train),
        "wall_s": wall,
        "final_loss": train[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="corpus", help="output of `cpmbee prepare-corpus`")
    parser.add_argument("--vocab", default=str(REPO.parent / "shared/cpm-bee/vocab.txt"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=["tiny"], choices=sorted(SHAPES))
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run(args, n, shape, w, Path(tmp))
            for shape in args.shapes
            for w in args.workers
            for n in args.nproc
        ]
    print("| setting | tokens/s | step time (s) | tokens/step | wall (s) | loss at end |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['tokens_per_s']:.0f} | {r['step_time']:.2f} | {r['tokens_per_step']:.0f} "
            f"| {r['wall_s']:.0f} | {r['final_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
