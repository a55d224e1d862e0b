"""Fine-tune a small random-init CPM-Bee on CCPM with `cpmbee finetune` and report what happened.

    python benchmarks/bench_finetune_ccpm.py [--shared ../shared] [--out runs/bench-ccpm] [--steps 1500]

No released weights are available offline, so the model is a randomly initialised small CPM-Bee (the real
86,583-token vocabulary, 4 layers of width 128 by default): the figures show that the pipeline learns and
what it costs, not what CPM-Bee reaches on CCPM. Steps:

1. convert the raw CCPM files with `cpmbee finetune-data ccpm` (the tutorial's data preparation);
2. full fine-tuning, evaluating on the first `--eval-samples` eval samples before, during and after;
3. throughput: full and LoRA (r 8 on project_q/project_v) for `--throughput-steps` steps each, back to
   back, without evaluation — their ratio is fair even on a shared machine, the long run's speed is not.

Each run is a separate `cpmbee` process; tokens/s is the median over the run's steps (all tokens of the
batch, context included), memory the process's peak RSS (`peak_mem_gb` in the metrics). `--skip-long` runs
only step 3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmbee.config import CpmBeeConfig
from cpmbee.train.metrics import read_records

REPO = Path(__file__).resolve().parent.parent


def cpmbee(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cpmbee", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def summarize(run: Path, skip: int = 5) -> dict:
    train = list(read_records(run / "metrics", kind="train"))
    evals = list(read_records(run / "metrics", kind="eval"))
    return {
        "steps": len(train),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[skip:] or train),
        "peak_mem_gb": max(r.get("peak_mem_gb", r["mem_gb"]) for r in train),
        "first_loss": train[0]["loss"],
        "last_loss": statistics.mean(r["loss"] for r in train[-20:]),
        "evals": [
            {k: r.get(k) for k in ("step", "loss", "accuracy", "exact_match", "samples")} for r in evals
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-ccpm"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--throughput-steps", type=int, default=60)
    parser.add_argument("--skip-long", action="store_true", help="only the throughput runs")
    args = parser.parse_args()

    shared, out = Path(args.shared), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = shared / "cpm-bee" / "vocab.txt"
    data = out / "data"
    for split in ("train", "eval"):
        raw = shared / "data" / "ccpm" / f"raw_{split}.jsonl"
        if not (data / f"{split}.jsonl").is_file():
            cpmbee("finetune-data", "ccpm", str(raw), str(data / f"{split}.jsonl"))
    config = CpmBeeConfig.from_preset(
        "tiny",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        dim_head=32,
        dim_ff=args.hidden * 5 // 2,
    )
    config.to_json_file(str(out / "config.json"))
    common = [
        "--config", str(out / "config.json"), "--vocab", str(vocab), "--train", str(data / "train.jsonl"),
        "--no-progress", "--batch-size", str(args.batch_size), "--no-resume", "--save-every", "0",
    ]  # fmt: skip
    evaluation = [
        "--eval",
        str(data / "eval.jsonl"),
        "--eval-max-samples",
        str(args.eval_samples),
        "--patience",
        "0",
    ]

    report: dict = {
        "model": {"parameters": config.num_parameters_estimate(), "hidden_size": config.hidden_size,
                  "num_hidden_layers": config.num_hidden_layers, "dim_ff": config.dim_ff},
        "args": vars(args),
    }  # fmt: skip
    if not args.skip_long:
        full_dir = out / "full"
        shutil.rmtree(full_dir, ignore_errors=True)
        wall = cpmbee(
            "finetune", *common, *evaluation, "--out", str(full_dir), "--method", "full", "--lr", str(args.lr),
            "--max-steps", str(args.steps), "--eval-every", str(args.eval_every), "--warmup-steps", "100",
        )  # fmt: skip
        report["full"] = summarize(full_dir) | {"wall_s": wall}
    quick = [*common, "--max-steps", str(args.throughput_steps), "--lr", "1e-3"]
    for method in ("full", "lora"):
        run = out / f"throughput-{method}"
        shutil.rmtree(run, ignore_errors=True)
        wall = cpmbee("finetune", *quick, "--out", str(run), "--method", method)
        report[f"throughput_{method}"] = summarize(run) | {"wall_s": wall}
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"model: {report['model']}")
    if "full" in report:
        full = report["full"]
        first, last = full["evals"][0], full["evals"][-1]
        print(
            "| steps | tokens/s (median) | peak RSS | eval loss before → after | accuracy before → after | wall |"
        )
        print("|---|---|---|---|---|---|")
        print(
            f"| {full['steps']} | {full['tokens_per_s']:.0f} | {full['peak_mem_gb']:.2f} GiB | "
            f"{first['loss']:.3f} → {last['loss']:.3f} | {first['accuracy']:.3f} → {last['accuracy']:.3f} | "
            f"{full['wall_s']:.0f} s |"
        )
        print("full evals:", json.dumps(full["evals"]))
    print("| method | steps | tokens/s (median) | peak RSS |")
    print("|---|---|---|---|")
    for method in ("full", "lora"):
        t = report[f"throughput_{method}"]
        print(f"| {method} | {t['steps']} | {t['tokens_per_s']:.0f} | {t['peak_mem_gb']:.2f} GiB |")


if __name__ == "__main__":
    main()
