"""transformers' own calls on the embedded model: encode/decode, tokenizer(text), generate(**inputs) with a
GenerationConfig, the text-generation pipeline, save_pretrained files; the model card's structured calls
stay as they are; the dtype a model loads in; and no warnings on the way."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from cpmbee import CpmBeeForCausalLM, CpmBeeTokenizer
from cpmbee.api import default_model_path
from cpmbee.generation import generate
from cpmbee.prompt import encode_prompt, plain_text_input, plain_text_prompt

TEXT = "今天天气不错"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dtype tests below check warnings; this only loads
        model = CpmBeeForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
    return model, CpmBeeTokenizer.from_pretrained(default_model_path())


def _answer(tokenizer, sequences, prompt_length):
    return tokenizer.decode(sequences[0, prompt_length:], skip_special_tokens=True)


def test_encode_decode_round_trip(model_and_tokenizer):
    _, tok = model_and_tokenizer
    for text in (TEXT, "a << b and\nnew lines", "😀 unknown"):
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="own ext table"):
        tok.decode(tok.encode(TEXT), {1: "x"})


def test_tokenizer_call_on_plain_text_gives_the_layout(model_and_tokenizer):
    _, tok = model_and_tokenizer
    enc = tok(TEXT)
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["input_ids"] == encode_prompt(tok, plain_text_input(TEXT)).ids.tolist()
    pt = tok(TEXT, return_tensors="pt")
    assert pt["input_ids"].shape == (1, len(enc["input_ids"])) and bool(pt["attention_mask"].all())
    batch = tok([TEXT, "北京"], padding=True, return_tensors="pt")
    short = len(tok("北京")["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][1].tolist() == [0] * (width - short) + [1] * short  # left padding
    assert (
        tok("a < b")["input_ids"]
        == tok.pad({"input_ids": [encode_prompt(tok, {"input": "a << b", "<ans>": ""}).ids.tolist()]})[
            "input_ids"
        ][0]
    )
    with pytest.raises(ValueError, match="truncation"):
        tok(TEXT, truncation=True)


def test_plain_text_prompt_reads_the_layout_back(model_and_tokenizer):
    _, tok = model_and_tokenizer
    for text in (TEXT, "", "a < b"):
        expected = encode_prompt(tok, plain_text_input(text))
        got = plain_text_prompt(tok(text)["input_ids"], bos_id=tok.bos_id, eos_id=tok.eos_id)
        for name in (
            "ids",
            "subs",
            "segments",
            "sample_ids",
            "num_segments",
            "segment_rel_offset",
            "segment_rel",
        ):
            assert getattr(got, name).tolist() == getattr(expected, name).tolist(), name
        assert got.predict_segments == expected.predict_segments and got.answer_paths == expected.answer_paths
    with pytest.raises(ValueError, match="plain-text prompt"):
        plain_text_prompt(tok.encode(TEXT).ids, bos_id=tok.bos_id, eos_id=tok.eos_id)


def test_generate_on_input_ids_equals_the_structured_call(model_and_tokenizer):
    model, tok = model_and_tokenizer
    inputs = tok(TEXT, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    data = {"input": TEXT, "<ans>": ""}
    greedy = model.generate(**inputs, max_new_tokens=12)
    assert torch.equal(greedy[:, :n], inputs["input_ids"]) and greedy.shape[1] <= n + 12
    assert _answer(tok, greedy, n) == model.generate(data, tok, beam_size=1, max_new_tokens=12)["<ans>"]
    config = GenerationConfig(num_beams=3, max_new_tokens=40)
    beams = model.generate(**inputs, generation_config=config)
    assert model.generate(data, tok, beam_size=3, max_new_tokens=40)["<ans>"].startswith(
        _answer(tok, beams, n)
    )
    torch.manual_seed(1)
    sampled = model.generate(**inputs, do_sample=True, top_k=5, max_new_tokens=6)
    torch.manual_seed(1)
    assert torch.equal(sampled, model.generate(**inputs, do_sample=True, top_k=5, max_new_tokens=6))
    out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy[:, : out.sequences.shape[1]])


def test_generate_on_a_padded_batch_equals_one_by_one(model_and_tokenizer):
    model, tok = model_and_tokenizer
    texts = [TEXT, "北京", "the weather"]
    batch = tok(texts, padding=True, return_tensors="pt")
    together = model.generate(**batch, max_new_tokens=6)
    width = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        alone = model.generate(**tok(text, return_tensors="pt"), max_new_tokens=6)
        n = alone.shape[1] - 6 if alone.shape[1] > len(tok(text)["input_ids"]) else alone.shape[1]
        prompt = len(tok(text)["input_ids"])
        assert together[i, width:].tolist()[: alone.shape[1] - prompt] == alone[0, prompt:].tolist(), (i, n)


def test_generate_refuses_what_it_cannot_do(model_and_tokenizer):
    model, tok = model_and_tokenizer
    inputs = tok(TEXT, return_tensors="pt")
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        model.generate(**inputs, no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**inputs, num_return_sequences=2, num_beams=2)
    with pytest.raises(ValueError, match="plain-text prompt"):
        model.generate(torch.tensor([tok.encode(TEXT).ids]))
    with pytest.raises(ValueError, match="unsupported argument"):
        model.generate(**inputs, segment=inputs["input_ids"])
    with pytest.raises(TypeError, match="tokenizer"):
        model.generate({"input": TEXT, "<ans>": ""}, "not a tokenizer")


def test_model_card_calls_are_unchanged(model_and_tokenizer):
    model, tok = model_and_tokenizer
    data = [
        {"input": TEXT, "<ans>": ""},
        {"input": "北京", "question": "<mask_0>?", "<ans>": {"<mask_0>": ""}},
    ]
    expected = generate(model, tok, data, max_new_tokens=8)
    assert model.generate(data, tok, max_new_tokens=8) == expected
    assert model.generate(data=data, tokenizer=tok, max_new_tokens=8) == expected
    assert model.generate(data[0], tok, max_new_tokens=8) == expected[0]
    batch = tok(data, return_tensors="pt")
    assert batch.prompt_batch.answer_paths == [[()], [("<mask_0>",)]]
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    train = tok.prepare_for_finetune([{"input": TEXT, "<ans>": "是的"}], max_length=64)
    assert torch.isfinite(model(**train).loss)


def test_text_generation_pipeline(model_and_tokenizer):
    model, tok = model_and_tokenizer
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    out = generator(TEXT, max_new_tokens=8, do_sample=False)
    answer = model.generate({"input": TEXT, "<ans>": ""}, tok, beam_size=1, max_new_tokens=8)["<ans>"]
    assert out == [{"generated_text": TEXT + answer}]
    assert (
        generator(TEXT, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
        == answer
    )


def test_save_pretrained_files_load_with_the_auto_classes(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer_config.json",
    } <= names
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["CpmBeeForCausalLM"]
    auto_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    auto_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(auto_model, CpmBeeForCausalLM) and isinstance(auto_tok, CpmBeeTokenizer)
    inputs = auto_tok(TEXT, return_tensors="pt")
    assert torch.equal(
        auto_model.generate(**inputs, max_new_tokens=5), model.generate(**inputs, max_new_tokens=5)
    )


# ---------------------------------------------------------------------------------------------------- dtypes
def test_from_pretrained_computes_in_float32_without_cuda(monkeypatch):
    """The demo checkpoint is stored in float16; on a machine without CUDA the model must still be float32
    (a plain training loop in float16 on the CPU went 6.34, nan, nan)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = CpmBeeForCausalLM.from_pretrained(default_model_path())
    assert model.dtype == torch.float32
    tok = CpmBeeTokenizer.from_pretrained(default_model_path())
    batch = tok.prepare_for_finetune([{"input": TEXT, "<ans>": "是的"}, {"input": "北京", "<ans>": "中国"}])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]


