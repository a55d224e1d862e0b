"""Start-up time of the command line: `cpmbee --help` and each command's `--help`, each in a fresh process.

The console script imports `cpmbee_cli` first, so `import cpmbee` stays lazy and parsing loads no torch
(tests/test_cli_options.py checks that); this measures what a user waits for.

    python benchmarks/bench_cli_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ["", "generate", "eval", "serve", "convert", "merge-lora", "finetune", "pretrain", "dataset"]


def seconds(args: list[str]) -> float:
    cpmbee = Path(sys.executable).with_name("cpmbee")
    start = time.perf_counter()
    subprocess.run([str(cpmbee), *args, "--help"], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    seconds([])  # warm the file cache
    print("| command | median s | min s |\n|---|---|---|")
    for command in COMMANDS:
        runs = [seconds([command] if command else []) for _ in range(args.repeat)]
        name = f"cpmbee {command} --help".replace("  ", " ")
        print(f"| `{name}` | {statistics.median(runs):.2f} | {min(runs):.2f} |")
    runs = []
    for _ in range(args.repeat):  # for scale: what loading torch alone costs on this machine
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        runs.append(time.perf_counter() - start)
    print(f"| `python -c 'import torch'` (reference) | {statistics.median(runs):.2f} | {min(runs):.2f} |")


if __name__ == "__main__":
    main()
