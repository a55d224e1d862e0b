"""Measured quality of the embedded demo model (the figures of its model card).

* dictionary translation (CC-CEDICT entries, the pre-training task ``{"input": zh, "prompt": "英文"}`` and
  back): on entries seen in training and on the held-out headwords (``prepare-corpus --cedict-holdout``).
  ``exact`` = the whole definition string; ``sense`` = one of its ``;``-separated senses; zh→en ``f1`` =
  word-level F1 against the closest sense;
* CCPM eval choice accuracy (option likelihood; 4 options, chance 25%);
* perplexity on CCPM eval paraphrases (modern Chinese never trained on) and on training paraphrases.

    python benchmarks/eval_embedded.py --corpus corpus --n 300 -o embedded-quality.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpmbee.api import load_model_and_tokenizer  # noqa: E402
from cpmbee.data.ccpm import ccpm_to_bee  # noqa: E402
from cpmbee.data.shards import Dataset  # noqa: E402
from cpmbee.evaluation.answer_metrics import normalize_answer, token_f1  # noqa: E402
from cpmbee.evaluation.tasks import run_task  # noqa: E402
from cpmbee.generation import generate  # noqa: E402


def read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def translation(model, tokenizer, entries, batch_size: int, beam: int) -> dict[str, float]:
    zh_en = [{"input": e["zh"], "prompt": "英文", "<ans>": ""} for e in entries]
    en_zh = [{"input": e["en"], "prompt": "中文", "<ans>": ""} for e in entries]
    outs: dict[str, list] = {"zh_en": [], "en_zh": []}
    for name, prompts in (("zh_en", zh_en), ("en_zh", en_zh)):
        for i in range(0, len(prompts), batch_size):
            outs[name] += generate(
                model, tokenizer, prompts[i : i + batch_size], beam_size=beam, max_new_tokens=32
            )
    exact = sense = f1 = back = 0.0
    for e, a, b in zip(entries, outs["zh_en"], outs["en_zh"]):
        got = normalize_answer(a["<ans>"] or "")
        senses = [normalize_answer(s) for s in e["en"].split(";") if s.strip()]
        exact += got == normalize_answer(e["en"])
        sense += got in senses
        f1 += max(token_f1(a["<ans>"], s) for s in e["en"].split(";") if s.strip())
        back += (b["<ans>"] or "").strip() == e["zh"]
    n = len(entries)
    examples = [
        {"zh": e["zh"], "en": e["en"], "model_en": a["<ans>"], "model_zh": b["<ans>"]}
        for e, a, b in list(zip(entries, outs["zh_en"], outs["en_zh"]))[:8]
    ]
    return {
        "n": n,
        "zh_en_exact": exact / n,
        "zh_en_sense": sense / n,
        "zh_en_f1": f1 / n,
        "en_zh_exact": back / n,
        "examples": examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--corpus", type=Path, default=REPO / "corpus")
    parser.add_argument("--ccpm", type=Path, default=REPO.parent / "shared" / "data" / "ccpm")
    parser.add_argument("--n", type=int, default=300, help="dictionary entries per split")
    parser.add_argument("--ccpm-limit", type=int, default=None, help="CCPM eval questions (default: all)")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    rng = random.Random(0)
    started = time.time()
    report: dict = {"model": args.model or "embedded", "params": sum(p.numel() for p in model.parameters())}

    train = list(Dataset(args.corpus / "cedict"))
    held = read_jsonl(args.corpus / "cedict_heldout.jsonl")
    report["translation_train"] = translation(
        model, tokenizer, rng.sample(train, args.n), args.batch_size, args.beam
    )
    report["translation_heldout"] = translation(
        model, tokenizer, rng.sample(held, min(args.n, len(held))), args.batch_size, args.beam
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        eval_rows = read_jsonl(args.ccpm / "raw_eval.jsonl")
        eval_rows = eval_rows[: args.ccpm_limit]
        train_rows = read_jsonl(args.ccpm / "raw_train.jsonl")[:500]
        choice = tmp_path / "ccpm_eval.jsonl"
        with open(choice, "w", encoding="utf-8") as f:
            for row in eval_rows:
                f.write(json.dumps(ccpm_to_bee(row), ensure_ascii=False) + "\n")
        report["ccpm_choice"] = run_task(model, tokenizer, choice, kind="choice", batch_size=16)["metrics"]
        for name, rows in (("eval", eval_rows), ("train", train_rows)):
            path = tmp_path / f"ppl_{name}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({"text": ccpm_to_bee(row)["input"]}, ensure_ascii=False) + "\n")
            report[f"perplexity_ccpm_{name}"] = run_task(
                model, tokenizer, path, kind="perplexity", batch_size=16
            )["metrics"]
    report["seconds"] = round(time.time() - started, 1)
    text = json.dumps(report, ensure_ascii=False, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
