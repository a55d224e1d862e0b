"""The shared file-system and collective helpers (cpmbee.files, cpmbee.distributed)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from cpmbee.distributed import all_gather_objects, all_reduce, rank, world_size
from cpmbee.files import (
    atomic_directory,
    atomic_write,
    copy_file_atomic,
    find_vocab,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half of the new")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temporary left
    write_json_atomic(target, {"答案": 1})
    assert json.loads(target.read_text(encoding="utf-8")) == {"答案": 1}
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert copy_file_atomic(tmp_path / "b.bin", tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode"), atomic_write(target, "a"):
        pass


def test_atomic_write_keeps_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as out:
        (out / "a").write_text("1")
        assert not target.exists()
    assert (target / "a").read_text() == "1"
    with pytest.raises(KeyError), atomic_directory(target) as out:
        (out / "b").write_text("2")
        raise KeyError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_directory(target) as out:
        (out / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_find_vocab(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="--vocab"):
        find_vocab(model_dir)
    (model_dir / "vocab.txt").write_text("a\n")
    (model_dir / "w.pt").write_bytes(b"")
    assert find_vocab(model_dir) == model_dir / "vocab.txt"
    assert find_vocab(model_dir / "w.pt") == model_dir / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_vocab(model_dir, tmp_path / "other.txt")
    assert find_vocab(tmp_path / "missing", model_dir / "vocab.txt") == model_dir / "vocab.txt"


def test_collectives_in_one_process():
    assert world_size() == 1 and rank() == 0
    t = torch.tensor([1.0, 2.0])
    assert all_reduce(t) is t
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    with pytest.raises(ValueError, match="op"):
        all_reduce(t, "mean")  # type: ignore[arg-type]


def _worker(index: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=index, world_size=world)
    try:
        gathered = all_gather_objects({"rank": rank(), "n": world_size()})
        summed = all_reduce(torch.tensor([float(index + 1)]))
        biggest = all_reduce(torch.tensor([float(index * 10)]), "max")
        with open(os.path.join(out_dir, f"{index}.json"), "w") as f:
            json.dump({"gathered": gathered, "sum": summed.item(), "max": biggest.item()}, f)
    finally:
        dist.destroy_process_group()


def test_collectives_across_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for index in range(2):
        result = json.loads((tmp_path / f"{index}.json").read_text())
        assert result["gathered"] == [{"rank": 0, "n": 2}, {"rank": 1, "n": 2}]
        assert result["sum"] == 3.0 and result["max"] == 10.0
