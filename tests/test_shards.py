"""The indexed shard format, block cursors (resume, growth, masking, re-sharding) and the dataset tools."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
from click.testing import CliRunner

from cpmbee.__main__ import cli
from cpmbee.data.shards import BlockCursor, Dataset, ShardWriter, owns_block, read_index, redeal
from cpmbee.data.tools import (
    build_dataset,
    compact_dataset,
    iter_jsonl_records,
    mask_shards,
    merge_datasets,
    shuffle_dataset,
)


def make(path, n, start=0, block=8, name=None):
    with ShardWriter(path, name, block_records=block) as w:
        for i in range(start, start + n):
            w.write({"i": i, "text": f"record {i}"})
    return path


def test_write_read_random_access(tmp_path):
    ds_path = make(tmp_path / "ds", 50)
    make(ds_path, 7, start=50)
    ds = Dataset(ds_path)
    assert [s.name for s in ds.shards] == ["shard-00000", "shard-00001"]
    assert ds.num_records == 57 and ds.num_blocks == 7 + 1
    assert ds.get(1, 6) == {"i": 56, "text": "record 56"}
    assert [r["i"] for r in ds] == list(range(57))
    assert ds.locate(7) == (1, 0, 7)
    # files are sealed: no temporary files left behind
    assert sorted(p.name for p in ds_path.iterdir() if p.name.startswith(".writing")) == []


def test_failed_write_adds_nothing(tmp_path):
    make(tmp_path / "ds", 5)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "ds") as w:
        w.write({"x": 1})
        raise RuntimeError("boom")
    assert len(read_index(tmp_path / "ds")) == 1
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".writing")]
    with pytest.raises(ValueError, match="already exists"):
        make(tmp_path / "ds", 1, name="shard-00000")


def test_not_a_dataset(tmp_path):
    with pytest.raises(ValueError, match="not a cpmbee dataset"):
        Dataset(tmp_path)


def test_cursor_epoch_covers_owned_blocks_once(tmp_path):
    ds = Dataset(make(tmp_path / "ds", 100, block=8))  # 13 blocks
    seen = []
    for stream in range(3):
        cursor = BlockCursor(ds, stream, 3, seed=5)
        owned = sum(min(8, 100 - 8 * b) for b in range(13) if owns_block(b, 13, stream, 3))
        got = [cursor.next()["i"] for _ in range(owned)]
        assert cursor.epoch == 0 and len(set(got)) == owned
        seen += got
        cursor.next()
        assert cursor.epoch == 1
    assert sorted(seen) == list(range(100))
    ordered = BlockCursor(ds, 0, 1, shuffle=False)
    assert [ordered.next()["i"] for _ in range(100)] == list(range(100))


def test_cursor_resume_is_exact(tmp_path):
    ds = Dataset(make(tmp_path / "ds", 100, block=8))
    cursor = BlockCursor(ds, 1, 2, seed=3)
    for _ in range(130):  # into the second epoch
        cursor.next()
    state = json.loads(json.dumps(cursor.state_dict()))
    expected = [cursor.next()["i"] for _ in range(60)]
    again = BlockCursor(Dataset(tmp_path / "ds"), 1, 2, seed=3)
    again.load_state_dict(state)
    assert [again.next()["i"] for _ in range(60)] == expected


def test_growth_and_masking_while_reading(tmp_path):
    path = make(tmp_path / "ds", 16, block=8)
    cursor = BlockCursor(Dataset(path), 0, 1, seed=0)
    first = [cursor.next()["i"] for _ in range(8)]
    make(path, 8, start=100, name="late")  # appended while the cursor reads
    rest = [cursor.next()["i"] for _ in range(16)]
    assert sorted(first + rest) == [*range(16), *range(100, 108)]
    assert cursor.epoch == 0
    mask_shards(path, ["late"])
    nxt = [cursor.next()["i"] for _ in range(32)]
    assert all(i < 100 for i in nxt)
    with pytest.raises(ValueError, match="no shard named"):
        mask_shards(path, ["nope"])


def test_vanished_shard_is_skipped(tmp_path):
    path = make(tmp_path / "ds", 8, block=8)
    make(path, 8, start=50, name="gone")
    (path / "gone.rec").unlink()
    cursor = BlockCursor(Dataset(path), 0, 1)
    assert all(cursor.next()["i"] < 8 for _ in range(20))
    assert compact_dataset(path) == ["gone"]
    assert [s.name for s in read_index(path)] == ["shard-00000"]


def test_fewer_blocks_than_readers_still_reads():
    assert all(any(owns_block(b, 2, s, 5) for b in range(2)) for s in range(5))


def test_redeal_keeps_every_unread_record_once(tmp_path):
    ds = Dataset(make(tmp_path / "ds", 200, block=8))  # 25 blocks
    old = [BlockCursor(ds, s, 4, seed=1) for s in range(4)]
    read = []
    for n, c in zip((30, 3, 17, 0), old):
        read += [c.next()["i"] for _ in range(n)]
    states = [c.state_dict() if c._started else None for c in old]
    new = [BlockCursor(ds, s, 3, seed=1) for s in range(3)]
    for c, st in zip(new, redeal(states, ds.num_blocks, 3)):
        c.load_state_dict(st)
    rest = []
    for c in new:
        while True:
            before = c.epoch
            value = c.next()["i"]
            if c.epoch != before:
                break
            rest.append(value)
    assert sorted(read + rest) == list(range(200))


def _read_blocks(path, stream, streams, out):
    cursor = BlockCursor(Dataset(path), stream, streams, seed=9)
    ds = cursor.dataset
    owned = sum(
        ds.locate(b)[2] for b in range(ds.num_blocks) if owns_block(b, ds.num_blocks, stream, streams)
    )
    out.put([cursor.next()["i"] for _ in range(owned)])


def test_parallel_readers_in_processes(tmp_path):
    path = make(tmp_path / "ds", 300, block=16)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_blocks, args=(path, s, 3, queue)) for s in range(3)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(i for part in got for i in part) == list(range(300))


def test_jsonl_plain_text_and_dicts(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"input": "a", "<ans>": "b"}\nplain line\n\n["not", "a dict"]\n{broken\n', encoding="utf-8"
    )
    assert list(iter_jsonl_records([src])) == [
        {"input": "a", "<ans>": "b"},
        {"text": "plain line"},
        {"text": '["not", "a dict"]'},
        {"text": "{broken"},
    ]
    shards = build_dataset([src], tmp_path / "ds", shard_records=3, name="part")
    assert [(s.name, s.records) for s in shards] == [("part-00000", 3), ("part-00001", 1)]


def test_shuffle_merge_tools(tmp_path):
    a = make(tmp_path / "a", 120, block=8)
    shuffle_dataset(a, tmp_path / "s", seed=1, bucket_bytes=500, shard_records=50)
    shuffled = [r["i"] for r in Dataset(tmp_path / "s")]
    assert sorted(shuffled) == list(range(120)) and shuffled != list(range(120))
    assert [s.records for s in read_index(tmp_path / "s")] == [50, 50, 20]
    merge_datasets(tmp_path / "m", [a, a])
    assert [s.name for s in read_index(tmp_path / "m")] == ["shard-00000", "shard-00000-1"]
    assert Dataset(tmp_path / "m").num_records == 240
    mask_shards(tmp_path / "m", ["shard-00000-1"])
    assert compact_dataset(tmp_path / "m", delete_masked=True) == ["shard-00000-1"]
    assert not (tmp_path / "m" / "shard-00000-1.rec").exists()


def test_cli_build_and_info(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\nthree\n", encoding="utf-8")
    runner = CliRunner()
    res = runner.invoke(cli, ["build-dataset", str(src), "-o", str(tmp_path / "ds"), "--block-records", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["dataset", "info", str(tmp_path / "ds")])
    assert res.exit_code == 0 and json.loads(res.output)["records"] == 3
    res = runner.invoke(cli, ["dataset", "mask", str(tmp_path / "ds"), "missing"])
    assert res.exit_code != 0 and "no shard named" in res.output
