"""GPU memory of fine-tuning a released CPM-Bee shape with LoRA (bf16 base) or fully, per batch × length.

    python benchmarks/finetune_memory.py [--preset cpm-bee-10b] [--tokens 1x512,1x2048,8x512] [--no-measure]

Parts of the estimate:

* base weights: the frozen model in bf16 (2 bytes per parameter);
* LoRA state: float32 adapters + their gradients + AdamW's two moments = 16 bytes per adapter parameter;
* full tuning instead: float32 master weights, gradients and AdamW moments (16 bytes per parameter), bf16
  autocast (its bf16 weight copies are kept for backward: one layer's with checkpointing, plus the tied
  embedding's for the projection); "FSDP/ZeRO-3 × 8" divides the 16 bytes per parameter by 8;
* activations: what autograd keeps between forward and backward. These are **measured**, not guessed: the
  script runs this package's own forward (bf16 base, float32 LoRA on project_q/project_v, bf16 autocast,
  SDPA attention) on the CPU for one- and two-layer models of the preset's exact layer shape at two lengths,
  records every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``, shared storages
  counted once, parameters excluded) and fits ``fixed(T) + layers × per_layer(T)`` with ``T = batch × length``
  tokens and an attention term in ``batch × length²``. With activation checkpointing only each layer's
  input (``T × hidden × 2`` bytes) is kept, plus one layer's activations while it is recomputed;
* the output projection: ``cpmbee finetune`` projects only the answer positions (``AnswerObjective``); the
  last column shows what full logits over the 86,583-token vocabulary would add (bf16 logits, their float32
  copy, log-softmax and gradient: 14 bytes per position and column), as ``model(**batch).loss`` computes.

Not counted: the CUDA context and allocator slack (typically 0.5-1.5 GiB), and the attention kernel's
scratch (on a GPU the memory-efficient SDPA kernel keeps no ``length²`` probabilities; the CPU kernel
measured here may, which makes the activation figures an upper bound).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmbee import CpmBeeForCausalLM
from cpmbee.config import CpmBeeConfig

GIB = 2**30
# What users reported for the original (BMTrain, fp16, every layer checkpointed) — see the reference notes.
REPORTS = [
    (
        "CPM-Bee #15",
        "10B LoRA needs at least 2 x RTX 3090 (24 GB); 2 x V100S OOM at batch 1 unless max_length is tiny",
    ),
    ("CPM-Bee #97", "10B LoRA, batch 1, length 128: OOM on one A100 40 GB; 'needs 60 GB+'"),
    ("QLoRA PR #100 (unmerged)", "10B QLoRA (NF4 base) on one RTX 3090 24 GB"),
    ("README (inference)", "10B fp16 inference: 20 GB"),
]


def parameter_count(config: CpmBeeConfig) -> int:
    with torch.device("meta"):
        model = CpmBeeForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def lora_parameters(config: CpmBeeConfig, rank: int) -> int:
    d, width = config.hidden_size, config.attention_width
    attention_layers = sum(not att for att, _ in config.layer_masks())
    return attention_layers * 2 * rank * (d + width)  # project_q and project_v: A [r, d] + B [width, r]


def saved_bytes(config: CpmBeeConfig, batch: int, length: int, method: str, rank: int) -> int:
    """Bytes autograd saves during one forward of this package's model (parameters excluded)."""
    from cpmbee.lora import add_lora

    torch.manual_seed(0)
    model = CpmBeeForCausalLM(config)
    if method == "lora":
        model.to(torch.bfloat16)
        model = add_lora(model, r=rank)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, config.vocab_size, (batch, length), generator=gen)
    context = torch.ones(batch, length, dtype=torch.bool)
    context[:, -4:] = False  # a 4-token answer
    labels = torch.full((batch, length), -100)
    labels[:, -5:-1] = ids[:, -4:]
    inputs = {
        "input_ids": ids,
        "context": context,
        "length": torch.full((batch,), length),
        "num_segments": torch.ones(batch, length, dtype=torch.int32),
    }
    from cpmbee.objective import AnswerObjective

    objective = AnswerObjective(model)
    batch_inputs = {
        **inputs,
        "input_id_sub": torch.zeros_like(ids),
        "sample_ids": torch.zeros_like(ids),
        "segment": torch.zeros_like(ids),
        "segment_rel_offset": torch.zeros_like(ids),
        "segment_rel": torch.zeros(batch, 1, dtype=torch.int32),
        "span": torch.zeros_like(ids),
        "ext_table_ids": torch.zeros(1, dtype=torch.int32),
        "ext_table_sub": torch.ones(1, dtype=torch.int32),
        "labels": labels,
    }
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        out = objective(**batch_inputs)
    del out
    return sum(seen.values())


