"""Training instances and best-fit packing into fixed-length rows, as CPM-Live pre-training does.

An *instance* is one record encoded with ``shuffle_answer=True``, followed by ``k`` in-context records
(``k`` drawn from the dataset's ``incontext_weight``), as long as everything fits in ``max_length``.
Instances are packed into rows best-fit (the open row with the least room that still fits, else a new
row); once more than ``batch_size`` rows are open the first ``batch_size`` are emitted as a batch.

Random draws follow numpy's legacy ``RandomState`` in the original order (in-context count, template
choice, then one shuffle per answer dict), so a seeded run reproduces the original's batches exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..prompt import (
    DEFAULT_MAX_DEPTH,
    EncodedSample,
    TrainingBatch,
    TrainingSample,
    encode_sample,
    join_samples,
    make_training_batch,
)
from ..tokenizer import CpmBeeTokenizerBase
from .transforms import apply_transform

__all__ = ["BatchPacker", "InstanceBuilder", "Transform"]

# A transform is a mapping template, or a function (record, num_incontext, random.Random) -> record.
Transform = Mapping[str, Any] | Callable[[Any, int, random.Random], Any]


@dataclass
class InstanceBuilder:
    """Turns records into training instances (main sample + in-context samples).

    Args:
        tokenizer: a ``CpmBeeTokenizer``.
        max_length: longest instance in tokens; a record longer than this on its own is skipped (and
            counted in ``skipped_too_long``).
        max_depth: segment-relation depth cap.
        rng: numpy ``RandomState`` for the in-context count, template choice and answer shuffles.
        py_rng: Python RNG that seeds function transforms (one seed per instance, shared by its samples).
        max_consecutive_skips: give up (``ValueError``) after this many too-long records in a row, instead
            of reading forever from a dataset whose records never fit.
    """

    tokenizer: CpmBeeTokenizerBase
    max_length: int
    max_depth: int = DEFAULT_MAX_DEPTH
    rng: np.random.RandomState = field(default_factory=np.random.RandomState)
    py_rng: random.Random = field(default_factory=random.Random)
    skipped_too_long: int = 0
    max_consecutive_skips: int = 10_000

    def _encode(self, record: Any, state: Any = None) -> EncodedSample:
        return encode_sample(
            self.tokenizer,
            record,
            max_depth=self.max_depth,
            shuffle_answer=True,
            rng=self.rng,
            ext_state=state,
        )

    def build(
        self,
        read: Callable[[], Any],
        transforms: Sequence[Mapping[str, Any]] | Callable[[Any, int, random.Random], Any] = (),
        incontext_weight: Sequence[float] = (1.0,),
    ) -> TrainingSample:
        """Read records with ``read()`` until one fits, then add in-context records while they fit."""
        weights = np.asarray(incontext_weight, dtype=np.float32)
        if weights.ndim != 1 or weights.size == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"incontext_weight must be non-negative weights with a positive sum, got {incontext_weight!r}"
            )
        num_incontext = int(self.rng.choice(weights.shape[0], p=weights / weights.sum()))

        if callable(transforms):
            seed = self.py_rng.random()
            func = transforms

            def transform(record: Any) -> Any:
                return func(record, num_incontext, random.Random(seed))
        elif len(transforms) == 0:

            def transform(record: Any) -> Any:
                return record
        else:
            template = transforms[int(self.rng.choice(len(transforms)))]

            def transform(record: Any) -> Any:
                return apply_transform(record, template)

        skips = 0
        while True:
            record = transform(read())
            main = self._encode(record)
            if len(main) <= self.max_length:
                break
            self.skipped_too_long += 1
            skips += 1
            if skips >= self.max_consecutive_skips:
                raise ValueError(
                    f"{skips} records in a row are longer than max_length={self.max_length} tokens"
                )
        raw: dict[str, Any] = {"input": record, "samples": []}

        extra: list[EncodedSample] = []
        total, state = len(main), main.ext_state
        for _ in range(num_incontext):
            if total >= self.max_length:
                break
            sample_record = transform(read())
            sample = self._encode(sample_record, state)
            state = sample.ext_state
            if total + len(sample) > self.max_length:
                break
            raw["samples"].append(sample_record)
            extra.append(sample)
            total += len(sample)
        return join_samples(main, extra, raw=raw)


@dataclass
class _Row:
    instances: list[TrainingSample] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    length: int = 0


class BatchPacker:
    """Best-fit packing of instances into ``batch_size`` rows of ``max_length`` tokens."""

    def __init__(
        self, batch_size: int, max_length: int, *, vocab_size: int, bos_id: int, eos_id: int
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        self._token_ids = {"vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id}
        self.rows: list[_Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, instance: TrainingSample, task: str = "task") -> TrainingBatch | None:
        """Place one instance; returns a batch once more than ``batch_size`` rows are open."""
        n = len(instance)
        if n > self.max_length:
            raise ValueError(f"instance of {n} tokens does not fit max_length={self.max_length}")
        best, best_room = None, None
        for row in self.rows:
            room = self.max_length - row.length
            if n <= room and (best_room is None or room < best_room):
                best, best_room = row, room
        if best is None:
            best = _Row()
            self.rows.append(best)
        best.instances.append(instance)
        best.tasks.append(task)
        best.length += n
        if len(self.rows) > self.batch_size:
            return self.pack()
        return None

    def pack(self, force: bool = False) -> TrainingBatch:
        """Emit the first ``batch_size`` rows (fewer only with ``force``), right-padded to ``max_length``."""
        if len(self.rows) < self.batch_size and not force:
            raise RuntimeError(f"only {len(self.rows)} rows open, fewer than batch_size={self.batch_size}")
        if not self.rows:
            raise RuntimeError("no rows to pack")
        rows, self.rows = self.rows[: self.batch_size], self.rows[self.batch_size :]
        return make_training_batch(
            [r.instances for r in rows],
            length=self.max_length,
            tasks=[r.tasks for r in rows],
            **self._token_ids,
        )
