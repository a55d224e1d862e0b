"""Structured prompt encoding, generation batching and the training packer against the golden files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cpmbee.data import BatchPacker, InstanceBuilder, apply_transform, validate_template
from cpmbee.data.finetune import prepare_for_finetune
from cpmbee.prompt import (
    ExtState,
    collate_prompts,
    encode_prompt,
    encode_sample,
    fill_answers,
    segment_relations,
)

from .conftest import golden_model_names, load_golden

# golden field name -> our attribute name
PROCESS_LIST_FIELDS = {
    "input": "input_ids",
    "input_sub": "input_id_sub",
    "input_pos": "position",
    "sample_idx": "sample_ids",
    "batch_ext_table_ids": "ext_table_ids",
    "batch_ext_table_sub": "ext_table_sub",
}
PACKER_FIELDS = {
    "inputs": "input_ids",
    "inputs_sub": "input_id_sub",
    "segment_ids": "segment",
    "spans": "span",
    "target": "labels",
    "ext_ids": "ext_table_ids",
    "ext_sub": "ext_table_sub",
}


def _state(states):
    if states is None:
        return None
    return ExtState(
        {int(i): s for i, s in states["ext_table"]},
        {fam: {int(i): sub for i, sub in members} for fam, members in states["token_id_table"]},
    )


def _state_json(state: ExtState):
    return {
        "ext_table": [[i, s] for i, s in state.ext_table.items()],
        "token_id_table": [[f, [[i, s] for i, s in m.items()]] for f, m in state.token_id_table.items()],
    }


def test_encode_sample_matches_golden(tokenizer):
    cases = load_golden("convert_data_to_id.json")["cases"]
    assert len(cases) >= 10
    for case in cases:
        rng = np.random.RandomState(case["np_seed"]) if case["np_seed"] is not None else None
        kwargs = dict(
            max_depth=case["max_depth"],
            shuffle_answer=case["shuffle_answer"],
            rng=rng,
            ext_state=_state(case["prev_ext_states"]),
        )
        if case["error"] is not None:
            with pytest.raises(ValueError, match=r"data"):  # always names the field
                encode_sample(tokenizer, case["data"], **kwargs)
            continue
        prev = copy.deepcopy(kwargs["ext_state"])
        enc = encode_sample(tokenizer, case["data"], **kwargs)
        expected = case["result"]
        assert enc.ids.tolist() == expected["ids"], case["name"]
        assert enc.subs.tolist() == expected["id_subs"], case["name"]
        assert enc.context.tolist() == expected["context"], case["name"]
        assert enc.segments.tolist() == expected["segs"], case["name"]
        assert enc.segment_rel.tolist() == expected["segment_rel"], case["name"]
        assert enc.num_segments == expected["num_segments"], case["name"]
        assert enc.ids.dtype == np.int32 and enc.context.dtype == np.int8
        assert _state_json(enc.ext_state) == expected["ext_states"], case["name"]
        if prev is not None:  # the original mutates its argument; we return the new state instead
            assert kwargs["ext_state"] == prev
            assert (
                _state_json(enc.ext_state)["token_id_table"]
                == case["prev_ext_states_after_call"]["token_id_table"]
            )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"a": {"b": 5}}, r"data\['a'\]\['b'\]: expected a string"),
        ({"input": "x", "<ans>": None}, r"data\['<ans>'\]: expected"),
        ({"input": "see <foo_1>", "<ans>": ""}, r"data\['input'\]: invalid token '<foo_1>'"),
        ({"input": {"deep": "unterminated <x"}}, r"data\['input'\]\['deep'\]: Unexpected end"),
        ({"bad<key": "v"}, r"key 'bad<key' of data"),
        ([1, 2], r"data: expected a string or a dict"),
    ],
)
def test_bad_input_names_the_field(tiny_tokenizer, data, field):
    with pytest.raises(ValueError, match=field):
        encode_sample(tiny_tokenizer, data)


def test_generation_errors_are_value_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="no '<ans>' key"):
        encode_prompt(tiny_tokenizer, {"input": "x"})
    with pytest.raises(ValueError, match=r"data\['<ans>'\] is an empty dict"):
        encode_prompt(tiny_tokenizer, {"input": "x", "<ans>": {}})
    with pytest.raises(ValueError, match=r"data\['<ans>'\]\['a'\] is an empty dict"):
        encode_prompt(tiny_tokenizer, {"input": "x", "<ans>": {"a": {}, "b": ""}})


def test_segment_relations_small_tree():
    # root(0) -> a(1) -> b(2); root -> c(3)
    rel = segment_relations([-1, 0, 1, 0], [0, 1, 2, 1], max_depth=8).reshape(4, 4)
    assert rel[0, 0] == 0 and rel[1, 2] == 0 * 8 + 1 + 1 and rel[2, 1] == 1 * 8 + 0 + 1
    assert rel[2, 3] == 2 * 8 + 1 + 1  # LCA root: up 2, down 1
    capped = segment_relations([-1, 0, 1, 2], [0, 1, 2, 3], max_depth=2).reshape(4, 4)
    assert capped[3, 0] == 1 * 2 + 0 + 1  # depth difference 3 capped at max_depth - 1 = 1


def _process_list_cases():
    cases = []
    for model in golden_model_names():
        for c in load_golden(f"generation_{model}.json")["cases"]:
            cases.append((c["name"], c["input"], c.get("process_list"), c.get("error")))
        golden = load_golden(f"model_{model}.json")
        for c in golden["forward"] + golden["incremental"]:
            if "process_list" in c:
                cases.append((c["name"], c["data"], c["process_list"], None))
    return cases


def test_generation_batches_match_golden_process_list(tokenizer):
    cases = _process_list_cases()
    assert len(cases) >= 10
    for name, data, expected, error in cases:
        if error is not None:
            with pytest.raises(ValueError, match="<ans>"):
                collate_prompts(tokenizer, [encode_prompt(tokenizer, d) for d in data])
            continue
        before = copy.deepcopy(data)
        batch = collate_prompts(tokenizer, [encode_prompt(tokenizer, d) for d in data])
        assert data == before, "inputs must not be mutated"
        for key, value in expected["tensors"].items():
            ours = np.asarray(getattr(batch, PROCESS_LIST_FIELDS.get(key, key)))
            assert ours.astype(np.int64).tolist() == value["value"], (name, key)
        for b, info in enumerate(expected["other_info"]):
            assert [list(p) for p in batch.predict_segments[b]] == info["predict_segments"], name
            assert [list(p) for p in batch.answer_paths[b]] == info["answer_placeholders"], name
            assert [[k, v] for k, v in batch.ext_tables[b].items()] == info["ext_table"], name
        tensors = batch.model_inputs()
        assert tensors["input_ids"].dtype == torch.int32 and tensors["context"].dtype == torch.bool


def test_packer_matches_golden(tokenizer):
    for scenario in load_golden("packer.json")["scenarios"]:
        items, reads = scenario["items"], [0]

        def read(items=items, reads=reads):
            reads[0] += 1
            return copy.deepcopy(items[(reads[0] - 1) % len(items)])

        builder = InstanceBuilder(
            tokenizer,
            scenario["max_length"],
            scenario["max_depth"],
            rng=np.random.RandomState(scenario["np_seed"]),
        )
        packer = BatchPacker(
            scenario["batch_size"],
            scenario["max_length"],
            vocab_size=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        )
        expected_batches = [(r["batch"], r["dataset_reads_so_far"]) for r in scenario["add_data_results"]]
        if scenario["final_forced_batch"] is not None:
            expected_batches.append((scenario["final_forced_batch"], None))
        for expected, reads_so_far in expected_batches:
            if reads_so_far is None:
                batch = packer.pack(force=True)
            else:
                batch = packer.add(
                    builder.build(read, scenario["transforms"], scenario["incontext_weight"]),
                    scenario["task_name"],
                )
                assert reads[0] == reads_so_far, scenario["name"]
            assert (batch is None) == (expected is None), scenario["name"]
            if batch is None:
                continue
            for key, value in expected.items():
                ours = getattr(batch, PACKER_FIELDS.get(key, key))
                if key in ("task_names", "raw_data"):
                    assert ours == value, (scenario["name"], key)
                else:
                    assert list(ours.shape) == value["shape"], (scenario["name"], key)
                    assert np.asarray(ours).tolist() == value["value"], (scenario["name"], key)


def test_transforms():
    record = {"text": "t", "fields": {"k1": "v1", "k2": {"x": "y"}}, "answer": "a"}
    out = apply_transform(record, {"input": "$text", "*": "$fields.*", "<ans>": "$answer", "prompt": "p"})
    assert out == {"input": "t", "k1": "v1", "k2": {"x": "y"}, "<ans>": "a", "prompt": "p"}
    assert list(out) == ["input", "k1", "k2", "<ans>", "prompt"]
    assert apply_transform(record, {"a": {"b": "$text"}}) == {"a": {"b": "t"}}
    with pytest.raises(ValueError, match="no key 'missing'"):
        apply_transform(record, {"x": "$missing"})
    with pytest.raises(ValueError, match="'\\*'"):
        validate_template({"x.*": "$fields"})
    with pytest.raises(ValueError, match="constant"):
        apply_transform(record, {"*": "constant"})


def test_fill_answers_and_in_context_prompt(tiny_tokenizer):
    data = {"input": "今天", "<ans>": {"a": "", "b": {"c": ""}}}
    prompt = encode_prompt(tiny_tokenizer, data, samples=[{"input": "天气", "<ans>": "不错"}])
    assert prompt.answer_paths == [("a",), ("b", "c")]
    assert set(prompt.sample_ids.tolist()) == {0, 1}
    assert prompt.segment_rel_offset[-1] == prompt.num_segments[0] ** 2  # second table follows the first
    filled = fill_answers(data, prompt.answer_paths, {1: "x"})
    assert filled == {"input": "今天", "<ans>": {"a": "x", "b": {"c": None}}} and data["<ans>"]["a"] == ""


def test_prepare_for_finetune_labels(tiny_tokenizer):
    batch = prepare_for_finetune(
        tiny_tokenizer, [{"input": "今天", "<ans>": "天气"}, {"input": "a", "<ans>": "bc"}]
    )
    labels, ids = batch["labels"], batch["input_ids"]
    assert labels.shape == ids.shape and ids.shape[1] == int(batch["length"].max())  # padded to the longest
    row = ids[0, : int(batch["length"][0])].tolist()
    ans_start = len(row) - 2  # <s> 天气  (answers have no </s>; 天气 is one token)
    assert row[ans_start:] == [tiny_tokenizer.bos_id, tiny_tokenizer.encoder["天气"]]
    assert labels[0, ans_start : ans_start + 2].tolist() == [
        tiny_tokenizer.encoder["天气"],
        tiny_tokenizer.eos_id,
    ]
    assert (labels[0, :ans_start] == -100).all()
    with pytest.raises(ValueError, match=r"sample 0: .* more than max_length=4"):
        prepare_for_finetune(
            tiny_tokenizer, {"input": "今天", "<ans>": "天气"}, max_length=4, truncation=False
        )
    with pytest.raises(ValueError, match=r"sample 0: .* alone exceed max_length=4"):
        prepare_for_finetune(tiny_tokenizer, {"input": "今天", "<ans>": "天气"}, max_length=4)


def test_instance_builder_gives_up_on_records_that_never_fit(tiny_tokenizer):
    builder = InstanceBuilder(tiny_tokenizer, max_length=8, max_consecutive_skips=20)
    with pytest.raises(ValueError, match="20 records in a row are longer than max_length=8"):
        builder.build(lambda: {"input": "abcdefghij", "<ans>": "x"})
    assert builder.skipped_too_long == 20
