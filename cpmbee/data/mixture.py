"""Mixed pre-training data: a ``datasets.json``-style config, hot reload, sampling, packing, exact resume.

The config (JSON or YAML; format in ``docs/pretrain.md``) is a list of datasets, as the original's
``datasets.json``, or ``{"sampling": ..., "datasets": [...]}``. Each entry has ``dataset_name``,
``task_name`` (its identity is ``"task_name.dataset_name"``), ``path`` (a ``cpmbee build-dataset``
directory or an original CPM-Bee dataset directory with ``meta.bin``, relative to the config file), ``weight``, ``transforms`` (a list of mapping templates, one drawn
per instance, or a Python file defining ``transform(data, num_incontext, rng)``) and ``incontext_weight``.

Sampling (``"sampling"``):

* ``"records"`` (default, the original's rule): each draw picks dataset *i* with probability
  ``weight_i × records_i / Σ_j weight_j × records_j`` — ``weight`` multiplies a dataset's size.
* ``"share"``: probability ``weight_i / Σ_j weight_j`` — ``weight`` is the mixture share itself.

A ``MixedStream`` is one reader of the mixture: it owns a share of every dataset's blocks (``stream`` of
``num_streams`` = rank × workers), builds instances with ``InstanceBuilder`` and packs them with
``BatchPacker``. It re-reads the config whenever the file changes (a bad edit is reported and ignored),
reloads a changed transform file, and picks up shards appended to a dataset. ``state_dict()`` holds
everything the next batches depend on (read positions, RNG states, the packer's open rows), as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..prompt import DEFAULT_MAX_DEPTH, TrainingBatch, TrainingSample
from ..rng import rng_from_json, rng_to_json
from ..tokenizer import CpmBeeTokenizerBase
from .packing import BatchPacker, InstanceBuilder, _Row
from .shards import BlockCursor, BlockSource, _seed, open_dataset, redeal
from .transforms import validate_template

__all__ = [
    "DatasetEntry",
    "MixedStream",
    "MixtureConfig",
    "load_mixture_config",
    "mixture_summary",
    "pydantic_message",
]

MAX_CONSECUTIVE_SKIPS = 10_000


class DatasetEntry(BaseModel):
    """One dataset of the mixture."""

    model_config = ConfigDict(extra="forbid")

    dataset_name: str = Field(min_length=1)
    task_name: str = Field(min_length=1)
    path: str
    weight: float = Field(default=1.0, ge=0)
    transforms: list[dict[str, Any]] | str = Field(default_factory=list)
    incontext_weight: list[float] = Field(default_factory=lambda: [1.0])
    shuffle: bool = True

    @field_validator("incontext_weight")
    @classmethod
    def _weights(cls, v: list[float]) -> list[float]:
        if not v or any(w < 0 for w in v) or sum(v) <= 0:
            raise ValueError("must be non-negative weights with a positive sum, e.g. [0.8, 0.2]")
        return v

    @field_validator("transforms")
    @classmethod
    def _templates(cls, v: list[dict[str, Any]] | str) -> list[dict[str, Any]] | str:
        if isinstance(v, list):
            for i, template in enumerate(v):
                try:
                    validate_template(template)
                except ValueError as err:
                    raise ValueError(f"template {i}: {err}") from err
        return v

    @property
    def identity(self) -> str:
        return f"{self.task_name}.{self.dataset_name}"


class MixtureConfig(BaseModel):
    """The whole mixture; ``base_dir`` resolves relative paths (the config file's directory)."""

    model_config = ConfigDict(extra="forbid")

    sampling: Literal["records", "share"] = "records"
    datasets: list[DatasetEntry] = Field(min_length=1)
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def pydantic_message(err: ValidationError, source: str) -> str:
    """``ValidationError`` as one line per problem, each naming the field path."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{source}: {where}: {e['msg']}")
    return "\n".join(lines)


def _read_structured(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def load_mixture_config(path: str | os.PathLike, *, check_paths: bool = True) -> MixtureConfig:
    """Read and validate a mixture config; ``ValueError`` names the file and the bad field."""
    path = Path(path)
    try:
        data = _read_structured(path)
    except FileNotFoundError as err:
        raise ValueError(f"data config {path} not found") from err
    except Exception as err:  # JSON/YAML syntax
        raise ValueError(f"{path}: cannot parse: {err}") from err
    if isinstance(data, list):
        data = {"datasets": data}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a list of datasets or a mapping with 'datasets'")
    data = {**data, "base_dir": str(path.resolve().parent)}
    try:
        config = MixtureConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(pydantic_message(err, str(path))) from None
    seen: set[str] = set()
    for i, entry in enumerate(config.datasets):
        if entry.identity in seen:
            raise ValueError(f"{path}: datasets.{i}: duplicate task_name.dataset_name {entry.identity!r}")
        seen.add(entry.identity)
        if check_paths:
            try:
                open_dataset(config.resolve(entry.path))
            except ValueError as err:
                raise ValueError(f"{path}: datasets.{i}.path: {err}") from None
            if isinstance(entry.transforms, str) and not config.resolve(entry.transforms).is_file():
                raise ValueError(
                    f"{path}: datasets.{i}.transforms: no transform file {config.resolve(entry.transforms)}"
                )
    return config


def _mixture(
    config: MixtureConfig, records: dict[str, int], weights: dict[str, float], source: str
) -> dict[str, Any]:
    if config.sampling == "records":
        mass = {k: weights[k] * records[k] for k in records}
    else:
        mass = {k: weights[k] if records[k] else 0.0 for k in records}
    total = sum(mass.values())
    if total <= 0:
        raise ValueError(f"{source}: every dataset has weight 0 or no records")
    shares = {k: v / total for k, v in mass.items()}
    return {"sampling": config.sampling, "shares": shares, "records": records, "weights": weights}


def mixture_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The sampling shares a mixture config gives right now (``{"sampling", "shares", "records", "weights"}``)."""
    config = load_mixture_config(path)
    records = {e.identity: open_dataset(config.resolve(e.path)).num_records for e in config.datasets}
    weights = {e.identity: e.weight for e in config.datasets}
    return _mixture(config, records, weights, str(path))


@dataclass
class _TransformFile:
    """A Python transform file, re-imported when its modification time changes."""

    path: Path
    func: Callable[[Any, int, random.Random], Any] | None = None
    stamp: int = -1

    def get(self) -> Callable[[Any, int, random.Random], Any]:
        stamp = self.path.stat().st_mtime_ns
        if self.func is None or stamp != self.stamp:
            name = f"cpmbee_transform_{abs(hash(str(self.path))):x}_{stamp}"
            spec = importlib.util.spec_from_file_location(name, self.path)
            if spec is None or spec.loader is None:
                raise ValueError(f"cannot import transform file {self.path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            func = getattr(module, "transform", None)
            if not callable(func):
                raise ValueError(f"{self.path}: defines no function transform(data, num_incontext, rng)")
            sys.modules.pop(name, None)
            self.func, self.stamp = func, stamp
        return self.func


@dataclass
class _Source:
    entry: DatasetEntry
    dataset: BlockSource
    cursor: BlockCursor
    transform_file: _TransformFile | None = None
    skipped_too_long: int = 0
    consumed: int = 0

    def transforms(self) -> Any:
        if self.transform_file is not None:
            return self.transform_file.get()
        return self.entry.transforms


def _sample_to_json(s: TrainingSample) -> dict[str, Any]:
    return {
        k: getattr(s, k).tolist()
        for k in (
            "ids",
            "subs",
            "context",
            "segments",
            "sample_ids",
            "num_segments",
            "segment_rel_offset",
            "segment_rel",
        )
    } | {"raw": s.raw}


def _sample_from_json(d: Mapping[str, Any]) -> TrainingSample:
    types = {"context": np.int8}
    arrays = {k: np.asarray(v, dtype=types.get(k, np.int32)) for k, v in d.items() if k != "raw"}
    return TrainingSample(**arrays, raw=d.get("raw"))


@dataclass
class StreamOutput:
    """What a stream hands the trainer with each batch."""

    batch: TrainingBatch
    events: list[dict[str, Any]] = field(default_factory=list)  # mixture changes, config errors
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # skipped_too_long / epochs / consumed


class MixedStream:
    """One reader of a mixture (see the module docstring).

    Args:
        config_path: the mixture config file (re-read when it changes).
        tokenizer: a ``CpmBeeTokenizer``.
        max_length / batch_size: rows of the batches (``batch_size`` rows of ``max_length`` tokens).
        stream / num_streams: which share of the data this reader owns (rank × workers + worker).
        seed: base seed; all randomness derives from it and ``stream``.
    """

    def __init__(
        self,
        config_path: str | os.PathLike,
        tokenizer: CpmBeeTokenizerBase,
        *,
        max_length: int,
        batch_size: int,
        stream: int = 0,
        num_streams: int = 1,
        seed: int = 0,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self.config_path = Path(config_path)
        self.tokenizer = tokenizer
        self.stream, self.num_streams, self.seed = stream, num_streams, seed
        self.builder = InstanceBuilder(
            tokenizer,
            max_length,
            max_depth,
            rng=np.random.RandomState(_seed(seed, stream, 1)),
            py_rng=random.Random(_seed(seed, stream, 2)),
            max_consecutive_skips=MAX_CONSECUTIVE_SKIPS,
        )
        self.packer = BatchPacker(
            batch_size,
            max_length,
            vocab_size=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        )
        self.rng = np.random.RandomState(_seed(seed, stream, 3))
        self.sources: dict[str, _Source] = {}
        self.config: MixtureConfig | None = None
        self._stamp: tuple[int, int] | None = None
        self._events: list[dict[str, Any]] = []
        self._last_shares: dict[str, float] | None = None
        self._reload(initial=True)

    # ------------------------------------------------------------------------------ config reload
    def _config_stamp(self) -> tuple[int, int]:
        st = self.config_path.stat()
        return st.st_mtime_ns, st.st_size

    def _reload(self, initial: bool = False) -> None:
        try:
            stamp = self._config_stamp()
        except FileNotFoundError:
            if initial:
                raise ValueError(f"data config {self.config_path} not found") from None
            return
        if stamp == self._stamp:
            return
        try:
            config = load_mixture_config(self.config_path)
        except ValueError as err:
            if initial:
                raise
            self._stamp = stamp  # report a bad edit once, keep training on the previous config
            self._events.append(
                {"type": "incident", "kind": "data_config", "message": f"config not reloaded: {err}"}
            )
            return
        self._stamp = stamp
        sources: dict[str, _Source] = {}
        for entry in config.datasets:
            old = self.sources.get(entry.identity)
            path = config.resolve(entry.path)
            transform_file = (
                _TransformFile(config.resolve(entry.transforms))
                if isinstance(entry.transforms, str)
                else None
            )
            if old is not None and old.dataset.directory == path:
                old.entry = entry
                old.cursor.shuffle = entry.shuffle
                if (
                    transform_file is None
                    or old.transform_file is None
                    or old.transform_file.path != transform_file.path
                ):
                    old.transform_file = transform_file
                sources[entry.identity] = old
                continue
            dataset = open_dataset(path)
            cursor = BlockCursor(
                dataset,
                self.stream,
                self.num_streams,
                seed=_seed(self.seed, _name_hash(entry.identity)),
                shuffle=entry.shuffle,
            )
            sources[entry.identity] = _Source(entry, dataset, cursor, transform_file)
        self.sources, self.config = sources, config
        if not initial:
            self._events.append(
                {"type": "event", "event": "data_config", "message": f"reloaded {self.config_path}"}
            )

    # ------------------------------------------------------------------------------- sampling
    def mixture(self) -> dict[str, Any]:
        """``{"sampling", "shares", "records", "weights"}`` keyed by dataset identity (a ``mixture`` record)."""
        assert self.config is not None
        records = {k: s.dataset.num_records for k, s in self.sources.items()}
        weights = {k: s.entry.weight for k, s in self.sources.items()}
        return _mixture(self.config, records, weights, str(self.config_path))

    def _note_mixture(self) -> list[float]:
        mix = self.mixture()
        shares = mix["shares"]
        if shares != self._last_shares:
            self._last_shares = shares
            self._events.append({"type": "mixture", **mix})
        return list(shares.values())

    def _instance(self, source: _Source) -> TrainingSample:
        start = self.builder.skipped_too_long

        def read() -> Any:
            source.consumed += 1
            return source.cursor.next()

        try:
            instance = self.builder.build(read, source.transforms(), source.entry.incontext_weight)
        except ValueError as err:
            raise ValueError(f"dataset {source.entry.identity}: {err}") from None
        source.skipped_too_long += self.builder.skipped_too_long - start
        instance.raw = {"dataset": source.entry.identity, **(instance.raw or {})}
        return instance

    def next_batch(self) -> StreamOutput:
        """Read, build and pack until a batch is full."""
        self._reload()
        for source in self.sources.values():  # appended or masked shards change the record counts
            source.dataset.refresh()
        batch = None
        while batch is None:
            shares = self._note_mixture()
            names = list(self.sources)
            source = self.sources[names[int(self.rng.choice(len(names), p=shares))]]
            batch = self.packer.add(self._instance(source), source.entry.task_name)
        events, self._events = self._events, []
        return StreamOutput(batch, events, self.counters())

    def counters(self) -> dict[str, dict[str, int]]:
        return {
            "skipped_too_long": {k: s.skipped_too_long for k, s in self.sources.items()},
            "epochs": {k: s.cursor.epoch for k, s in self.sources.items()},
            "consumed": {k: s.consumed for k, s in self.sources.items()},
        }

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "num_streams": self.num_streams,
            "rng": rng_to_json(self.rng),
            "builder_rng": rng_to_json(self.builder.rng),
            "builder_py_rng": rng_to_json(self.builder.py_rng),
            "rows": [
                {
                    "instances": [_sample_to_json(i) for i in r.instances],
                    "tasks": list(r.tasks),
                    "length": r.length,
                }
                for r in self.packer.rows
            ],
            "sources": {
                k: {
                    "cursor": s.cursor.state_dict(),
                    "skipped_too_long": s.skipped_too_long,
                    "consumed": s.consumed,
                }
                for k, s in self.sources.items()
            },
            "last_shares": self._last_shares,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, restore_rows: bool = True) -> list[str]:
        """Restore a state; returns the dataset identities of the state that are not in the config any more."""
        if restore_rows:
            rng_from_json(state["rng"], self.rng)
            rng_from_json(state["builder_rng"], self.builder.rng)
            rng_from_json(state["builder_py_rng"], self.builder.py_rng)
            self.packer.rows = [
                _Row([_sample_from_json(i) for i in r["instances"]], list(r["tasks"]), int(r["length"]))
                for r in state["rows"]
            ]
            self._last_shares = state.get("last_shares")
        for k, s in state["sources"].items():
            if k in self.sources:
                self.sources[k].cursor.load_state_dict(s["cursor"])
                self.sources[k].skipped_too_long = int(s.get("skipped_too_long", 0))
                self.sources[k].consumed = int(s.get("consumed", 0))
        return [k for k in state["sources"] if k not in self.sources]


def _name_hash(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def reshard_states(
    states: Sequence[Mapping[str, Any] | None], num_streams: int, num_blocks: Mapping[str, int]
) -> list[dict[str, Any]]:
    """Stream states saved with one number of streams → states for ``num_streams`` (a world-size change).

    Each dataset's unread blocks are re-dealt with ``shards.redeal``; counters are summed into stream 0;
    RNGs are not carried over and the packer's open rows are dropped (the caller seeds fresh streams and
    loads these with ``restore_rows=False``). ``None`` is a stream that never produced a batch.
    """
    identities = sorted(num_blocks)
    out: list[dict[str, Any]] = [{"sources": {}} for _ in range(num_streams)]
    for ident in identities:
        olds = [s["sources"].get(ident) if s is not None else None for s in states]
        dealt = redeal([o["cursor"] if o else None for o in olds], num_blocks[ident], num_streams)
        skipped = sum(int(o.get("skipped_too_long", 0)) for o in olds if o)
        consumed = sum(int(o.get("consumed", 0)) for o in olds if o)
        for i, cursor in enumerate(dealt):
            out[i]["sources"][ident] = {
                "cursor": cursor,
                "skipped_too_long": skipped if i == 0 else 0,
                "consumed": consumed if i == 0 else 0,
            }
    return out
