"""Peak resident memory when loading a checkpoint: cpmbee's loader vs a plain build-then-load.

    python benchmarks/bench_load_memory.py [--preset cpm-bee-1b] [--dir /tmp/cpmbee-load-bench]

Writes a random checkpoint of the preset's shape (float16, original key names, ``torch.save``) once, then
loads it in fresh subprocesses and reports each one's peak RSS (``VmHWM``) next to the file size:

* ``cpmbee.checkpoint.load_model``: meta-device model + memory-mapped tensors assigned in place, every
  weight read once by the NaN/inf check (its pages stay mapped: file-backed, reclaimable memory);
* ``load_model(check_finite=False)``: the same without that read;
* naive: ``CpmBeeForCausalLM(config)`` in float16, then ``load_state_dict(torch.load(path))``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
from cpmbee import CpmBeeConfig, CpmBeeForCausalLM
from cpmbee.checkpoint import load_model
path, method = {path!r}, {method!r}
start = time.perf_counter()
if method.startswith("cpmbee"):
    model = load_model(path, check_finite=method == "cpmbee")
else:
    config = CpmBeeConfig.from_json_file({config!r})
    torch.set_default_dtype(torch.float16)
    model = CpmBeeForCausalLM(config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.cpmbee.load_state_dict(state)
    del state
n = sum(p.numel() for p in model.parameters())
seconds = time.perf_counter() - start
status = {{l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("VmHWM", "RssAnon"))}}
print(n, status["VmHWM"], status["RssAnon"], seconds)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpm-bee-1b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/cpmbee-load-bench"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from cpmbee import CpmBeeConfig, CpmBeeForCausalLM

    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt, config_path = args.dir / f"{args.preset}.pt", args.dir / f"{args.preset}.json"
    config = CpmBeeConfig.from_preset(args.preset)
    if not ckpt.is_file():
        with torch.device("meta"):
            model = CpmBeeForCausalLM(config)
        state = {
            k.removeprefix("cpmbee."): torch.randn(v.shape, dtype=torch.float16)
            for k, v in model.state_dict().items()
        }
        torch.save(state, ckpt)
        del state
    config.to_json_file(config_path)
    size = ckpt.stat().st_size
    print(f"checkpoint {ckpt.name}: {size / 2**30:.2f} GiB")
    for method in ("cpmbee", "cpmbee-nocheck", "naive"):
        code = CHILD.format(root=str(ROOT), path=str(ckpt), method=method, config=str(config_path))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        params, peak, anon, seconds = int(out[0]), int(out[1]), int(out[2]), float(out[3])
        print(
            f"{method:14s}: {params / 1e9:.2f}B params, peak RSS {peak / 2**30:.2f} GiB = {peak / size:.2f}x the file,"
            f" anonymous RSS after loading {anon / 2**30:.2f} GiB, load {seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
