"""Tokenizer and structured-encoding throughput, optionally side by side with the original implementation.

    python benchmarks/bench_tokenizer.py [--vocab ../shared/cpm-bee/vocab.txt] [--ccpm ../shared/data/ccpm]
                                         [--reference-src /path/to/CPM-Bee/src]

``--reference-src`` points at a checkout of OpenBMB/CPM-Bee's ``src`` directory; the original tokenizer
and ``convert_data_to_id`` are then timed on the same inputs in the same process (bmtrain and
pkg_resources are stubbed, they are not needed for these functions). Each figure is the best of
``--repeat`` passes; a fresh tokenizer is built for every pass so no cache carries over.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpmbee.prompt import encode_sample  # noqa: E402
from cpmbee.tokenizer import CpmBeeTokenizer, escape  # noqa: E402


def load_reference(src: Path):
    """Import the original tokenizer and convert_data_to_id from a CPM-Bee checkout (read-only use)."""
    stub = types.ModuleType("pkg_resources")
    stub.resource_stream = lambda pkg, path: open(src / "cpm_live" / path, "rb")  # noqa: SIM115
    sys.modules.setdefault("pkg_resources", stub)
    for name in ("bmtrain", "jieba"):  # imported at module level by the original, unused by these functions
        mod = types.ModuleType(name)
        mod.DistributedModule = object
        mod.__getattr__ = lambda attr: lambda *a, **k: 0  # rank(), world_size(), ...
        sys.modules.setdefault(name, mod)
    sys.path.insert(0, str(src))
    spec = importlib.util.spec_from_file_location("ref_bee_tok", src / "cpm_live" / "tokenizers" / "bee.py")
    tok_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tok_mod)
    convert = None
    try:
        from cpm_live.training_tasks.bee.pretrain import convert_data_to_id as convert  # type: ignore
    except Exception as err:  # pragma: no cover - depends on the checkout
        print(f"(reference convert_data_to_id unavailable: {err})")
    return tok_mod.CPMBeeTokenizer, convert


def corpora(ccpm: Path) -> dict[str, list[str]]:
    raw = [
        json.loads(line)["input"]
        for line in (ccpm / "raw_train.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    english = []
    for path in sorted(ROOT.glob("**/*.md")) + sorted((ROOT / "cpmbee").glob("*.py")):
        if ".venv" not in path.parts:
            english.append(path.read_text(encoding="utf-8"))
    english_text = escape("\n".join(english))  # literal "<" must be written "<<"
    return {
        "zh short (CCPM lines)": raw[:5000],
        "zh documents (100 CCPM lines each)": ["\n".join(raw[i : i + 100]) for i in range(5000, 9000, 100)],
        "en/code documents (repo docs+source)": [
            english_text[i : i + 8000] for i in range(0, len(english_text), 8000)
        ],
    }


def best_rate(fn, texts, repeat, make=None) -> float:
    chars = sum(map(len, texts))
    best = 0.0
    for _ in range(repeat):
        obj = make() if make else None
        start = time.perf_counter()
        for t in texts:
            fn(obj, t)
        best = max(best, chars / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=Path, default=ROOT.parent / "shared" / "cpm-bee" / "vocab.txt")
    ap.add_argument("--ccpm", type=Path, default=ROOT.parent / "shared" / "data" / "ccpm")
    ap.add_argument("--reference-src", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    ref_cls, ref_convert = load_reference(args.reference_src) if args.reference_src else (None, None)

    def ours():
        return CpmBeeTokenizer(args.vocab)

    print("\n## Tokenizer: characters per second (encode with ext table)")
    print("| corpus | chars | cpmbee | original | ratio |\n|---|---|---|---|---|")
    for name, texts in corpora(args.ccpm).items():
        mine = best_rate(lambda t, s: t.encode(s), texts, args.repeat, ours)
        if ref_cls is not None:
            ref = best_rate(lambda t, s: t.encode(s), texts, args.repeat, ref_cls)
            # identical output on this corpus
            a, b = ours(), ref_cls()
            assert all(a.encode(s).ids == b.encode(s)[0] for s in texts), name
            print(f"| {name} | {sum(map(len, texts))} | {mine:,.0f} | {ref:,.0f} | {mine / ref:.1f}x |")
        else:
            print(f"| {name} | {sum(map(len, texts))} | {mine:,.0f} | - | - |")

    samples = [
        json.loads(line) for line in (args.ccpm / "bee_eval.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    print(f"\n## Structured encoding: CCPM eval samples per second ({len(samples)} samples)")

    def rate(fn, make):
        best = 0.0
        for _ in range(args.repeat):
            tok = make()
            start = time.perf_counter()
            for s in samples:
                fn(tok, s)
            best = max(best, len(samples) / (time.perf_counter() - start))
        return best

    mine = rate(lambda t, s: encode_sample(t, s), ours)
    line = f"cpmbee encode_sample: {mine:,.0f} samples/s"
    if ref_convert is not None:
        ref = rate(lambda t, s: ref_convert(t, s, shuffle_answer=False, max_depth=8), ref_cls)
        line += f"; original convert_data_to_id: {ref:,.0f} samples/s; ratio {mine / ref:.1f}x"
    print(line)


if __name__ == "__main__":
    main()
