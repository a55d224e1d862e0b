"""Generation speed of the embedded demo model (what `make demo` / `cpmbee generate` run by default).

python benchmarks/bench_embedded.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmbee.api import load_model_and_tokenizer
from cpmbee.generation import generate

PROMPTS = [
    {"input": "今天天气不错，", "<ans>": ""},
    {"input": "北京", "prompt": "英文", "<ans>": ""},
    {"input": "friendship", "prompt": "中文", "<ans>": ""},
    {"input": "春风又绿江南岸", "<ans>": ""},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    print(
        f"load: {time.perf_counter() - t:.2f} s, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )

    steps = [0]
    forward = model.forward

    def counted(*a, **kw):
        steps[0] += 1
        return forward(*a, **kw)

    model.forward = counted
    generate(model, tokenizer, PROMPTS[0], max_new_tokens=4)  # warm-up
    for label, options, batch in (
        ("greedy, batch 1", {"beam_size": 1}, False),
        ("greedy, batch 4", {"beam_size": 1}, True),
        ("beam 3, batch 1", {"beam_size": 3}, False),
    ):
        best = 0.0
        latency = []
        for _ in range(args.repeats):
            steps[0] = 0
            t = time.perf_counter()
            if batch:
                generate(model, tokenizer, PROMPTS, max_new_tokens=args.new_tokens, **options)
            else:
                for p in PROMPTS:
                    generate(model, tokenizer, p, max_new_tokens=args.new_tokens, **options)
            elapsed = time.perf_counter() - t
            calls = steps[0] - (1 if batch else len(PROMPTS))  # minus prefills
            best = max(best, calls / elapsed)
            latency.append(elapsed / len(PROMPTS))
        print(f"{label:16s} decode steps/s {best:7.1f}   mean time per prompt {min(latency) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
