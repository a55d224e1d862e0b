"""Inference memory of the released CPM-Bee shapes at bf16 / int8 / int4 (weight-only), computed from the
configs, with the original README's figures beside them.

    python benchmarks/memory_table.py [--context 1024 --beams 3] [--measure cpm-bee-1b]

Weights: the embedding (also the output projection) stays 16-bit; linear weights take 2 bytes (bf16),
1 byte + a float32 scale per output row (LLM.int8), or 0.5 byte + a float32 absmax per 64-weight block
(NF4). KV cache: keys and values of every attention layer for ``beams × context`` tokens in bf16.
``--measure PRESET`` builds that shape with random weights on the CPU, quantizes it with
``cpmbee.quantize`` and prints the bytes actually held, to check the formula.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmbee.config import CpmBeeConfig

ORIGINAL_README_GB = {"cpm-bee-10b": 20, "cpm-bee-5b": 11, "cpm-bee-2b": 6.7, "cpm-bee-1b": 4.1}
GIB = 2**30


def weight_bytes(config: CpmBeeConfig, scheme: str) -> int:
    d, a, ff = config.hidden_size, config.attention_width, config.dim_ff
    embedding = config.vocab_size * d * 2
    small = (
        d
        + (config.position_bias_num_buckets + config.position_bias_num_segment_buckets)
        * config.num_attention_heads
    ) * 2
    linear_weights = 0
    rows = 0
    for mask_att, mask_ffn in config.layer_masks():
        if not mask_att:
            linear_weights += 4 * d * a
            rows += 3 * a + d
            small += d * 2
        if not mask_ffn:
            linear_weights += 3 * d * ff
            rows += 2 * ff + d
            small += d * 2
    if scheme == "bf16":
        linear = linear_weights * 2
    elif scheme == "int8":
        linear = linear_weights + rows * 4
    elif scheme == "int4":
        linear = linear_weights // 2 + (linear_weights // 64) * 4
    else:
        raise ValueError(scheme)
    return embedding + small + linear


def kv_bytes(config: CpmBeeConfig, tokens: int) -> int:
    layers = sum(not att for att, _ in config.layer_masks())
    return 2 * layers * config.attention_width * tokens * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--measure", default=None, help="build this preset on the CPU and count its bytes")
    args = ap.parse_args()
    tokens = args.context * args.beams
    print(
        f"| model | params | bf16 | int8 | int4 | KV cache ({args.beams}×{args.context} tokens) | original README (fp16) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, readme in ORIGINAL_README_GB.items():
        config = CpmBeeConfig.from_preset(name)
        cells = [f"{weight_bytes(config, s) / GIB:.2f} GiB" for s in ("bf16", "int8", "int4")]
        print(
            f"| {name} | {config.num_parameters_estimate() / 1e9:.2f}B | {' | '.join(cells)} | "
            f"{kv_bytes(config, tokens) / GIB:.2f} GiB | {readme} GB |"
        )
    if args.measure:
        import torch

        from cpmbee import CpmBeeForCausalLM
        from cpmbee.quantize import model_memory_bytes, quantize_model

        config = CpmBeeConfig.from_preset(args.measure)
        for scheme, bits in (("bf16", None), ("int8", 8), ("int4", 4)):
            torch.manual_seed(0)
            model = CpmBeeForCausalLM(config).to(torch.bfloat16).eval()
            if bits:
                quantize_model(model, bits)
            measured = model_memory_bytes(model)
            print(
                f"measured {args.measure} {scheme}: {measured / GIB:.3f} GiB (formula {weight_bytes(config, scheme) / GIB:.3f} GiB)"
            )
            del model


if __name__ == "__main__":
    main()
