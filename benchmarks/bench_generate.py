"""Decode speed of beam search (and greedy) on the CPU, side by side with the original implementation.

The issue's shape: dim 512, 8 layers, 8×64 heads, dim_ff 1280, the real vocabulary size (86,583), random
weights, beam 3, 64 new tokens, 2 threads. Both implementations get the *same* weights and prompt, run
alternately ``--repeats`` times, and must produce the same answer (checked).

The original is run from a checkout of OpenBMB/CPM-Bee's ``src`` (``--reference-src``); its training-only
imports (bmtrain, jieba, pkg_resources) are replaced by run-time stand-ins defined below — nothing of it is
part of this project. Without ``--reference-src`` only this project is measured.

    python benchmarks/bench_generate.py --reference-src /tmp/ref/src [--compile] [--repeats 5]

``--compile`` also times a copy of the model with ``compile_decoding`` (torch.compile of the decode step);
its compile time is printed separately and not counted in its steps/s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpmbee import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeTokenizer  # noqa: E402
from cpmbee.generation import compile_decoding, generate  # noqa: E402

PROMPT = {"input": "今天天气不错，我们一起去公园散步，看到了很多美丽的花。", "prompt": "续写", "<ans>": ""}


def build_ours(vocab: Path, seed: int) -> tuple[CpmBeeForCausalLM, CpmBeeTokenizer]:
    tokenizer = CpmBeeTokenizer(vocab)
    config = CpmBeeConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        dim_head=64,
        dim_ff=1280,
        position_bias_num_buckets=256,
        position_bias_num_segment_buckets=256,
        position_bias_max_distance=2048,
    )
    torch.manual_seed(seed)
    model = CpmBeeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.05 * torch.randn_like(p) if "layernorm" in name else torch.randn_like(p))
    return model.eval(), tokenizer


def _install_stand_ins(src: Path) -> None:
    """Minimal stand-ins for the original's distributed-training imports (single process, CPU)."""
    bmt = types.ModuleType("bmtrain")

    def distributed_parameter(data, *args, **kwargs):
        return torch.nn.Parameter(data)

    bmt.DistributedModule = torch.nn.Module
    bmt.DistributedParameter = distributed_parameter
    bmt.ParameterInitializer = lambda fn, *a, **kw: None
    bmt.CheckpointBlock = lambda module, *a, **kw: module
    bmt.TransformerBlockList = lambda modules, *a, **kw: torch.nn.ModuleList(modules)
    bmt.rank = lambda: 0
    bmt.world_size = lambda: 1
    bmt.save = torch.save
    bmt.distributed = types.SimpleNamespace(all_gather=None, all_reduce=None)
    bmt.init_distributed = lambda *a, **kw: None
    sys.modules["bmtrain"] = bmt
    sys.modules["jieba"] = types.ModuleType("jieba")
    pkg = types.ModuleType("pkg_resources")
    pkg.resource_stream = lambda package, path: open(src / "cpm_live" / path, "rb")  # noqa: SIM115
    sys.modules["pkg_resources"] = pkg
    sys.path.insert(0, str(src))


