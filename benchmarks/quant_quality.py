"""How much int8 / NF4 weight quantization changes a model's outputs: logits and perplexity against fp32.

    python benchmarks/quant_quality.py [--model DIR ...] [--samples 64] [--json out.json]

Without ``--model`` it measures the golden tiny models of the original implementation
(``shared/golden/weights_p_*.safetensors`` with ``config_p_*.json``: 3 layers, hidden 32, random weights,
the real 86,583-token vocabulary). Text: the first ``--samples`` CCPM evaluation items
(``shared/data/ccpm/bee_eval.jsonl``), scored like fine-tuning (loss on the answer tokens).

Per model and mode: max and mean absolute logit difference over the answer positions, relative L2 error of
the logits, top-1 agreement with fp32, perplexity and its change, and the bytes the weights take. Modes that
bitsandbytes cannot run on this machine are reported with their error instead of a number.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpmbee import CpmBeeTokenizer  # noqa: E402
from cpmbee.checkpoint import load_model  # noqa: E402
from cpmbee.data.finetune import prepare_for_finetune  # noqa: E402
from cpmbee.quantize import model_memory_bytes, quantize_model  # noqa: E402

SHARED = ROOT.parent / "shared"
MODES = {"int8": {"bits": 8}, "nf4": {"bits": 4, "quant_type": "nf4"}}


def golden_models() -> list[tuple[str, Path, Path]]:
    golden = SHARED / "golden"
    return [
        (
            w.stem.removeprefix("weights_"),
            w,
            golden / w.name.replace("weights_", "config_").replace(".safetensors", ".json"),
        )
        for w in sorted(golden.glob("weights_p_*.safetensors"))
    ]


def score(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Logits and labels at the answer positions, and the perplexity over them."""
    with torch.no_grad():
        out = model(**batch)
    mask = batch["labels"] != -100
    return out.logits[mask].float(), batch["labels"][mask], math.exp(out.loss.item())


def measure(name: str, model: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
    ref_logits, _labels, ref_ppl = score(model, batch)
    rows = [
        {
            "model": name,
            "mode": "fp32",
            "ppl": round(ref_ppl, 3),
            "weights_mb": model_memory_bytes(model) / 2**20,
        }
    ]
    for mode, kwargs in MODES.items():
        row: dict[str, Any] = {"model": name, "mode": mode}
        try:
            quantized = quantize_model(copy.deepcopy(model), **kwargs)
            logits, _, ppl = score(quantized, batch)
        except Exception as err:  # bitsandbytes may lack this path on this machine: record it
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            continue
        diff = (logits - ref_logits).abs()
        row.update(
            max_abs_logit_diff=round(diff.max().item(), 4),
            mean_abs_logit_diff=round(diff.mean().item(), 4),
            rel_l2=round(((logits - ref_logits).norm() / ref_logits.norm()).item(), 4),
            top1_agreement=round((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(), 4),
            ppl=round(ppl, 3),
            ppl_delta_pct=round(100 * (ppl - ref_ppl) / ref_ppl, 2),
            weights_mb=model_memory_bytes(quantized) / 2**20,
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", default=[], help="model directory (repeatable)")
    parser.add_argument("--vocab", default=str(SHARED / "cpm-bee" / "vocab.txt"))
    parser.add_argument("--data", default=str(SHARED / "data" / "ccpm" / "bee_eval.jsonl"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    torch.manual_seed(0)
    with open(args.data, encoding="utf-8") as f:
        samples = [json.loads(line) for _, line in zip(range(args.samples), f)]
    models = [(Path(m).name, Path(m), None) for m in args.model] or golden_models()
    if not models:
        raise SystemExit(f"no models: pass --model DIR or provide {SHARED / 'golden'}")
    rows: list[dict[str, Any]] = []
    for name, path, config in models:
        vocab = path / "vocab.txt" if path.is_dir() and (path / "vocab.txt").is_file() else Path(args.vocab)
        tokenizer = CpmBeeTokenizer(vocab)
        batch = prepare_for_finetune(tokenizer, samples)
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        model = load_model(path, config=config, dtype="fp32")
        rows.extend(measure(name, model, batch))

    print(f"# {platform.machine()}, torch {torch.__version__}, {args.samples} CCPM samples")
    print(
        "| model | mode | max abs logit diff | mean abs diff | rel. L2 | top-1 agree | ppl | Δppl | weights MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['mode']} | not run: {r['error']} | | | | | | |")
            continue
        print(
            f"| {r['model']} | {r['mode']} | {r.get('max_abs_logit_diff', '—')} | {r.get('mean_abs_logit_diff', '—')} "
            f"| {r.get('rel_l2', '—')} | {r.get('top1_agreement', '—')} | {r['ppl']} "
            f"| {str(r['ppl_delta_pct']) + '%' if 'ppl_delta_pct' in r else '—'} | {r['weights_mb']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