def fit_activations(config: CpmBeeConfig, method: str, rank: int) -> dict[str, tuple[float, float, float]]:
    """Saved bytes as ``k + a·T + b·T²`` (batch 1, T = length): ``{"layer": (k, a, b), "fixed": (k, a, b)}``.

    Measured on models of 1 and 2 layers of the preset's layer shape (vocabulary cut to 512: it does not
    change what a layer saves) at three lengths. ``k`` holds length-independent tensors: under bf16 autocast
    of float32 weights (full tuning) the bf16 copies of the weights, which backward keeps.
    """
    import numpy as np

    small = config.to_dict()
    small.update(vocab_size=512, mask_modules=None)
    lengths = (64, 128, 192)
    table = {}
    for layers in (1, 2):
        shape = CpmBeeConfig(**{**small, "num_hidden_layers": layers})
        for length in lengths:
            table[layers, length] = saved_bytes(shape, 1, length, method, rank)
    design = np.array([[1.0, n, n * n] for n in lengths])
    per_layer = np.linalg.solve(design, [table[2, n] - table[1, n] for n in lengths])
    fixed = np.linalg.solve(design, [2 * table[1, n] - table[2, n] for n in lengths])
    return {"layer": tuple(per_layer), "fixed": tuple(fixed)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpm-bee-10b")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", default="1x128,1x512,1x2048,4x512,8x512", help="batch x length list")
    parser.add_argument(
        "--no-measure", action="store_true", help="skip the activation measurement (weights only)"
    )
    args = parser.parse_args()

    config = CpmBeeConfig.from_preset(args.preset)
    if config.mask_modules and not args.no_measure:
        parser.error(
            f"{args.preset} is pruned (mask_modules): activations are measured per full layer; use --no-measure"
        )
    n = parameter_count(config)
    n_lora = lora_parameters(config, args.rank)
    layers = config.num_hidden_layers
    print(
        f"{args.preset}: {n / 1e9:.2f}B parameters, {layers} layers, LoRA r={args.rank} on project_q/project_v"
    )
    print(f"  base weights bf16                  {n * 2 / GIB:7.2f} GiB")
    print(f"  LoRA params {n_lora / 1e6:.2f}M: fp32 + grad + AdamW {n_lora * 16 / GIB:7.3f} GiB")
    print(f"  full tuning: fp32 weights + grads + AdamW {n * 16 / GIB:7.1f} GiB")
    if args.no_measure:
        return

    fits = {m: fit_activations(config, m, args.rank) for m in ("lora", "full")}
    for method, fit in fits.items():
        (k, a, b), (_, a0, b0) = fit["layer"], fit["fixed"]
        print(
            f"  measured saved activations ({method}): per layer {a / 1024:.1f} KiB/token + {b:.0f} B/length²"
            f" + {k / GIB:.3f} GiB constant; outside the layers {a0 / 1024:.1f} KiB/token + {b0:.0f} B/length²"
        )
    print()
    print(
        "| batch × length | LoRA, no checkpointing | LoRA, checkpointing"
        " | full, checkpointing, 1 device | full, checkpointing, FSDP/ZeRO-3 × 8 (per GPU) | full logits would add |"
    )
    print("|---|---|---|---|---|---|")
    projection_copy = config.vocab_size * config.hidden_size * 2  # bf16 copy of the tied embedding (full)

    def activations(method: str, batch: int, length: int, checkpointing: bool) -> float:
        (k, a, b), (_, a0, b0) = fits[method]["layer"], fits[method]["fixed"]
        per_layer = batch * (a * length + b * length**2)
        fixed = batch * (a0 * length + b0 * length**2)
        if not checkpointing:  # every layer's activations (and, under autocast, its bf16 weight copies)
            return fixed + layers * (per_layer + k)
        return fixed + layers * batch * length * config.hidden_size * 2 + per_layer + k

    for spec in args.tokens.split(","):
        batch, length = (int(x) for x in spec.lower().split("x"))
        base_lora = n * 2 + n_lora * 16  # bf16 base + float32 adapter state
        lora = [base_lora + activations("lora", batch, length, c) for c in (False, True)]
        full_act = projection_copy + activations("full", batch, length, True)
        full = n * 16 + full_act  # float32 weights, gradients and two AdamW moments
        sharded = n * 16 / 8 + full_act
        logits = batch * length * config.vocab_size * 14
        print(
            f"| {batch} × {length} | {lora[0] / GIB:.1f} GiB | {lora[1] / GIB:.1f} GiB | {full / GIB:.0f} GiB"
            f" | {sharded / GIB:.1f} GiB | +{logits / GIB:.1f} GiB |"
        )
    print()
    print("Reported for the original implementation:")
    for source, text in REPORTS:
        print(f"  {source}: {text}")


if __name__ == "__main__":
    main()