def build_reference(src: Path, ours: CpmBeeForCausalLM):
    _install_stand_ins(src)
    from cpm_live.generation.bee import CPMBeeBeamSearch
    from cpm_live.models.bee import CPMBeeConfig
    from cpm_live.models.bee_torch import CPMBeeTorch
    from cpm_live.tokenizers.bee import CPMBeeTokenizer

    c = ours.config
    config = CPMBeeConfig(
        vocab_size=c.vocab_size,
        dim_model=c.hidden_size,
        num_heads=c.num_attention_heads,
        dim_head=c.dim_head,
        dim_ff=c.dim_ff,
        num_layers=c.num_hidden_layers,
        position_bias_num_buckets=c.position_bias_num_buckets,
        position_bias_num_segment_buckets=c.position_bias_num_segment_buckets,
        position_bias_max_distance=c.position_bias_max_distance,
        half=False,
    )
    real_arange = torch.arange

    def cpu_arange(*args, **kwargs):  # the original builds its rotary table on "cuda"
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return real_arange(*args, **kwargs)

    torch.arange = cpu_arange
    try:
        model = CPMBeeTorch(config)
    finally:
        torch.arange = real_arange
    state = {k.removeprefix("cpmbee."): v for k, v in ours.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return CPMBeeBeamSearch(model.eval(), CPMBeeTokenizer())


def count_steps(module: torch.nn.Module, method: str = "forward") -> list[int]:
    """Wrap ``module.method`` to count its calls (prefill included)."""
    calls = [0]
    original = getattr(module, method)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(module, method, counted)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=Path, default=REPO.parent / "shared" / "cpm-bee" / "vocab.txt")
    parser.add_argument("--reference-src", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time compile_decoding (torch.compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ours, tokenizer = build_ours(args.vocab, args.seed)
    ours_calls = count_steps(ours)
    runners = {}

    def run_ours(**kw):
        return generate(ours, tokenizer, PROMPT, **kw)

    runners["cpmbee"] = (run_ours, ours_calls)
    if args.compile:
        compiled, _ = build_ours(args.vocab, args.seed)  # the same weights
        compiled_calls = count_steps(compiled)
        compile_decoding(compiled)
        t = time.perf_counter()
        generate(compiled, tokenizer, PROMPT, beam_size=args.beam, max_new_tokens=4)
        print(f"# compile (first generate call, 4 tokens): {time.perf_counter() - t:.1f} s")

        def run_compiled(**kw):
            return generate(compiled, tokenizer, PROMPT, **kw)

        runners["compiled"] = (run_compiled, compiled_calls)
    if args.reference_src is not None:
        ref = build_reference(args.reference_src, ours)
        ref_calls = count_steps(ref.model, "inference")

        def run_ref(beam_size, max_new_tokens, repetition_penalty):
            return ref.generate(
                [dict(PROMPT)],
                beam_size=beam_size,
                max_length=max_new_tokens,
                repetition_penalty=repetition_penalty,
            )[0]

        runners["original"] = (run_ref, ref_calls)

    kw = dict(beam_size=args.beam, max_new_tokens=args.new_tokens, repetition_penalty=1.0)
    results: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, object] = {}
    for name, (fn, _) in runners.items():  # warm-up
        outputs[name] = fn(beam_size=args.beam, max_new_tokens=4, repetition_penalty=1.0)
    for _ in range(args.repeats):
        for name, (fn, calls) in runners.items():
            calls[0] = 0
            t = time.perf_counter()
            outputs[name] = fn(**kw)
            elapsed = time.perf_counter() - t
            steps = calls[0] - 1  # minus the prefill
            results[name].append(steps / elapsed)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"
    )
    print(
        f"# beam {args.beam}, {args.new_tokens} new tokens, dim 512 × 8 layers, vocab {tokenizer.vocab_size}"
    )
    for name, rates in results.items():
        print(
            f"{name:10s} decode steps/s: best {max(rates):6.1f}  median {statistics.median(rates):6.1f}"
            f"  all {[round(r, 1) for r in rates]}"
        )
    if "original" in results:
        for name in results:
            if name == "original":
                continue
            best = max(results[name]) / max(results["original"])
            median = statistics.median(results[name]) / statistics.median(results["original"])
            same = outputs[name] == outputs["original"]
            print(f"{name} vs original: {best:.2f}× (best), {median:.2f}× (median); identical: {same}")

    ours_calls[0] = 0
    t = time.perf_counter()
    run_ours(beam_size=1, max_new_tokens=args.new_tokens)
    greedy = (ours_calls[0] - 1) / (time.perf_counter() - t)
    print(f"cpmbee greedy decode tokens/s (batch 1): {greedy:.1f}")


if __name__ == "__main__":
    main()
