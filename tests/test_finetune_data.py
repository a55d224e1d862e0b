"""Fine-tuning batches: truncation policy, padding, input forms, the DataLoader collator, CCPM conversion."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from cpmbee import CpmBeeForCausalLM
from cpmbee.data.ccpm import QUESTION, ccpm_to_bee, convert_ccpm_file
from cpmbee.data.finetune import (
    FinetuneCollator,
    choice_candidates,
    fit_to_length,
    normalize_samples,
    prepare_for_finetune,
    read_jsonl,
    scan_samples,
)
from cpmbee.data.tools import iter_jsonl_records
from cpmbee.prompt import encode_sample

from .conftest import SHARED, random_weights_, require_shared, tiny_config

SAMPLES = [
    {"input": "今天天气不错", "prompt": "a", "<ans>": "好"},
    {"input": "the input is an", "question": "is", "<ans>": "the"},
    {"input": "中国", "<ans>": {"a": "北京", "b": "a"}},
]


def _answer_labels(batch, row):
    labels = batch["labels"][row]
    return labels[labels != -100].tolist()


def _model(tokenizer):
    model = CpmBeeForCausalLM(tiny_config(tokenizer.vocab_size)).eval()
    return random_weights_(model)


def test_dict_list_and_dict_of_lists_give_the_same_batch(tiny_tokenizer):
    as_list = prepare_for_finetune(tiny_tokenizer, SAMPLES[:2])
    as_columns = prepare_for_finetune(
        tiny_tokenizer,
        {"input": [s["input"] for s in SAMPLES[:2]], "prompt": ["a", None], "question": [None, "is"],
         "<ans>": [s["<ans>"] for s in SAMPLES[:2]]},
    )  # fmt: skip
    assert as_list.keys() == as_columns.keys()
    for key in as_list:
        assert torch.equal(as_list[key], as_columns[key]), key
    single = prepare_for_finetune(tiny_tokenizer, SAMPLES[0])
    assert torch.equal(single["input_ids"][0], as_list["input_ids"][0, : single["input_ids"].shape[1]])
    assert normalize_samples({"input": "x", "extra": None, "<ans>": "y"}) == [{"input": "x", "<ans>": "y"}]
    with pytest.raises(ValueError, match="one length"):
        normalize_samples({"input": ["a", "b"], "<ans>": ["c"]})


def test_padding_is_dynamic_and_rounds_to_a_multiple(tiny_tokenizer):
    batch = prepare_for_finetune(tiny_tokenizer, SAMPLES, max_length=512)
    longest = int(batch["length"].max())
    assert batch["input_ids"].shape[1] == longest < 512  # not padded to max_length
    padded = prepare_for_finetune(tiny_tokenizer, SAMPLES, max_length=512, pad_to_multiple_of=16)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["input_ids"].shape[1] >= longest
    assert (padded["labels"][:, longest:] == -100).all()
    model = _model(tiny_tokenizer)
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, model(**padded).loss, atol=1e-5)


def test_truncation_trims_context_never_the_answer(tiny_tokenizer):
    long_text = "the " * 30 + "今天"
    sample = {"input": long_text, "question": "is", "<ans>": "天气不错"}
    full = len(encode_sample(tiny_tokenizer, sample))
    short, removed = fit_to_length(tiny_tokenizer, sample, full - 7)
    assert removed == 7 and len(encode_sample(tiny_tokenizer, short)) == full - 7
    assert long_text.startswith(short["input"]) and short["question"] == "is" and short["<ans>"] == "天气不错"
    assert sample["input"] == long_text  # the caller's dict is untouched

    batch = prepare_for_finetune(tiny_tokenizer, [sample], max_length=full - 7)
    reference = prepare_for_finetune(tiny_tokenizer, [sample], max_length=full)
    assert int(batch["length"][0]) == full - 7
    assert _answer_labels(batch, 0) == _answer_labels(reference, 0)  # the answer is intact


def test_truncation_cuts_the_longest_leaves_first(tiny_tokenizer):
    sample = {"a": "今" * 20, "b": "天" * 10, "c": "is", "<ans>": "the"}  # 20, 10 and 1 tokens
    full = len(encode_sample(tiny_tokenizer, sample))
    short, _ = fit_to_length(tiny_tokenizer, sample, full - 12)
    counts = {k: len(tiny_tokenizer.pieces(short[k])) for k in "abc"}
    assert counts == {"a": 9, "b": 9, "c": 1}  # water filling: both long leaves down to 9, the short one kept


def test_truncation_keeps_escapes_and_special_tokens_valid(tiny_tokenizer):
    text = "<<a<mask_0>" * 12
    sample = {"input": text, "<ans>": "b"}
    full = len(encode_sample(tiny_tokenizer, sample))
    for cut in range(1, 12):
        short, _ = fit_to_length(tiny_tokenizer, sample, full - cut)
        assert text.startswith(short["input"])
        assert len(encode_sample(tiny_tokenizer, short)) == full - cut


def test_over_long_answers_are_a_clear_error(tiny_tokenizer):
    sample = {"input": "a", "<ans>": "the " * 20}
    with pytest.raises(ValueError, match=r"sample 1: .*alone exceed max_length=16"):
        prepare_for_finetune(tiny_tokenizer, [{"input": "a", "<ans>": "b"}, sample], max_length=16)
    with pytest.raises(
        ValueError, match=r"sample 0: \d+ tokens, more than max_length=16 \(truncation is off\)"
    ):
        prepare_for_finetune(tiny_tokenizer, [sample], max_length=16, truncation=False)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        prepare_for_finetune(tiny_tokenizer, [sample], pad_to_multiple_of=0)


def test_collator_works_with_a_plain_dataloader(tiny_tokenizer):
    collator = FinetuneCollator(tiny_tokenizer, max_length=24)
    data = SAMPLES * 3 + [{"input": "the " * 30, "<ans>": "a"}]
    loader = DataLoader(data, batch_size=4, shuffle=False, collate_fn=collator)
    model = _model(tiny_tokenizer)
    seen = 0
    for i, batch in enumerate(loader):
        expected = prepare_for_finetune(tiny_tokenizer, data[4 * i : 4 * i + 4], max_length=24)
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
        with torch.no_grad():
            assert torch.isfinite(model(**batch).loss)
        seen += batch["input_ids"].shape[0]
    too_long = sum(len(encode_sample(tiny_tokenizer, d)) > 24 for d in data)
    assert seen == len(data) and collator.truncated == too_long >= 1


def test_tokenizer_method_as_in_the_model_card(tiny_tokenizer):
    batch = tiny_tokenizer.prepare_for_finetune(SAMPLES, max_length=512)
    model = _model(tiny_tokenizer)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.cpmbee.input_embedding.weight.grad is not None


def test_shuffle_answer_is_seeded(tiny_tokenizer):
    sample = {"input": "a", "<ans>": {"x": "the", "y": "an", "z": "is", "w": "in"}}
    first = FinetuneCollator(tiny_tokenizer, shuffle_answer=True, seed=3).encode([sample] * 6)
    again = FinetuneCollator(tiny_tokenizer, shuffle_answer=True, seed=3).encode([sample] * 6)
    assert (first.input_ids == again.input_ids).all()
    assert len({tuple(row) for row in first.input_ids.tolist()}) > 1  # rows differ in answer order


def test_read_jsonl_names_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "<ans>": "b"}\n\n{"input": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.jsonl:3: no '<ans>' key"):
        read_jsonl(path)
    path.write_text('{"input": "a", "<ans>": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"input": "a", "<ans>": "b"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"input": "a", "<ans>": "b"}]


def test_samples_with_nothing_to_learn_are_refused(tmp_path, tiny_tokenizer):
    """`<ans>: {}` (or a dict of empty dicts) has no answer slot, so 0 labelled tokens: not a sample."""
    path = tmp_path / "d.jsonl"
    for empty in ({}, {"a": {}, "b": {"c": {}}}):
        path.write_text(
            json.dumps({"input": "a", "<ans>": "b"})
            + "\n\n"
            + json.dumps({"input": "a", "<ans>": empty})
            + "\n",
            encoding="utf-8",
        )
        with pytest.raises(ValueError, match=r"d.jsonl:3: '<ans>' holds no answer text"):
            read_jsonl(path)
        with pytest.raises(ValueError, match=r"sample 1: no answer tokens to learn"):
            prepare_for_finetune(
                tiny_tokenizer, [{"input": "a", "<ans>": "b"}, {"input": "a", "<ans>": empty}]
            )
        with pytest.raises(ValueError, match=r"train: sample 1: no answer tokens to learn"):
            scan_samples(tiny_tokenizer, [{"input": "a", "<ans>": empty}], 64, "train")
    batch = prepare_for_finetune(tiny_tokenizer, {"input": "a", "<ans>": ""}, return_tensors=None)
    assert (batch.labels != -100).sum() == 1  # an empty answer still teaches where the answer ends


def test_non_utf8_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"input": "a", "<ans>": "b"}\n{"input": "caf\xe9", "<ans>": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 15\)"):
        read_jsonl(path)
    build = tmp_path / "build.txt"
    build.write_bytes(b"fine\nbad \xff line\n")
    with pytest.raises(ValueError, match=r"build.txt:2: not valid UTF-8 \(byte 0xff at column 5\)"):
        list(iter_jsonl_records([build]))


def test_choice_candidates():
    sample = {"options": {"<option_0>": "x", "<option_1>": "y"}, "<ans>": "<option_1>"}
    assert choice_candidates(sample) == ["<option_0>", "<option_1>"]
    assert choice_candidates({**sample, "<ans>": "y"}) == ["x", "y"]
    assert choice_candidates({**sample, "<ans>": "z"}) is None
    assert choice_candidates({"input": "a", "<ans>": "b"}) is None


def test_ccpm_conversion_forms_and_errors():
    record = {"target": "2", "input": "[翻译]看<[3]见。[0]甲[1]乙[2]丙[3]丁[答案]"}
    assert ccpm_to_bee(record) == {
        "input": "看<<[3]见。",  # "[3]" before "[0]" is text; "<" is escaped
        "options": {"<option_0>": "甲", "<option_1>": "乙", "<option_2>": "丙", "<option_3>": "丁"},
        "question": QUESTION,
        "<ans>": "<option_2>",
    }
    cuge = {"translation": "看见。", "choices": ["甲", "乙"], "answer": 1}
    assert ccpm_to_bee(cuge)["<ans>"] == "<option_1>" and len(ccpm_to_bee(cuge)["options"]) == 2
    with pytest.raises(ValueError, match="option number"):
        ccpm_to_bee({**record, "target": "x"})
    with pytest.raises(ValueError, match="not one of the 4 options"):
        ccpm_to_bee({**record, "target": "4"})
    with pytest.raises(ValueError, match=r"\[翻译\]"):
        ccpm_to_bee({**record, "input": "no markers"})


def test_ccpm_conversion_matches_the_tutorial_data(tmp_path, tokenizer):
    require_shared()
    out = tmp_path / "eval.jsonl"
    count = convert_ccpm_file(SHARED / "data/ccpm/raw_eval.jsonl", out)
    assert count == 2720
    assert out.read_bytes() == (SHARED / "data/ccpm/bee_eval.jsonl").read_bytes()
    samples = read_jsonl(out)
    batch = prepare_for_finetune(tokenizer, samples[:8], max_length=512)
    for row in range(8):  # the answer is one ext token (<option_k>) then </s>
        labels = _answer_labels(batch, row)
        assert len(labels) == 2 and labels[0] >= tokenizer.vocab_size and labels[1] == tokenizer.eos_id
    # A real sample squeezed: the paraphrase loses its tail, options and answer survive.
    full = len(encode_sample(tokenizer, samples[0]))
    short, _ = fit_to_length(tokenizer, samples[0], full - 3)
    assert short["options"] == samples[0]["options"] and samples[0]["input"].startswith(short["input"])
    json.dumps(short, ensure_ascii=False)  # still plain JSON data


def test_the_docs_example_runs(vocab_file):
    """The first Python example of docs/finetune.md, as written (it reads ../shared/cpm-bee/vocab.txt)."""
    from .conftest import REPO_ROOT

    text = (REPO_ROOT / "docs" / "finetune.md").read_text(encoding="utf-8")
    start = text.index("```python\nimport torch") + len("```python\n")
    code = text[start : text.index("```", start)]
    code = code.replace("../shared/cpm-bee/vocab.txt", str(vocab_file))
    exec(compile(code, "docs/finetune.md", "exec"), {})


def test_global_batch_order_covers_each_epoch():
    from cpmbee.data.finetune import GlobalBatchOrder

    order = GlobalBatchOrder(10, 4, seed=7, shuffle=True)
    assert order.per_epoch == 3
    epoch0 = [i for m in range(3) for i in order.global_indices(m)]
    assert sorted(set(epoch0)) == list(range(10)) and len(epoch0) == 12  # last batch filled from the start
    assert epoch0[10:] == epoch0[:2]
    epoch1 = [i for m in range(3, 6) for i in order.global_indices(m)]
    assert sorted(set(epoch1)) == list(range(10)) and epoch1 != epoch0  # reshuffled
    assert GlobalBatchOrder(10, 4, seed=7, shuffle=True).global_indices(4) == order.global_indices(4)
    assert GlobalBatchOrder(10, 4, seed=0, shuffle=False).global_indices(1) == [4, 5, 6, 7]


def test_batches_need_no_training_stack(tiny_vocab_file):
    """The core's prepare_for_finetune pulls in neither cpmbee.train nor peft."""
    import subprocess
    import sys

    code = (
        "import sys, cpmbee\n"
        f"tok = cpmbee.CpmBeeTokenizer({str(tiny_vocab_file)!r})\n"
        "tok.prepare_for_finetune({'input': 'a', '<ans>': 'b'})\n"
        "bad = [m for m in sys.modules if m.startswith(('cpmbee.train', 'peft'))]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
