"""Mixture configs: validation, sampling rules, hot reload, function transforms, too-long records, exact
resume of streams and pipelines (also with workers), re-sharding."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from cpmbee.data.mixture import MixedStream, load_mixture_config, mixture_summary
from cpmbee.data.pipeline import DataPipeline, gather_state
from cpmbee.data.shards import ShardWriter

LM = """
def transform(data, num_incontext, rng):
    text = data["text"]
    cut = rng.randint(1, len(text) - 1)
    return {"input": text[:cut], "<ans>": text[cut:]}
"""


def write_dataset(path, records, block=4):
    with ShardWriter(path, block_records=block) as w:
        for r in records:
            w.write(r)


@pytest.fixture
def mix(tmp_path):
    rng = np.random.RandomState(0)
    words = ["the", "a", "is", "in", "on", "abc", "xyz", "hello", "world"]
    write_dataset(tmp_path / "text", [{"text": " ".join(rng.choice(words, 6))} for _ in range(60)])
    write_dataset(
        tmp_path / "qa",
        [{"q": f"q {i}", "a": f"answer {i}", "extra": {"k1": "x", "k2": "y"}} for i in range(20)],
    )
    (tmp_path / "lm.py").write_text(LM, encoding="utf-8")
    config = [
        {
            "dataset_name": "text",
            "task_name": "lm",
            "path": "text",
            "transforms": "lm.py",
            "incontext_weight": [0.5, 0.5],
        },
        {
            "dataset_name": "qa",
            "task_name": "qa",
            "path": "qa",
            "weight": 2.0,
            "transforms": [
                {"input": "$q", "*": "$extra.*", "<ans>": "$a"},
                {"question": "$q", "<ans>": "$a"},
            ],
        },
    ]
    (tmp_path / "mix.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path / "mix.json"


def stream(path, tok, **kw):
    kw = {"max_length": 64, "batch_size": 2, **kw}
    return MixedStream(path, tok, **kw)


def test_validation_names_the_field(tmp_path, mix):
    base = json.loads(mix.read_text())
    cases = [
        ({**base[0], "weight": -1}, "datasets.0.weight"),
        ({**base[0], "wieght": 1}, "datasets.0.wieght"),
        ({**base[0], "incontext_weight": []}, "datasets.0.incontext_weight"),
        ({**base[0], "path": "nowhere"}, "datasets.0.path"),
        ({**base[0], "transforms": "missing.py"}, "datasets.0.transforms"),
        ({**base[0], "transforms": [{"*": "constant"}]}, "datasets.0.transforms"),
    ]
    for entry, field in cases:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([entry]))
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            load_mixture_config(bad)
    bad.write_text(json.dumps([base[0], base[0]]))
    with pytest.raises(ValueError, match="duplicate"):
        load_mixture_config(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_mixture_config(bad)


def test_sampling_rules(tmp_path, mix, tiny_tokenizer):
    summary = mixture_summary(mix)  # records: 60 × 1.0 vs 20 × 2.0
    assert summary["shares"] == pytest.approx({"lm.text": 0.6, "qa.qa": 0.4})
    data = {"sampling": "share", "datasets": json.loads(mix.read_text())}
    (tmp_path / "share.yaml").write_text(json.dumps(data))  # JSON is YAML
    assert mixture_summary(tmp_path / "share.yaml")["shares"] == pytest.approx(
        {"lm.text": 1 / 3, "qa.qa": 2 / 3}
    )
    s = stream(tmp_path / "share.yaml", tiny_tokenizer, batch_size=8)
    counts = {"lm": 0, "qa": 0}
    for _ in range(15):
        for raw in s.next_batch().batch.raw_data:
            counts[raw["dataset"].split(".")[0]] += 1
    share = counts["qa"] / sum(counts.values())
    assert 0.55 < share < 0.78, counts


def test_batches_have_targets_and_tasks(mix, tiny_tokenizer):
    out = stream(mix, tiny_tokenizer).next_batch()
    b = out.batch
    assert b.input_ids.shape == (2, 64)
    assert (b.labels != -100).any()
    assert set(b.task_names) <= {"lm", "qa"}
    assert out.events[0]["type"] == "mixture"
    # the in-context samples of the lm dataset are listed in the raw data
    assert all("dataset" in r and "input" in r for r in b.raw_data)


def test_stream_resume_is_exact(mix, tiny_tokenizer):
    s = stream(mix, tiny_tokenizer, seed=4)
    for _ in range(5):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))
    expected = [s.next_batch().batch for _ in range(6)]
    again = stream(mix, tiny_tokenizer, seed=4)
    again.load_state_dict(state)
    for want in expected:
        got = again.next_batch().batch
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.labels, want.labels)
        assert got.raw_data == want.raw_data


def test_too_long_records_are_counted(tmp_path, tiny_tokenizer):
    write_dataset(
        tmp_path / "d", [{"input": "a" * (200 if i % 3 == 0 else 5), "<ans>": "b"} for i in range(30)]
    )
    (tmp_path / "m.json").write_text(json.dumps([{"dataset_name": "d", "task_name": "t", "path": "d"}]))
    s = stream(tmp_path / "m.json", tiny_tokenizer)
    for _ in range(5):
        out = s.next_batch()
    assert out.counters["skipped_too_long"]["t.d"] > 0
    write_dataset(tmp_path / "all_long", [{"input": "a" * 200, "<ans>": "b"}] * 3)
    (tmp_path / "m2.json").write_text(
        json.dumps([{"dataset_name": "d", "task_name": "t", "path": "all_long"}])
    )
    import cpmbee.data.mixture as mixture

    old, mixture.MAX_CONSECUTIVE_SKIPS = mixture.MAX_CONSECUTIVE_SKIPS, 50
    try:
        with pytest.raises(ValueError, match="longer than max_length"):
            stream(tmp_path / "m2.json", tiny_tokenizer).next_batch()
    finally:
        mixture.MAX_CONSECUTIVE_SKIPS = old


def _touch_later(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_hot_reload(mix, tiny_tokenizer):
    s = stream(mix, tiny_tokenizer)
    s.next_batch()
    config = json.loads(mix.read_text())
    config[1]["weight"] = 0.0
    config[0]["transforms"] = [{"input": "", "<ans>": "$text"}]  # a list transform replaces the file
    mix.write_text(json.dumps(config))
    _touch_later(mix)
    out = s.next_batch()
    kinds = [e["type"] for e in out.events]
    assert "mixture" in kinds and "event" in kinds
    assert s.mixture()["shares"] == {"lm.text": 1.0, "qa.qa": 0.0}
    for _ in range(3):
        for raw in s.next_batch().batch.raw_data:
            assert raw["dataset"] == "lm.text" and raw["input"]["input"] == ""
    mix.write_text("[{broken")
    _touch_later(mix)
    out = s.next_batch()
    assert any(e["type"] == "incident" and "not reloaded" in e["message"] for e in out.events)
    s.next_batch()  # keeps training on the previous config


def test_transform_file_reloads(tmp_path, mix, tiny_tokenizer):
    s = stream(mix, tiny_tokenizer)
    config = json.loads(mix.read_text())
    config[1]["weight"] = 0.0
    mix.write_text(json.dumps(config))
    s.next_batch()
    (tmp_path / "lm.py").write_text(
        "def transform(data, num_incontext, rng):\n    return {'input': 'fixed', '<ans>': data['text']}\n"
    )
    _touch_later(tmp_path / "lm.py")
    time.sleep(0.01)
    s.next_batch()
    batch = s.next_batch().batch
    assert all(r["input"]["input"] == "fixed" for r in batch.raw_data)


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_resume_is_exact(mix, tiny_tokenizer, workers):
    kw = dict(max_length=64, batch_size=2, num_workers=workers, seed=3)
    p = DataPipeline(mix, tiny_tokenizer, **kw)
    for _ in range(5):
        next(p)
    state = json.loads(json.dumps(gather_state([p.state_dict()], 1, p.per_rank)))
    expected = [next(p).batch.input_ids for _ in range(5)]
    p.close()
    again = DataPipeline(mix, tiny_tokenizer, state=state, **kw)
    for want in expected:
        np.testing.assert_array_equal(next(again).batch.input_ids, want)
    again.close()


def test_pipeline_reshards_to_another_world_size(mix, tiny_tokenizer):
    kw = dict(max_length=64, batch_size=2, seed=3)
    ranks = [DataPipeline(mix, tiny_tokenizer, rank=r, world_size=2, **kw) for r in range(2)]
    for p in ranks:
        for _ in range(3):
            next(p)
    state = gather_state([p.state_dict() for p in ranks], 2, 1)
    single = DataPipeline(mix, tiny_tokenizer, state=state, resume_step=3, **kw)
    assert single.resharded
    counters = next(single).counters
    before = sum(sum(p._states[0]["sources"][k]["consumed"] for k in ("lm.text", "qa.qa")) for p in ranks)
    assert sum(counters["consumed"].values()) > before


def test_hot_reload_reaches_worker_processes(mix, tiny_tokenizer):
    p = DataPipeline(mix, tiny_tokenizer, max_length=64, batch_size=2, num_workers=1, seed=1)
    next(p)
    config = json.loads(mix.read_text())
    config[0]["weight"] = 0.0
    mix.write_text(json.dumps(config))
    _touch_later(mix)
    events, datasets = [], []
    for _ in range(8):  # the worker has a few batches made ahead before it sees the edit
        out = next(p)
        events += out.events
        datasets.append({r["dataset"] for r in out.batch.raw_data})
    p.close()
    assert any(e["type"] == "mixture" and e["shares"] == {"lm.text": 0.0, "qa.qa": 1.0} for e in events)
    assert datasets[-1] == {"qa.qa"}


def test_dataset_growth_and_masking_reach_a_running_stream(tmp_path, mix, tiny_tokenizer):
    from cpmbee.data.tools import mask_shards

    s = stream(mix, tiny_tokenizer, batch_size=4)
    s.next_batch()
    with ShardWriter(tmp_path / "qa", "late", block_records=4) as w:  # appended while the stream reads
        for i in range(40):
            w.write({"q": f"late {i}", "a": "new", "extra": {}})
    records = []
    for _ in range(30):
        out = s.next_batch()
        records += [r["input"] for r in out.batch.raw_data if r["dataset"] == "qa.qa"]
    assert s.mixture()["records"]["qa.qa"] == 60  # "records" sampling: the grown dataset weighs more
    assert any(str(r.get("input", r.get("question", ""))).startswith("late") for r in records)
    mask_shards(tmp_path / "qa", ["late"])
    s.next_batch()
    assert s.mixture()["records"]["qa.qa"] == 20
    for _ in range(6):  # blocks already started finish; then only unmasked shards are read
        s.next_batch()
    later = [r["input"] for _ in range(10) for r in s.next_batch().batch.raw_data if r["dataset"] == "qa.qa"]
    assert later and not any(str(r.get("input", r.get("question", ""))).startswith("late") for r in later)
