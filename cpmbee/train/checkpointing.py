"""Atomic, resumable training checkpoints.

Layout under the manager's directory::

    step-00001000/          one complete checkpoint
        model.safetensors   model weights (plus config.json and vocab.txt when given: loadable as a model dir)
        optimizer.pt        optimizer.state_dict()   (read back with torch.load(weights_only=True))
        scheduler.pt        scheduler.state_dict()
        rng.safetensors     torch CPU/CUDA generator states
        state.json          step, caller's state (data positions, counters), numpy/python RNG states
    latest                  the name of the newest complete checkpoint

A checkpoint is written into ``step-XXXXXXXX.partial-<pid>``, its files fsync'ed, then renamed into place,
and only then is ``latest`` replaced (``os.replace``). A crash or ``kill -9`` at any moment leaves either the
previous checkpoint or the new one as ``latest``, never a torn one; leftover ``.partial`` directories are
removed by the next save. Only one process (the main rank) should write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..rng import capture_rng, restore_rng, rng_from_json, rng_to_json

__all__ = ["CheckpointManager", "capture_rng", "restore_rng", "rng_from_json", "rng_to_json"]

_LATEST = "latest"
_PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


class CheckpointManager:
    """Save, find and restore checkpoints in one directory.

    Args:
        directory: where ``step-*`` directories live.
        keep_last: keep this many newest checkpoints (None: all).
        keep_every: additionally never delete checkpoints whose step is a multiple of this.
    """

    def __init__(
        self, directory: str | os.PathLike, keep_last: int | None = 3, keep_every: int | None = None
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None), got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every = keep_every

    @staticmethod
    def name_for(step: int) -> str:
        return f"{_PREFIX}{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.iterdir():
            name = path.name
            if path.is_dir() and name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit():
                out.append((int(name[len(_PREFIX) :]), path))
        return sorted(out)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the ``latest`` pointer, else the highest step found)."""
        pointer = self.directory / _LATEST
        if pointer.is_file():
            candidate = self.directory / pointer.read_text(encoding="utf-8").strip()
            if candidate.is_dir() and (candidate / "state.json").is_file():
                return candidate
        found = [p for _, p in self.checkpoints() if (p / "state.json").is_file()]
        return found[-1] if found else None

    def save(
        self,
        step: int,
        *,
        model_state: Mapping[str, torch.Tensor] | None = None,
        config: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        state: Mapping[str, Any] | None = None,
        files: Mapping[str, str | os.PathLike] | None = None,
        include_rng: bool = True,
    ) -> Path:
        """Write checkpoint ``step`` atomically and make it ``latest``; returns its directory.

        Args:
            model_state: tensors to store as ``model.safetensors`` (e.g. ``accelerator.get_state_dict(model)``).
            config: a ``PreTrainedConfig`` written as ``config.json`` (with ``model_state``: a loadable model dir).
            optimizer / scheduler: their ``state_dict()`` is stored.
            state: JSON-able caller state (data positions, counters, ...), returned by ``load``.
            files: extra files to copy in, ``{name in checkpoint: source path}`` (e.g. ``vocab.txt``).
            include_rng: store the global torch/numpy/Python RNG states (restored by ``load``).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"{_PREFIX}*.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.directory / self.name_for(step)
        tmp = self.directory / f"{final.name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            if model_state is not None:
                from safetensors.torch import save_file

                tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
                save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if config is not None:
                config.to_json_file(str(tmp / "config.json"))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            meta: dict[str, Any] = {"step": int(step), "state": dict(state or {})}
            if include_rng:
                from safetensors.torch import save_file

                rng_tensors, rng_meta = capture_rng()
                save_file(rng_tensors, str(tmp / "rng.safetensors"))
                meta["rng"] = rng_meta
            for name, source in (files or {}).items():
                shutil.copyfile(source, tmp / name)
            (tmp / "state.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            _fsync_tree(tmp)
            if final.exists():  # re-saving the same step: replace it
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pointer_tmp = self.directory / f".{_LATEST}.{os.getpid()}"
        pointer_tmp.write_text(final.name, encoding="utf-8")
        os.replace(pointer_tmp, self.directory / _LATEST)
        _fsync_dir(self.directory)
        self._prune(final)
        return final

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        complete = self.checkpoints()
        removable = [(s, p) for s, p in complete[: -self.keep_last] if p != keep]
        for step, path in removable:
            if self.keep_every and step % self.keep_every == 0:
                continue
            shutil.rmtree(path, ignore_errors=True)

    def load(
        self,
        path: str | os.PathLike | None = None,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        restore_rng_state: bool = True,
        strict: bool = True,
    ) -> dict[str, Any]:
        """Restore what was saved into the given objects; returns ``{"step": ..., "state": ...}``.

        ``path`` defaults to ``latest()``. Tensors are read with safetensors / ``weights_only=True``.
        """
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if model is not None:
            from safetensors.torch import load_file

            weights = load_file(str(path / "model.safetensors"))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if strict and (missing or unexpected):
                raise ValueError(
                    f"{path}: checkpoint does not match the model; missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        if optimizer is not None:
            optimizer.load_state_dict(
                torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            )
        if scheduler is not None:
            scheduler.load_state_dict(
                torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
            )
        if restore_rng_state and "rng" in meta and (path / "rng.safetensors").is_file():
            from safetensors.torch import load_file

            restore_rng(load_file(str(path / "rng.safetensors")), meta["rng"])
        return {"step": meta["step"], "state": meta.get("state", {}), "path": str(path)}
