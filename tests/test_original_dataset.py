"""The original CPM-Bee ``DistributedDataset`` format: direct reading (cursor, resume, growth, mixtures,
fine-tuning data), ``cpmbee dataset import-original``, and refusal of malicious, corrupt and inconsistent
inputs with one clear error."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from cpmbee.__main__ import cli
from cpmbee.data.original import META, OriginalDataset, OriginalWriter, decode_payload, read_meta
from cpmbee.data.shards import BlockCursor, Dataset, open_dataset, owns_block, read_index
from cpmbee.data.tools import dataset_info, import_original

from .conftest import GOLDEN, require_shared

SHARED_DATASET = GOLDEN / "original_dataset"


@pytest.fixture
def expected():
    require_shared()
    return json.loads((SHARED_DATASET / "EXPECTED.json").read_text(encoding="utf-8"))


@pytest.fixture
def original(tmp_path, expected):
    """A writable copy of the shared dataset (written by the original's own writer)."""
    path = tmp_path / "orig"
    shutil.copytree(SHARED_DATASET, path)
    for p in path.iterdir():
        p.chmod(0o644)
    return path


def all_records(expected):
    return [r for name in ("part_a", "part_b", "part_c") for r in expected["records"][name]]


def read_all(cursor, n):
    return [cursor.next() for _ in range(n)]


# ------------------------------------------------------------------------------------------- reading
def test_direct_reading_gives_every_record_in_order(expected):
    ds = OriginalDataset(SHARED_DATASET)
    assert [f.name for f in ds.files] == ["part_a", "part_b", "part_c"]
    assert ds.num_records == 240 and ds.num_blocks == 18
    assert list(ds) == all_records(expected)
    assert [ds.first_record_kind(k) for k in range(3)] == ["pickle", "pickle", "json"]
    # the block interface: block by block, in stored order, the same records
    by_blocks = [ds.block_record(b, i) for b in range(ds.num_blocks) for i in range(ds.block_length(b))]
    assert by_blocks == all_records(expected)
    assert isinstance(open_dataset(SHARED_DATASET), OriginalDataset)


def test_writer_reproduces_the_original_files_byte_for_byte(tmp_path, expected):
    """Our test writer follows the same format facts: same bytes as the original's own writer."""
    for name, info in expected["meta"]["files"].items():
        with OriginalWriter(tmp_path, name, block_size=4096, serializer=info["serializer"]) as w:
            for record in expected["records"][name]:
                w.write(record)
        assert (tmp_path / name).read_bytes() == (SHARED_DATASET / name).read_bytes(), name
    assert read_meta(tmp_path) == read_meta(SHARED_DATASET)


@pytest.mark.parametrize("streams", [1, 3, 5])
def test_cursors_deal_blocks_and_cover_each_record_once_per_epoch(expected, streams):
    ds = OriginalDataset(SHARED_DATASET)
    seen = []
    for stream in range(streams):
        cursor = BlockCursor(OriginalDataset(SHARED_DATASET), stream, streams, seed=4)
        owned = [b for b in range(ds.num_blocks) if owns_block(b, ds.num_blocks, stream, streams)]
        assert owned == [b for b in range(18) if b % streams == stream]  # the original's dealing
        records = read_all(cursor, sum(ds.block_length(b) for b in owned))
        assert cursor.epoch == 0
        seen += records
    key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
    assert sorted(map(key, seen)) == sorted(map(key, all_records(expected)))


def test_resume_in_the_middle_continues_exactly():
    require_shared()
    cursor = BlockCursor(OriginalDataset(SHARED_DATASET), 1, 2, seed=11)
    read_all(cursor, 37)  # mid-block
    state = json.loads(json.dumps(cursor.state_dict()))
    expected = read_all(cursor, 300)  # across an epoch boundary
    again = BlockCursor(OriginalDataset(SHARED_DATASET), 1, 2, seed=11)
    again.load_state_dict(state)
    assert read_all(again, 300) == expected


def test_unshuffled_cursor_reads_in_stored_order(expected):
    cursor = BlockCursor(OriginalDataset(SHARED_DATASET), shuffle=False)
    assert read_all(cursor, 240) == all_records(expected)


def test_live_growth_and_masking(original, expected):
    cursor = BlockCursor(OriginalDataset(original), 0, 1, seed=0)
    first = read_all(cursor, 100)
    time.sleep(0.01)  # a distinct meta.bin modification time
    with OriginalWriter(original, "late", block_size=4096, serializer="json") as w:
        for i in range(30):
            w.write({"text": f"late {i}"})
    rest = read_all(cursor, 240 + 30 - 100)
    assert cursor.epoch == 0  # the appended file joined the current epoch
    texts = [r.get("text", "") for r in first + rest]
    assert sorted(t for t in texts if t.startswith("late ")) == sorted(f"late {i}" for i in range(30))
    # mask the new file in meta.bin, as the original's mask_dataset does
    lines = (original / META).read_text().splitlines()
    entry = json.loads(lines[-1])
    entry["mask"] = True
    (original / META).write_text("\n".join([*lines[:-1], json.dumps(entry)]) + "\n")
    later = read_all(cursor, 300)
    assert not any(str(r.get("text", "")).startswith("late ") for r in later)
    assert OriginalDataset(original).num_records == 240


# ------------------------------------------------------------------------------------------- import
def test_import_gives_identical_records_and_appends(tmp_path, expected):
    out = tmp_path / "imported"
    summary = import_original(SHARED_DATASET, out)
    assert [(s["file"], s["shard"], s["records"], s["serializers"]) for s in summary] == [
        ("part_a", "part_a", 80, {"pickle": 80}),
        ("part_b", "part_b", 80, {"pickle": 80}),
        ("part_c", "part_c", 80, {"json": 80}),
    ]
    assert list(Dataset(out)) == all_records(expected)
    with pytest.raises(ValueError, match="pass --append"):
        import_original(SHARED_DATASET, out)
    import_original(SHARED_DATASET, out, append=True)
    assert [s.name for s in read_index(out)] == [
        "part_a",
        "part_b",
        "part_c",
        "part_a-1",
        "part_b-1",
        "part_c-1",
    ]
    assert list(Dataset(out)) == all_records(expected) * 2
    assert not [p for p in out.iterdir() if p.name.startswith(".import")]


def test_import_keeps_masks(original, tmp_path, expected):
    lines = (original / META).read_text().splitlines()
    entry = json.loads(lines[1])
    entry["mask"] = True
    (original / META).write_text("\n".join([lines[0], json.dumps(entry), lines[2]]) + "\n")
    import_original(original, tmp_path / "out")
    assert [s.mask for s in read_index(tmp_path / "out")] == [False, True, False]
    assert list(Dataset(tmp_path / "out")) == expected["records"]["part_a"] + expected["records"]["part_c"]


def test_cli_import_and_info(tmp_path, expected):
    runner = CliRunner()
    res = runner.invoke(cli, ["dataset", "info", str(SHARED_DATASET)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["records"] == 240 and info["blocks"] == 18
    assert [(f["name"], f["records"], f["serializer"]) for f in info["files"]] == [
        ("part_a", 80, "pickle"),
        ("part_b", 80, "pickle"),
        ("part_c", 80, "json"),
    ]
    out = tmp_path / "ds"
    res = runner.invoke(cli, ["dataset", "import-original", str(SHARED_DATASET), str(out)])
    assert res.exit_code == 0, res.output
    assert "part_c -> " in res.output and "80 records (80 json)" in res.output
    assert "+ 240 records in 3 shards" in res.output
    res = runner.invoke(cli, ["dataset", "import-original", str(SHARED_DATASET), str(out)])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "--append" in res.output
    res = runner.invoke(cli, ["dataset", "import-original", "--append", str(SHARED_DATASET), str(out)])
    assert res.exit_code == 0 and Dataset(out).num_records == 480


# ------------------------------------------------------------------------------- training data layer
LM = """
def transform(data, num_incontext, rng):
    if "text" in data:
        return {"input": data["text"][:8], "<ans>": data["text"][8:16]}
    return {"input": data["input"], "options": data["options"], "question": data["question"], "<ans>": data["<ans>"]}
"""


@pytest.fixture
def mixture(tmp_path):
    require_shared()
    (tmp_path / "lm.py").write_text(LM, encoding="utf-8")
    # the original's datasets.json form, pointing at an original-format directory
    entries = [
        {
            "dataset_name": "ccpm",
            "task_name": "mix",
            "weight": 1.0,
            "path": str(SHARED_DATASET),
            "transforms": "lm.py",
        }
    ]
    (tmp_path / "datasets.json").write_text(json.dumps(entries), encoding="utf-8")
    return tmp_path / "datasets.json"


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_and_pipeline_read_an_original_directory_and_resume_exactly(mixture, tokenizer, workers):
    from cpmbee.data.mixture import mixture_summary
    from cpmbee.data.pipeline import DataPipeline, gather_state

    assert mixture_summary(mixture)["records"] == {"mix.ccpm": 240}
    options = {"max_length": 256, "batch_size": 2, "seed": 3, "num_workers": workers}
    pipe = DataPipeline(mixture, tokenizer, **options)
    for _ in range(4):
        next(pipe)
    state = json.loads(json.dumps(gather_state([pipe.state_dict()], 1, pipe.per_rank)))
    expected = [next(pipe).batch.input_ids.tolist() for _ in range(6)]
    pipe.close()
    again = DataPipeline(mixture, tokenizer, state=state, **options)
    assert [next(again).batch.input_ids.tolist() for _ in range(6)] == expected
    again.close()


def _pretrain_config(tmp_path, vocab_file, run_dir, max_steps):
    rng = np.random.RandomState(0)
    words = ["the", "a", "is", "in", "on", "abc", "xyz", "hello", "world", "今天", "天气", "不错"]
    if not (tmp_path / "text").exists():
        for part, serializer in (("p0", "pickle"), ("p1", "json")):
            with OriginalWriter(tmp_path / "text", part, block_size=512, serializer=serializer) as w:
                for _ in range(120):
                    w.write({"text": " ".join(rng.choice(words, int(rng.randint(3, 12))))})
        entries = [{"dataset_name": "text", "task_name": "lm", "path": "text", "transforms": "lm.py"}]
        (tmp_path / "datasets.json").write_text(json.dumps(entries))
        (tmp_path / "lm.py").write_text(
            "def transform(data, num_incontext, rng):\n"
            "    t = data['text']\n    cut = rng.randint(1, len(t) - 1)\n"
            "    return {'input': t[:cut], '<ans>': t[cut:]}\n"
        )
    vocab_size = len(vocab_file.read_text(encoding="utf-8").splitlines())
    config = {
        "run_dir": run_dir,
        "seed": 7,
        "model": {
            "preset": "tiny",
            "vocab": str(vocab_file),
            "overrides": {"vocab_size": vocab_size, "position_bias_num_segment_buckets": 32},
        },
        "data": {"config": "datasets.json", "max_length": 48, "batch_size": 2, "num_workers": 0},
        "train": {"max_steps": max_steps, "lr": 0.01, "schedule": "constant"},
        "checkpoint": {"every": 3},
        "logging": {"console": False, "inspect_every": None},
    }
    path = tmp_path / f"{run_dir}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pretrain_on_an_original_dataset_resumes_exactly(tmp_path, tiny_vocab_file):
    from cpmbee.train.metrics import read_records
    from cpmbee.train.pretrain import run_pretrain
    from cpmbee.train.pretrain_config import load_pretrain_config

    def losses(run):
        return {
            r["step"]: r["loss"] for r in read_records(tmp_path / run / "metrics") if r["type"] == "train"
        }

    assert (
        run_pretrain(load_pretrain_config(_pretrain_config(tmp_path, tiny_vocab_file, "ref", 6)))["step"] == 6
    )
    assert (
        run_pretrain(load_pretrain_config(_pretrain_config(tmp_path, tiny_vocab_file, "cut", 3)))["step"] == 3
    )
    assert (
        run_pretrain(load_pretrain_config(_pretrain_config(tmp_path, tiny_vocab_file, "cut", 6)))["step"] == 6
    )
    reference, resumed = losses("ref"), losses("cut")
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == reference  # steps 4-6 continue from the checkpoint's read position exactly


def test_finetune_data_errors_name_the_record(expected):
    from cpmbee.data.finetune import read_jsonl

    with pytest.raises(ValueError, match=r"original_dataset/part_a: record 1: no '<ans>' key"):
        read_jsonl(SHARED_DATASET)  # its text records are not fine-tuning samples


def test_finetune_reads_original_and_shard_directories(tmp_path, expected):
    from cpmbee.data.finetune import read_jsonl

    samples = [r for r in all_records(expected) if "<ans>" in r]
    with OriginalWriter(tmp_path / "orig", "train", block_size=4096) as w:
        for s in samples:
            w.write(s)
    assert read_jsonl(tmp_path / "orig") == samples
    import_original(tmp_path / "orig", tmp_path / "shards")
    assert read_jsonl(tmp_path / "shards") == samples


# ------------------------------------------------------------------------------------------- safety
class _Exploit:
    """Pickles to a call of ``func(*args)`` — what a malicious dataset file would contain."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_payloads(marker: Path) -> dict[str, bytes]:
    payloads = {
        f"os.system p{protocol}": pickle.dumps(_Exploit(os.system, f"touch {marker}"), protocol=protocol)
        for protocol in (0, 2, 4, 5)
    }
    payloads["open for writing"] = pickle.dumps({"text": _Exploit(open, str(marker), "w")})
    payloads["eval"] = pickle.dumps([_Exploit(eval, f"open({str(marker)!r}, 'w')")])
    return payloads


def _write_dataset(path: Path, payloads: list[bytes], *, block_size: int = 4096) -> Path:
    with OriginalWriter(path, "data", block_size=block_size) as w:
        for payload in payloads:
            w.write_payload(payload)
    return path


@pytest.mark.parametrize("kind", list(_malicious_payloads(Path("x"))))
def test_malicious_pickles_execute_nothing(tmp_path, kind):
    marker = tmp_path / "pwned"
    good = pickle.dumps({"text": "fine"})
    path = _write_dataset(tmp_path / "evil", [good, good, _malicious_payloads(marker)[kind]])
    ds = OriginalDataset(path)
    assert ds.block_record(0, 0) == {"text": "fine"}
    with pytest.raises(
        ValueError,
        match=r"evil/data: block 0 \(bytes 0-4095\), record 3 of the block: refused pickle: it would import (posix\.system|builtins\.(open|eval)|io\.open)",
    ):
        ds.block_record(0, 2)
    with pytest.raises(ValueError, match=r"record 3 of the block \(record 3 of the file\): refused pickle"):
        import_original(path, tmp_path / "out")
    res = CliRunner().invoke(cli, ["dataset", "import-original", str(path), str(tmp_path / "out2")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("Error: ")
    assert "Traceback" not in res.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or Dataset(tmp_path / "out").num_records == 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps({"a": {1, 2}}), r"holds a set at \['a'\]; only plain data"),
        (pickle.dumps(frozenset()), "holds a frozenset"),
        (pickle.dumps({"a": bytearray(b"x")}, protocol=5), "holds a bytearray"),
        (pickle.dumps({"a": b"raw"}), r"holds bytes at \['a'\]"),
        (pickle.dumps({1: "x"}), "has a int key 1"),
        (pickle.dumps(3 + 4j), "would import builtins.complex"),
        (
            b"\x80\x04N" + b"r" + struct.pack("<I", 2**32 - 1) + b".",
            "memo index 4294967295 is out of sequence",
        ),
        (b"\x80\x04\x95\x10\x00\x00", "not a valid pickle"),  # truncated
        (b"\xff\xfe garbage", r"neither JSON \(not UTF-8"),
        (b'{"text": "unterminated', r"neither JSON \(Unterminated string"),
        (b"P0\n.", "refused pickle: it refers to an external"),  # a protocol-0 persistent id
    ],
)
def test_non_plain_records_are_refused(payload, message):
    with pytest.raises(ValueError, match=message):
        decode_payload(payload)


def test_every_protocol_of_plain_data_decodes_as_pickle_loads_would():
    shared = ["shared", 1]
    records = [
        {"text": "今天天气不错" * 300, "n": [1, -2, 2**70, 1.5, True, None], "e": {}, "s": ""},
        ["a", ("b", "c"), [shared, shared], {"k": "v" * 70000}],
        "a plain string",
        {f"key {i}": {"nested": [i, str(i)]} for i in range(300)},  # > 256 memo entries: LONG_BINPUT
    ]
    for record in records:
        expected = json.loads(json.dumps(record))  # tuples as lists, as JSON has them
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            assert decode_payload(pickle.dumps(record, protocol=protocol)) == (expected, "pickle"), protocol


def test_recursive_and_exploding_pickles_are_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="recursive or heavily shared"):
        decode_payload(pickle.dumps(loop))
    node: list = ["x"]
    for _ in range(40):  # 2**40 leaves when expanded, a few hundred bytes pickled
        node = [node, node]
    with pytest.raises(ValueError, match="recursive or heavily shared"):
        decode_payload(pickle.dumps(node))
    assert decode_payload(pickle.dumps({"t": (1, "a")})) == ({"t": [1, "a"]}, "pickle")
    assert decode_payload(pickle.dumps({"t": "x"}, protocol=0)) == ({"t": "x"}, "pickle")


# ----------------------------------------------------------------------------------- corrupt inputs
def _corrupt(original: Path, name: str, offset: int, data: bytes) -> None:
    path = original / name
    content = bytearray(path.read_bytes())
    content[offset : offset + len(data)] = data
    path.write_bytes(bytes(content))


def _set_meta(original: Path, index: int, **fields) -> None:
    lines = (original / META).read_text().splitlines()
    entry = json.loads(lines[index])
    entry.update(fields)
    lines[index] = json.dumps(entry)
    (original / META).write_text("\n".join(lines) + "\n")


CORRUPTIONS = {
    "bad marker": (
        lambda o: _corrupt(o, "part_b", 4096 + 0, b"\x41"),
        r"part_b: block 7 \(bytes 4096-8191\), record 1 of the block at byte 4096: found 0x41",
    ),
    "length past block end": (
        lambda o: _corrupt(o, "part_a", 1, struct.pack("<I", 5000)),
        r"part_a: block 0 \(bytes 0-4095\), record 1 of the block at byte 0: a record of 5000 bytes runs past the end",
    ),
    "damaged payload": (
        lambda o: _corrupt(o, "part_c", 5 + 2, b"\xff\xff"),
        r"part_c: block 12 \(bytes 0-4095\), record 1 of the block.*neither JSON",
    ),
    "garbage after end marker": (
        lambda o: _corrupt(o, "part_a", 4095, b"\x07"),
        r"part_a: block 0 \(bytes 0-4095\): non-zero bytes after the end-of-block marker",
    ),
    "truncated file": (
        lambda o: (o / "part_b").write_bytes((o / "part_b").read_bytes()[:10000]),
        r"part_b: 10000 bytes, truncated: meta.bin says 6 blocks of 4096 bytes \(24576 bytes\)",
    ),
    "empty file": (lambda o: (o / "part_c").write_bytes(b""), r"part_c: empty file; meta.bin says 6 blocks"),
    "missing file": (lambda o: (o / "part_a").unlink(), r"part_a: listed in meta.bin but missing"),
    "empty meta.bin": (lambda o: (o / META).write_text(""), r"meta.bin lists no data files"),
    "overlapping blocks": (
        lambda o: _set_meta(o, 1, block_begin=5),
        r"meta.bin:2: part_b starts at block 5, expected 6",
    ),
    "wrong block size": (
        lambda o: _set_meta(o, 0, block_size=8192),
        r"part_a: 24576 bytes, truncated: meta.bin says 6 blocks of 8192 bytes",
    ),
    "record count": (
        lambda o: _set_meta(o, 2, nlines=81),
        r"part_c: holds 80 records \(20670 bytes\), meta.bin says 81 records \(20670 bytes\)",
    ),
    "path in file_name": (
        lambda o: _set_meta(o, 0, file_name="../part_a"),
        r"meta.bin:1: file_name must be the name of a file",
    ),
    "not json": (lambda o: (o / META).write_text("{nope\n"), r"meta.bin:1: not a JSON object"),
    "bad field": (lambda o: _set_meta(o, 1, nlines="many"), r"meta.bin:2: nlines must be an integer >= 0"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_inputs_give_one_clear_error(original, tmp_path, case):
    damage, message = CORRUPTIONS[case]
    damage(original)
    with pytest.raises(ValueError, match=message):
        import_original(original, tmp_path / "out")
    assert not (tmp_path / "out" / "index.jsonl").exists() or Dataset(tmp_path / "out").num_records == 0
    res = CliRunner().invoke(cli, ["dataset", "import-original", str(original), str(tmp_path / "cli")])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    assert "Traceback" not in res.output


def test_corruption_found_while_training_names_the_block(original):
    _corrupt(original, "part_a", 4096 * 2, b"\x42")
    ds = OriginalDataset(original)
    cursor = BlockCursor(ds, shuffle=False)
    read_all(cursor, 14 + 15)  # blocks 0 and 1
    with pytest.raises(ValueError, match=r"part_a: block 2 \(bytes 8192-12287\), record 1 of the block"):
        cursor.next()


def test_info_and_mixture_errors_are_clear(original, tmp_path):
    (original / "part_b").write_bytes(b"")
    with pytest.raises(ValueError, match="part_b: empty file"):
        dataset_info(original)
    (tmp_path / "mix.json").write_text(
        json.dumps([{"dataset_name": "a", "task_name": "t", "path": str(original)}])
    )
    from cpmbee.data.mixture import load_mixture_config

    with pytest.raises(ValueError, match=r"mix.json: datasets.0.path: .*part_b: empty file"):
        load_mixture_config(tmp_path / "mix.json")
    with pytest.raises(ValueError, match="not a dataset"):
        open_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"original CPM-Bee format.*import-original"):
        read_index(original)


def test_the_docs_commands_run_as_written(tmp_path, monkeypatch, expected):
    """The commands of docs/datasets.md's "Coming from the original", in a fresh directory."""
    import re
    import shlex

    text = (Path(__file__).resolve().parent.parent / "docs" / "datasets.md").read_text(encoding="utf-8")
    section = text.split("## Coming from the original", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert len(commands) == 3
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for argv in commands:
        assert argv[0] == "cpmbee"
        args = [a.replace("../shared", str(GOLDEN.parent)) for a in argv[1:]]
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, (argv, res.output)
    assert list(Dataset(tmp_path / "data" / "ccpm-orig")) == all_records(expected) * 2
