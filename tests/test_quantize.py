"""Weight-only int8 / 4-bit quantization keeps names, scaling, and most of the model's behaviour."""

from __future__ import annotations

import copy

import pytest
import torch

from cpmbee import CpmBeeForCausalLM
from cpmbee.quantize import model_memory_bytes, quantize_model

from .conftest import tiny_config

pytest.importorskip("bitsandbytes")


def _model():
    # Random init: quantization noise compounds more than in a trained model, hence loose bounds; a
    # wrong output scale (missing the 1/sqrt(fan_in)) would be off by a factor of ~11 here.
    config = tiny_config(500, hidden_size=128, dim_head=32, dim_ff=256, num_hidden_layers=2)
    return CpmBeeForCausalLM(config).eval()


@pytest.mark.parametrize(("bits", "max_rel_err", "min_agree"), [(8, 0.05, 0.85), (4, 0.5, 0.4)])
def test_quantized_model_tracks_fp32(bits, max_rel_err, min_agree):
    model = _model()
    ids = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
    names = {n for n, _ in model.named_modules()}
    quantized = quantize_model(copy.deepcopy(model), bits)
    assert {n for n, _ in quantized.named_modules()} == names  # same module names (PEFT targets, device maps)
    layer = quantized.cpmbee.encoder.layers[0].self_att.self_attention.project_q
    assert type(layer).__name__ in ("CpmBeeLinear8bitLt", "CpmBeeLinear4bit")
    with torch.no_grad():
        out = quantized(ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert rel < max_rel_err and agree > min_agree, (rel, agree)
    linear_bytes = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if ".encoder.layers." in n and "layernorm" not in n
    )
    saved = model_memory_bytes(model) - model_memory_bytes(quantized)
    assert saved > linear_bytes * (0.7 if bits == 8 else 0.8)  # fp32 -> 1 byte or 0.5 byte per weight


def test_quantize_errors():
    model = _model()
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, 3)
    quantize_model(model, 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 8)
