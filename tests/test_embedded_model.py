"""The embedded demo model shipped in the package: small, loadable every supported way, and answering."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from cpmbee.api import default_model_path, load_model_and_tokenizer


def test_shipped_files_are_small_and_complete():
    path = default_model_path()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "vocab.txt", "tokenizer_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert sum(p.stat().st_size for p in path.iterdir()) <= 30 * 2**20


def test_loads_and_answers_structured_prompts():
    model, tokenizer = load_model_and_tokenizer()
    assert model.dtype == torch.float32  # stored in half precision, computed in fp32 on the CPU
    out = model.generate({"input": "北京", "prompt": "英文", "<ans>": ""}, tokenizer, max_new_tokens=16)
    assert set(out) == {"input", "prompt", "<ans>"}
    assert isinstance(out["<ans>"], str) and out["<ans>"].strip()
    nested = model.generate(
        {"input": "今天天气不错", "<ans>": {"英文": "", "续写": ""}},
        tokenizer,
        beam_size=1,
        max_new_tokens=24,
    )
    assert set(nested["<ans>"]) == {"英文", "续写"}


def test_auto_classes_give_the_same_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cpmbee  # noqa: F401  (registers the Auto classes)

    path = default_model_path()
    model, _ = load_model_and_tokenizer()
    auto = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    auto_tok = AutoTokenizer.from_pretrained(path)
    batch = auto_tok({"input": "你好", "<ans>": ""}, return_tensors="pt")
    inputs = {k: v for k, v in batch.items()}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, auto(**inputs).logits)


def test_cli_default_model_is_the_embedded_one():
    from cpmbee.__main__ import cli

    data = {"input": "今天天气不错，", "<ans>": ""}
    res = CliRunner().invoke(cli, ["generate", "--max-new-tokens", "8", json.dumps(data, ensure_ascii=False)])
    assert res.exit_code == 0, res.output
    model, tokenizer = load_model_and_tokenizer()
    assert json.loads(res.output) == model.generate(data, tokenizer, max_new_tokens=8)