def test_half_precision_on_the_cpu_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="float16 on the CPU") as caught:
        model = CpmBeeForCausalLM.from_pretrained(default_model_path(), dtype=torch.float16)
    assert model.dtype == torch.float16 and len([w for w in caught if "on the CPU" in str(w.message)]) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CpmBeeForCausalLM.from_pretrained(default_model_path()).dtype == torch.float16  # as stored


# ---------------------------------------------------------------------------------------------------- warnings
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_generation_training_and_peft_print_no_warnings(model_and_tokenizer):
    """transformers warns once per process (`warning_once`): the cache is cleared so that a warning caused
    here is seen even if an earlier test triggered it."""
    peft = pytest.importorskip("peft")
    from cpmbee.lora import add_lora

    model, tok = model_and_tokenizer
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]
    handler = _Records()
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data = {"input": TEXT, "<ans>": ""}
            model.generate(data, tok, max_new_tokens=4)
            model.generate(**tok(TEXT, return_tensors="pt"), max_new_tokens=4)
            out = model(**tok(data, return_tensors="pt"), use_cache=True)
            assert out.cache is not None
            batch = tok.prepare_for_finetune([{"input": TEXT, "<ans>": "是的"}])
            model(**batch).loss.backward()
            model.zero_grad()
            lora = add_lora(CpmBeeForCausalLM(model.config), 4, 8)  # PEFT reads is_gradient_checkpointing
            assert isinstance(lora, peft.PeftModel)
    finally:
        library.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == []


def test_cli_generate_eval_and_peft_import_print_nothing_on_stderr(tmp_path):
    """A fresh process, so import-time messages count too: `cpmbee generate` (the demo), `cpmbee eval` and importing PEFT
    for LoRA (bitsandbytes' optional-kernel notice) write nothing to stderr."""
    import subprocess
    import sys
    from pathlib import Path

    cpmbee = Path(sys.executable).with_name("cpmbee")
    data = json.dumps({"input": TEXT, "<ans>": ""}, ensure_ascii=False)
    res = subprocess.run(
        [str(cpmbee), "generate", "--max-new-tokens", "4", data], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0 and json.loads(res.stdout)["input"] == TEXT, res.stderr
    assert res.stderr == ""
    res = subprocess.run(
        [sys.executable, "-c", "from cpmbee.lora import _peft; _peft()"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    task = tmp_path / "task.jsonl"
    record = {"input": TEXT, "options": {"<option_0>": "是", "<option_1>": "否"}, "<ans>": "<option_0>"}
    task.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    res = subprocess.run(
        [str(cpmbee), "eval", "--task", str(task), "--by-generation", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and "task" in res.stdout and res.stderr == "", res.stderr
