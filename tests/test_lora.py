"""LoRA: adapters only are trainable, merging is exact, OpenDelta deltas load with their semantics."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

from cpmbee import CpmBeeForCausalLM
from cpmbee.checkpoint import load_model
from cpmbee.lora import add_lora, load_adapter, load_opendelta, merge_lora, save_merged

from .conftest import random_weights_, tiny_config

peft = pytest.importorskip("peft")

VOCAB = 120


@pytest.fixture
def base():
    model = CpmBeeForCausalLM(tiny_config(VOCAB)).eval()
    return random_weights_(model)


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    return {"input_ids": ids, "context": torch.rand(2, 9, generator=gen) > 0.3}


def _randomize_adapters(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_only_adapters_are_trainable_and_start_as_identity(base, inputs):
    reference = _logits(base, inputs)
    model = add_lora(copy.deepcopy(base), r=4, alpha=8)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    config = base.config
    width, layers = config.num_attention_heads * config.dim_head, config.num_hidden_layers
    expected = layers * 2 * (4 * config.hidden_size + width * 4)  # q and v: A [r, in] + B [out, r]
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(("project_q" in n or "project_v" in n) for n in trainable)
    assert torch.equal(_logits(model, inputs), reference)  # B starts at zero

    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(trainable)


def test_merge_equals_unmerged_logits(base, inputs):
    model = add_lora(copy.deepcopy(base), r=4, alpha=8, targets=("project_q", "project_v", "w_out"))
    _randomize_adapters(model)
    unmerged = _logits(model, inputs)
    assert not torch.allclose(unmerged, _logits(base, inputs), atol=1e-3)  # the adapters matter

    merged = merge_lora(copy.deepcopy(model))
    assert type(merged) is CpmBeeForCausalLM
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, inputs), unmerged, rtol=1e-5, atol=1e-4)
    # PEFT's own merge is right too, because the adapters are CpmBeeLoraLinear.
    torch.testing.assert_close(
        _logits(copy.deepcopy(model).merge_and_unload(), inputs), unmerged, rtol=1e-5, atol=1e-4
    )


def test_merge_handles_stock_peft_layers(base, inputs):
    """An adapter built by plain PEFT (no custom layer) still merges with the sqrt(in) factor."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["project_q"])
    model = peft.get_peft_model(copy.deepcopy(base), config)
    _randomize_adapters(model)
    unmerged = _logits(model, inputs)
    wrong = _logits(copy.deepcopy(model).merge_and_unload(), inputs)
    assert not torch.allclose(wrong, unmerged, atol=1e-2)  # what PEFT's stock merge gets wrong
    torch.testing.assert_close(_logits(merge_lora(model), inputs), unmerged, rtol=1e-5, atol=1e-4)


def _opendelta_state(model, r=8, modules=("project_q", "project_v"), prefix=""):
    gen = torch.Generator().manual_seed(5)
    state = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in modules:
            key = prefix + name[len("cpmbee.") :]
            state[f"{key}.lora.lora_A"] = torch.randn(r, module.in_features, generator=gen) * 0.3
            state[f"{key}.lora.lora_B"] = torch.randn(module.out_features, r, generator=gen) * 0.3
            state[f"{key}.lora.lin.weight"] = torch.randn(3, 3, generator=gen)  # unused, ignored
    return state


def _opendelta_reference(base, state, scaling):
    """What OpenDelta computes: base output (already / sqrt(in)) + (x @ A.T @ B.T) * scaling."""
    model = copy.deepcopy(base)
    for key in state:
        if not key.endswith(".lora.lora_A"):
            continue
        path = key[: -len(".lora.lora_A")]
        path = path if path.startswith("cpmbee.") else "cpmbee." + path
        linear = model.get_submodule(path)
        a, b = state[key], state[key.replace("lora_A", "lora_B")]

        def forward(x, linear=linear, a=a, b=b, original=linear.forward):
            return original(x) + (x @ a.T @ b.T) * scaling

        linear.forward = forward
    return model


@pytest.mark.parametrize("prefix", ["", "cpmbee."])
def test_opendelta_delta_loads_with_its_scaling(base, inputs, prefix, tmp_path):
    state = _opendelta_state(base, prefix=prefix)
    expected = _logits(_opendelta_reference(base, state, scaling=16 / 8), inputs)
    path = tmp_path / "delta.pt"
    torch.save(state, path)
    model = load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=1e-5, atol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference
    torch.testing.assert_close(_logits(merge_lora(model), inputs), expected, rtol=1e-5, atol=1e-4)

    # another alpha: scaling alpha / r
    scaled = load_opendelta(copy.deepcopy(base), state, alpha=4.0)
    expected = _logits(_opendelta_reference(base, state, scaling=4 / 8), inputs)
    torch.testing.assert_close(_logits(scaled, inputs), expected, rtol=1e-5, atol=1e-4)


def test_opendelta_errors_are_clear(base):
    state = _opendelta_state(base)
    key_a = next(k for k in state if k.endswith("lora_A"))
    with pytest.raises(ValueError, match="lora_B missing"):
        load_opendelta(copy.deepcopy(base), {key_a: state[key_a]})
    with pytest.raises(ValueError, match="not an OpenDelta LoRA key"):
        load_opendelta(copy.deepcopy(base), {**state, "encoder.layers.0.weird": torch.zeros(1)})
    bad = dict(state)
    bad[key_a] = torch.zeros(4, bad[key_a].shape[1])
    with pytest.raises(ValueError, match="are not \\[r, in\\] and \\[out, r\\]"):
        load_opendelta(copy.deepcopy(base), bad)
    wrong_width = {k: (torch.zeros(8, 7) if k == key_a else v) for k, v in state.items()}
    with pytest.raises(ValueError, match="do not fit the linear"):
        load_opendelta(copy.deepcopy(base), wrong_width)
    with pytest.raises(ValueError, match="matches no linear"):
        add_lora(copy.deepcopy(base), targets=("project_x",))


def test_adapter_and_merged_model_round_trip(base, inputs, tmp_path, tiny_tokenizer):
    model = add_lora(copy.deepcopy(base), r=4)
    _randomize_adapters(model)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, inputs), expected, rtol=1e-6, atol=1e-5)
    # PEFT's merge on the reloaded adapter is right as well (the custom layer is registered on load).
    torch.testing.assert_close(
        _logits(copy.deepcopy(reloaded).merge_and_unload(), inputs), expected, rtol=1e-5, atol=1e-4
    )
    save_merged(reloaded, tmp_path / "merged", tiny_tokenizer)
    merged = load_model(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged, inputs), expected, rtol=1e-5, atol=1e-4)
    assert (tmp_path / "merged" / "vocab.txt").is_file()


def test_merge_lora_command_with_an_opendelta_file(base, inputs, tmp_path, tiny_vocab_file):
    from cpmbee.__main__ import cli

    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    (base_dir / "vocab.txt").write_bytes(tiny_vocab_file.read_bytes())
    state = _opendelta_state(base, r=4)
    torch.save(state, tmp_path / "delta.pt")
    result = CliRunner().invoke(
        cli, ["merge-lora", str(base_dir), str(tmp_path / "delta.pt"), str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    merged = load_model(tmp_path / "out")
    expected = _logits(_opendelta_reference(base, state, scaling=16 / 4), inputs)
    torch.testing.assert_close(_logits(merged, inputs), expected, rtol=1e-5, atol=1e-4)
    # A delta given where a base checkpoint is expected says what to do.
    with pytest.raises(ValueError, match="merge-lora"):
        load_model(tmp_path / "delta.pt", config=base.config)
