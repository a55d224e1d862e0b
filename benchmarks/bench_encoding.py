"""Prompt encoding (and refusing) time against input size: issue #13 item 2.

    python benchmarks/bench_encoding.py [--repeat 5]

For inputs of K top-level keys (``{"k0": "v", ..., "<ans>": ""}``: 2K+2 segments) it times, in one run:

- ``table, before``: the segment-relation table as it was built before (a 3-D int64 comparison and a
  cumulative product), kept here only as the reference;
- ``table, now``: ``cpmbee.prompt._segment_relations`` (one 2-D comparison per tree level);
- ``encode, no limit``: ``encode_prompt`` without a token limit (the whole n² table is built);
- ``refuse at 2048``: ``encode_prompt(..., max_tokens=2048)``, which raises ``PromptTooLong`` while counting;
- ``server``: a ``POST /v1/generate`` to the in-process server (default limits), body parsing, validation
  and the 422 included;

and a 2,000-turn chat to ``/v1/chat/completions``. Each figure is the median of ``--repeat`` runs (the
quadratic ones stop growing where they would pass a few seconds or a few GB).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpmbee.api import load_model_and_tokenizer  # noqa: E402
from cpmbee.prompt import PromptTooLong, _segment_relations, encode_prompt  # noqa: E402

KEYS = [250, 500, 1000, 2000, 4000, 8000, 16000]


def relations_before(parents: Sequence[int], depths: Sequence[int], max_depth: int) -> np.ndarray:
    """The relation table as the package built it before #13 (reference for the ratio)."""
    n = len(parents)
    depth = np.asarray(depths, dtype=np.int64)
    height = int(depth.max()) + 1 if n else 1
    ancestors = np.full((n, height), -1, dtype=np.int64)
    for i, p in enumerate(parents):
        if p >= 0:
            ancestors[i] = ancestors[p]
        ancestors[i, depth[i]] = i
    same = (ancestors[:, None, :] == ancestors[None, :, :]) & (ancestors[:, None, :] >= 0)
    lca_depth = np.cumprod(same, axis=2).sum(axis=2) - 1
    up = np.minimum(depth[:, None] - lca_depth, max_depth - 1)
    down = np.minimum(depth[None, :] - lca_depth, max_depth - 1)
    bucket = up * max_depth + down
    bucket = np.where(bucket == 0, 0, bucket + 1)
    return bucket.reshape(-1).astype(np.int32)


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def refuse(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except PromptTooLong:
            return
        raise AssertionError("expected PromptTooLong")

    return run


def row(keys: int, tokenizer: object, client: object, repeat: int) -> str:
    """One line of the table: K top-level keys."""
    data = {**{f"k{i}": "v" for i in range(keys)}, "<ans>": ""}
    parents = [-1] + [p for k in range(keys) for p in (0, 1 + 2 * k)] + [0]
    depths = [0] + [d for _ in range(keys) for d in (1, 2)] + [1]
    before = now = unlimited = "-"
    if keys <= 2000:
        before = f"{median_time(lambda: relations_before(parents, depths, 8), repeat):.3f}"
    if keys <= 4000:
        now = f"{median_time(lambda: _segment_relations(parents, depths, 8), repeat):.3f}"
        unlimited = f"{median_time(lambda: encode_prompt(tokenizer, data), repeat):.3f}"
    limited = median_time(refuse(lambda: encode_prompt(tokenizer, data, max_tokens=2048)), repeat)

    def post() -> None:
        r = client.post("/v1/generate", json={"input": data})  # type: ignore[attr-defined]
        assert r.status_code == 422, r.text

    server = median_time(post, repeat)
    return f"| {keys:,} | {len(parents):,} | {before} | {now} | {unlimited} | {limited:.3f} | {server:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from cpmbee.serve import create_app, load_engine

    _, tokenizer = load_model_and_tokenizer(None)
    engine, info = load_engine(None)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"# median of {args.repeat} runs, seconds; '-' = not run (seconds to minutes, or GBs, before)")
    print(
        "| keys | segments | table, before | table, now | encode, no limit | refuse at 2048 | server (422) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with TestClient(create_app(engine, model_info=info)) as client:
        for keys in KEYS:
            print(row(keys, tokenizer, client, args.repeat))
        chat = [{"role": r, "content": "hello there"} for _ in range(2000) for r in ("user", "assistant")]
        chat.append({"role": "user", "content": "and?"})

        def post_chat() -> None:
            r = client.post("/v1/chat/completions", json={"messages": chat})
            assert r.status_code == 422, r.text

        print(
            f"\n2,000-turn chat refused by /v1/chat/completions: {median_time(post_chat, args.repeat):.3f} s"
        )


if __name__ == "__main__":
    main()
