"""Load test of ``cpmbee serve``: concurrent clients against a server on loopback, for a fixed time.

    python benchmarks/bench_serve.py [--model DIR] [--clients 8] [--duration 60] [--max-tokens 16]

Without ``--model`` a small random model (the ``tiny`` preset's shape, synthetic 109-token vocabulary) is
saved to a temporary directory, so the figures measure the server (HTTP, queue, batching, SSE) more than the
model. The server runs in a subprocess (``python -m cpmbee serve``); each client thread loops over three
request kinds (``/v1/generate`` greedy, ``/v1/completions`` streamed, ``/v1/chat/completions``) until the
time is up. Reported: errors (any non-200 or broken stream), latency percentiles per request, requests/s,
decoded tokens/s and the mean batch size (from ``/metrics``), and the server's resident memory after the
warm-up, at the end, and its peak (sampled every second) — flat memory over the soak means no leak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_tiny_model(directory: Path) -> Path:
    """A random model in the ``tiny`` preset's shape with a synthetic vocabulary, saved as a model directory."""
    import torch

    from cpmbee import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeTokenizer
    from cpmbee.data.vocab import SPECIAL_TOKENS as specials

    words = [
        *"abcdefghijklmnopqrstuvwxyz0123456789.,!?:;'\"()[]{}-_=+*/<>@#$%&",
        "the",
        " the",
        "今天",
        "天气",
    ]
    vocab = directory / "vocab.txt"
    directory.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(specials + words) + "\n", encoding="utf-8")
    tokenizer = CpmBeeTokenizer(vocab)
    torch.manual_seed(0)
    config = CpmBeeConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    CpmBeeForCausalLM(config).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def requests_for(max_tokens: int) -> list[tuple[str, dict, bool]]:
    return [
        (
            "/v1/generate",
            {
                "input": {"input": "今天天气", "<ans>": ""},
                "options": {"beam_size": 1, "max_new_tokens": max_tokens},
            },
            False,
        ),
        (
            "/v1/completions",
            {"prompt": "the", "max_tokens": max_tokens, "temperature": 0.8, "stream": True},
            True,
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "the"}], "max_tokens": max_tokens, "temperature": 0},
            False,
        ),
    ]


def client_loop(url: str, stop_at: float, max_tokens: int, latencies: list[float], errors: list[str]) -> None:
    kinds = requests_for(max_tokens)
    with httpx.Client(base_url=url, timeout=60) as client:
        i = 0
        while time.monotonic() < stop_at:
            path, body, stream = kinds[i % len(kinds)]
            i += 1
            started = time.monotonic()
            try:
                if stream:
                    with client.stream("POST", path, json=body) as r:
                        text = r.read().decode()
                    ok = r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
                else:
                    r = client.post(path, json=body)
                    ok = r.status_code == 200
                if not ok:
                    errors.append(f"{path}: {r.status_code} {r.text[:200]}")
                    continue
            except httpx.HTTPError as err:
                errors.append(f"{path}: {err!r}")
                continue
            latencies.append(time.monotonic() - started)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model directory (default: a tiny random model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load after the warm-up")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    model_dir = Path(args.model) if args.model else build_tiny_model(Path(tmp.name) / "tiny")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cpmbee",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-queue",
            "256",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)

        warm_lat: list[float] = []
        warm_err: list[str] = []
        client_loop(url, time.monotonic() + args.warmup, args.max_tokens, warm_lat, warm_err)
        before = httpx.get(url + "/metrics").text
        rss_start = rss_mb(server.pid)
        rss_samples = [rss_start]
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.monotonic() + args.duration
        threads = [
            threading.Thread(target=client_loop, args=(url, stop_at, args.max_tokens, latencies, errors))
            for _ in range(args.clients)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            rss_samples.append(rss_mb(server.pid))
        elapsed = time.monotonic() - started
        after = httpx.get(url + "/metrics").text
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
        tmp.cleanup()

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    rows, batches = delta("cpmbee_batch_rows_sum"), delta("cpmbee_batch_rows_count")
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": str(args.model or "tiny preset (random, 109-token vocabulary)"),
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "max_tokens": args.max_tokens,
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            q: round(1000 * percentile(latencies, p), 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))
        }
        if latencies
        else None,
        "mean_latency_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
        "decoded_tokens_per_s": round(delta("cpmbee_generated_tokens_total") / elapsed, 1),
        "mean_batch_rows": round(rows / batches, 2) if batches else None,
        "rss_mb": {
            "start": round(rss_start, 1),
            **{f"at_{q}pct": round(rss_samples[len(rss_samples) * q // 100], 1) for q in (25, 50, 75)},
            "end": round(rss_end, 1),
            "peak": round(max(rss_samples), 1),
        },
    }
    print(json.dumps(summary, indent=2))
    if errors:
        print("first errors:", *errors[:5], sep="\n  ", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
