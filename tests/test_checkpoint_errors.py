"""Damaged checkpoints and configs give one clear error naming the file and the problem (issue #13, item 12):
corrupt safetensors, pickles that are not plain weights, integer weights, NaN/inf weights, config fields of
the wrong type or value, and a full disk while converting."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from cpmbee import CpmBeeConfig, CpmBeeForCausalLM
from cpmbee.__main__ import cli
from cpmbee.checkpoint import convert, load_model

from .conftest import random_weights_, tiny_config

PROMPT = '{"input": "a", "<ans>": ""}'


@pytest.fixture
def model_dir(tmp_path, tiny_vocab_file, tiny_tokenizer):
    """A small safetensors model directory (config.json, model.safetensors, vocab.txt)."""
    path = tmp_path / "model"
    model = random_weights_(CpmBeeForCausalLM(tiny_config(tiny_tokenizer.vocab_size)))
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(tiny_vocab_file, path / "vocab.txt")
    return path


def _state(model_dir):
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def _save(model_dir, state):
    from safetensors.torch import save_file

    save_file(state, str(model_dir / "model.safetensors"))


def _cli_error(args, expected):
    """The command fails with exit code 1 and prints exactly one `Error:` line (no traceback)."""
    res = CliRunner().invoke(cli, args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], res.output
    return errors[0]


def _set_config(model_dir, **fields):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(fields)
    (model_dir / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------ weight files
@pytest.mark.parametrize(
    "content",
    [b"\x10\x00\x00\x00\x00\x00\x00\x00{broken", b"", None],
    ids=["garbage", "empty", "truncated"],
)
def test_corrupt_safetensors_name_the_file(model_dir, content):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] if content is None else content)
    with pytest.raises(ValueError, match=rf"{weights}: not a valid safetensors file"):
        load_model(model_dir)
    _cli_error(["generate", "--model", str(model_dir), PROMPT], f"{weights}: not a valid safetensors file")


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickles_with_code_are_not_loaded_and_no_unsafe_advice_is_given(model_dir):
    (model_dir / "model.safetensors").unlink()
    bin_path = model_dir / "pytorch_model.bin"
    torch.save({"cpmbee.input_embedding.weight": torch.zeros(2), "x": _Payload()}, bin_path)
    with pytest.raises(ValueError) as err:
        load_model(model_dir)
    message = str(err.value)
    assert message.startswith(f"{bin_path}: not a safe checkpoint")
    assert "it holds print," in message and "safetensors" in message
    assert "weights_only" not in message and "trust" not in message.lower()
    line = _cli_error(["generate", "--model", str(model_dir), PROMPT], f"{bin_path}: not a safe checkpoint")
    assert "weights_only" not in line
    bin_path.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(ValueError, match=rf"{bin_path}: not a readable PyTorch checkpoint"):
        load_model(model_dir)


def test_integer_weights_are_refused(model_dir):
    _save(model_dir, {k: v.to(torch.int64) for k, v in _state(model_dir).items()})
    with pytest.raises(
        ValueError, match=r"model: cpmbee\.\S+ has dtype torch\.int64; weights must be floating point"
    ):
        load_model(model_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_are_refused(model_dir, bad):
    state = _state(model_dir)
    key = "cpmbee.encoder.layers.1.ffn.ffn.w_out.weight"
    state[key].view(-1)[[3, 7]] = bad
    _save(model_dir, state)
    with pytest.raises(ValueError, match=rf"{key} has 2 NaN/inf values"):
        load_model(model_dir)
    _cli_error(["generate", "--model", str(model_dir), PROMPT], f"{key} has 2 NaN/inf values")
    model = load_model(model_dir, check_finite=False)  # on purpose, e.g. to inspect a damaged checkpoint
    assert not torch.isfinite(dict(model.named_parameters())[key]).all()


def test_half_precision_nonfinite_check_is_exact(model_dir):
    """The finiteness check sums in float64: large finite bfloat16/float16 values are not flagged."""
    state = {k: v.to(torch.bfloat16) for k, v in _state(model_dir).items()}
    state["cpmbee.input_embedding.weight"].fill_(3.0e38)  # sums past float32's range, still finite
    _save(model_dir, state)
    assert load_model(model_dir).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "float128", "CpmBeeConfig.dtype must be one of"),
        ("eps", "small", "CpmBeeConfig.eps must be a positive number, got 'small'"),
        ("eps", -1.0, "CpmBeeConfig.eps must be a positive number, got -1.0"),
        ("dropout_p", "x", "CpmBeeConfig.dropout_p must be a number in [0, 1), got 'x'"),
        ("init_std", None, "CpmBeeConfig.init_std must be a positive number, got None"),
        ("distance_scale", "16", "CpmBeeConfig.distance_scale must be a positive number, got '16'"),
        ("half", "yes", "CpmBeeConfig.half must be true or false, got 'yes'"),
        (
            "mask_modules",
            [[1, "no"]] * 3,
            "CpmBeeConfig.mask_modules[0] must be a [mask_att, mask_ffn] pair of",
        ),
        ("hidden_size", 32.5, "CpmBeeConfig.hidden_size must be a positive integer, got 32.5"),
    ],
)
def test_config_fields_are_validated_naming_the_file_and_field(model_dir, tmp_path, field, value, message):
    _set_config(model_dir, **{field: value})
    config_path = model_dir / "config.json"
    with pytest.raises(ValueError) as err:
        CpmBeeConfig.from_json_file(config_path)
    assert str(err.value).startswith(f"{config_path}: ") and message in str(err.value)
    with pytest.raises(ValueError, match="CpmBeeConfig"):
        load_model(model_dir)
    _cli_error(["convert", str(model_dir), str(tmp_path / "out")], f"{config_path}: {message}")
    assert not (tmp_path / "out").exists()


def test_known_dtypes_still_load(model_dir):
    for name in ("float32", "float16", "bfloat16"):
        _set_config(model_dir, dtype=name)
        assert CpmBeeConfig.from_json_file(model_dir / "config.json").dtype in (name, getattr(torch, name))
    _set_config(model_dir, torch_dtype="float16", dtype=None)
    assert str(CpmBeeConfig.from_json_file(model_dir / "config.json").dtype).endswith("float16")


# -------------------------------------------------------------------------------------------- disk full
def test_a_full_disk_while_converting_leaves_the_old_output(model_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "converted"
    convert(model_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")  # what a full disk leaves: a torn file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(
        OSError, match=rf"{out}: could not write the converted model \(No space left on device\)"
    ):
        convert(model_dir, out, dtype="float16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model"]  # no temporary left
    _cli_error(["convert", str(model_dir), str(out)], f"{out}: could not write the converted model")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
