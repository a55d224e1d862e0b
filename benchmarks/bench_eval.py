"""Examples per second of choice scoring on CCPM: option likelihood vs generation (greedy and beam search).

    python benchmarks/bench_eval.py [--shared ../shared] [--model DIR] [--limit 200] [--batch-size 16]

Without ``--model`` the model is randomly initialised in the *embedded default model's shape* (6 layers,
width 256, 4 heads of 64, FFN 768; ``configs/embedded/pretrain.yaml``) with the real 86,583-token CPM-Bee
vocabulary, so accuracies are chance-level and only the speeds mean something. The same ``--limit`` CCPM
eval questions (converted as ``cpmbee finetune-data ccpm`` does) go through ``cpmbee.evaluation.tasks``:

* likelihood — the 4 options filled in, batched forwards over the candidate rows (4 rows per question);
* generation — ``cpmbee.generation.generate`` then ``parse_choice``: greedy (``beam_size=1``) and the
  original's beam search (``beam_size=3``), ``--max-new-tokens`` each (a trained model stops after 2:
  ``<option_N>`` and ``</s>``; a random one runs to the cap, so generation is timed at its worst here).

Each method runs once after a short warm-up on the same inputs, one after the other in one process; the
printed JSON has examples/s and the accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmbee import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeTokenizer
from cpmbee.data.ccpm import convert_ccpm_file
from cpmbee.evaluation.tasks import run_task

EMBEDDED_SHAPE = dict(
    hidden_size=256,
    num_attention_heads=4,
    dim_head=64,
    dim_ff=768,
    num_hidden_layers=6,
    position_bias_max_distance=512,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared"
    )
    parser.add_argument("--model", default=None, help="a model directory (default: random, embedded shape)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_eval"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    args.out.mkdir(parents=True, exist_ok=True)
    task = args.out / "ccpm_eval.jsonl"
    convert_ccpm_file(args.shared / "data" / "ccpm" / "raw_eval.jsonl", task)
    if args.model:
        from cpmbee.api import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    else:
        tokenizer = CpmBeeTokenizer(args.shared / "cpm-bee" / "vocab.txt")
        config = CpmBeeConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, **EMBEDDED_SHAPE)
        torch.manual_seed(0)
        model = CpmBeeForCausalLM(config).eval()

    run_task(
        model,
        tokenizer,
        task,
        limit=8,
        batch_size=args.batch_size,
        by_generation=True,
        generation={"beam_size": 1, "max_new_tokens": 2},
    )  # warm-up
    results = {}
    entry = run_task(model, tokenizer, task, limit=args.limit, batch_size=args.batch_size)
    results["likelihood"] = {
        "examples_per_s": args.limit / entry["timing"]["likelihood_s"],
        "accuracy": entry["metrics"]["accuracy"],
    }
    for name, beams in (("generation_greedy", 1), ("generation_beam3", 3)):
        entry = run_task(
            model,
            tokenizer,
            task,
            limit=args.limit,
            batch_size=args.batch_size,
            by_generation=True,
            generation={"beam_size": beams, "max_new_tokens": args.max_new_tokens},
        )
        results[name] = {
            "examples_per_s": args.limit / entry["timing"]["generation_s"],
            "accuracy": entry["metrics"]["accuracy_generation"],
            "unparsed": entry["counts"]["unparsed_generations"],
        }
    base = results["likelihood"]["examples_per_s"]
    for value in results.values():
        value["vs_likelihood"] = round(value["examples_per_s"] / base, 3)
    report = {
        "model": args.model or "random init, embedded shape, real vocabulary",
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": args.limit,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
