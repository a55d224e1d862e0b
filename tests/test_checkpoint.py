"""Checkpoint layouts: original .pt → `cpmbee convert` → Auto classes, HF layouts, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from cpmbee import CpmBeeConfig, CpmBeeForCausalLM
from cpmbee.__main__ import cli
from cpmbee.checkpoint import load_model, load_state_dict

from .conftest import GOLDEN, VOCAB, golden_masked_model_name, require_shared


@pytest.fixture()
def original_checkpoint(tmp_path):
    """A golden model (with masked layers) laid out like a released original checkpoint."""
    require_shared()
    from safetensors.torch import load_file

    name = golden_masked_model_name()
    state = load_file(str(GOLDEN / f"weights_{name}.safetensors"))
    assert not any(k.startswith("cpmbee.") for k in state)
    torch.save(state, tmp_path / "cpm-bee-tiny.pt")
    shutil.copy(GOLDEN / f"config_{name}.json", tmp_path / "cpm-bee-tiny.json")  # original field names
    shutil.copy(VOCAB, tmp_path / "vocab.txt")
    return tmp_path / "cpm-bee-tiny.pt"


def _inputs(tokenizer):
    from cpmbee.prompt import collate_prompts, encode_prompt

    batch = collate_prompts(
        tokenizer,
        [
            encode_prompt(tokenizer, {"input": "今天天气不错，<mask_0>", "<ans>": ""}),
            encode_prompt(tokenizer, {"question": "1 << 2?", "<ans>": {"a": ""}}),
        ],
    )
    return batch.model_inputs()


def test_original_pt_converts_and_loads_with_auto_classes(original_checkpoint, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["convert", str(original_checkpoint), str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    config = json.loads((out / "config.json").read_text())
    original = json.loads((original_checkpoint.parent / "cpm-bee-tiny.json").read_text())
    assert config["model_type"] == "cpmbee" and "dim_model" not in config
    assert (
        config["hidden_size"] == original["dim_model"]
        and config["num_hidden_layers"] == original["num_layers"]
    )

    reference = load_model(original_checkpoint)  # reads the .pt directly, config found beside it
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(AutoConfig.from_pretrained(out), CpmBeeConfig)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    assert not (tmp_path / ".hf").exists() and not any(p.name.startswith(".hf.") for p in tmp_path.iterdir())


def test_half_checkpoint_keeps_fp16_unless_asked(original_checkpoint, tmp_path, monkeypatch):
    state = load_state_dict(original_checkpoint)
    torch.save({k: v.half() for k, v in state.items()}, original_checkpoint)
    config = json.loads((original_checkpoint.parent / "cpm-bee-tiny.json").read_text())
    config["half"] = True
    (original_checkpoint.parent / "cpm-bee-tiny.json").write_text(json.dumps(config))
    assert load_model(original_checkpoint).dtype == torch.float16
    model = load_model(original_checkpoint, dtype="float32")
    assert model.dtype == torch.float32  # `half` never overrides an explicit dtype
    out = tmp_path / "hf16"
    assert CliRunner().invoke(cli, ["convert", str(original_checkpoint), str(out)]).exit_code == 0
    # from_pretrained computes in float32 on a machine without CUDA, in the checkpoint's dtype with one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert CpmBeeForCausalLM.from_pretrained(out).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert CpmBeeForCausalLM.from_pretrained(out).dtype == torch.float16
    assert CpmBeeForCausalLM.from_pretrained(out, dtype=torch.float32).dtype == torch.float32


def test_hf_layouts_prefixed_unprefixed_sharded(original_checkpoint, tmp_path, tokenizer):
    reference = load_model(original_checkpoint)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        expected = reference(**inputs).logits
    state = load_state_dict(original_checkpoint)
    config = CpmBeeConfig.from_json_file(original_checkpoint.parent / "cpm-bee-tiny.json")

    plain = tmp_path / "bin"  # the hub's layout: original keys in pytorch_model.bin, original config
    plain.mkdir()
    torch.save(state, plain / "pytorch_model.bin")
    shutil.copy(original_checkpoint.parent / "cpm-bee-tiny.json", plain / "config.json")
    prefixed = tmp_path / "prefixed"  # HF keys plus the unused lm_head some exports carry
    prefixed.mkdir()
    torch.save(
        {"lm_head.weight": torch.zeros(3), **{"cpmbee." + k: v for k, v in state.items()}},
        prefixed / "pytorch_model.bin",
    )
    config.save_pretrained(prefixed)
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()

    for directory in (plain, prefixed, sharded):
        for model in (load_model(directory), CpmBeeForCausalLM.from_pretrained(directory).eval()):
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, expected), directory.name


def test_load_errors_are_clear(original_checkpoint):
    wrong = CpmBeeConfig.from_json_file(original_checkpoint.parent / "cpm-bee-tiny.json")
    wrong.mask_modules = None
    with pytest.raises(ValueError, match="does not match the config"):
        load_model(original_checkpoint, config=wrong)
    # copy out of the memory map before overwriting the file it maps
    state = {k: v.clone() for k, v in load_state_dict(original_checkpoint).items()}
    state["encoder.layers.0.self_att.self_attention.project_q.lora.lora_A"] = torch.zeros(8, 32)
    torch.save(state, original_checkpoint)
    with pytest.raises(ValueError, match="LoRA"):
        load_model(original_checkpoint)
    (original_checkpoint.parent / "vocab.txt").unlink()
    result = CliRunner().invoke(
        cli, ["convert", str(original_checkpoint), str(original_checkpoint.parent / "x")]
    )
    assert result.exit_code != 0 and "vocab" in result.output


def test_config_both_naming_styles():
    require_shared()
    official = CpmBeeConfig.from_json_file(VOCAB.parent / "cpm-bee-10b.json")
    preset = CpmBeeConfig.from_preset("cpm-bee-10b")
    for field in (
        "vocab_size",
        "hidden_size",
        "num_attention_heads",
        "dim_head",
        "dim_ff",
        "num_hidden_layers",
    ):
        assert getattr(official, field) == getattr(preset, field)
    assert official.dim_model == 4096 and official.num_layers == 48 and official.num_heads == 32
    assert round(preset.num_parameters_estimate() / 1e9, 2) == 9.62
    assert round(CpmBeeConfig.from_preset("cpm-bee-1b").num_parameters_estimate() / 1e9, 2) == 1.06
    with pytest.raises(ValueError, match="mask_modules"):
        CpmBeeConfig(num_hidden_layers=2, mask_modules=[[True, False]])
    with pytest.raises(ValueError, match="hidden_size"):
        CpmBeeConfig(hidden_size=-1)
    with pytest.raises(ValueError, match="unknown preset"):
        CpmBeeConfig.from_preset("cpm-bee-99b")
