"""A rank's data pipeline: ``num_workers`` mixture streams in data-loader worker processes (or one stream
in the main process with ``num_workers=0``), batches in a fixed round-robin order, exact resume.

Streams are numbered globally, ``rank × streams_per_rank + worker``; each owns its share of every
dataset's blocks. Every batch carries the state of its stream right after it was made, so the pipeline's
``state_dict()`` is exact even though workers run ahead: it is the state after the last batch the trainer
*consumed* from each stream, plus how many batches were consumed (which stream comes next).

Resuming with the same world size and workers restores every stream exactly. With another layout the
datasets' unread blocks are re-dealt to the new streams (``shards.redeal``); the new streams get fresh RNG
seeds (derived from the seed and the resume step) and the packer rows that were open are dropped.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..prompt import DEFAULT_MAX_DEPTH
from ..tokenizer import CpmBeeTokenizerBase
from .mixture import MixedStream, StreamOutput, load_mixture_config, reshard_states
from .shards import _seed, open_dataset

__all__ = ["DataPipeline", "PipelineBatch"]


@dataclass
class PipelineBatch(StreamOutput):
    stream: int = 0


@dataclass
class _StreamSpec:
    config_path: str
    tokenizer: CpmBeeTokenizerBase
    max_length: int
    batch_size: int
    num_streams: int
    seed: int
    max_depth: int

    def build(
        self, stream: int, state: Mapping[str, Any] | None, restore_rows: bool, seed: int
    ) -> MixedStream:
        s = MixedStream(
            self.config_path,
            self.tokenizer,
            max_length=self.max_length,
            batch_size=self.batch_size,
            stream=stream,
            num_streams=self.num_streams,
            seed=seed,
            max_depth=self.max_depth,
        )
        if state is not None:
            s.load_state_dict(state, restore_rows=restore_rows)
        return s


def _identity(x: Any) -> Any:
    return x


def _die_with_parent(worker_id: int) -> None:
    """Linux: a worker gets SIGKILL when its rank process dies (even by ``kill -9``), instead of lingering
    blocked on a full result queue."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover - unusual libc
            pass


class _Streams(torch.utils.data.IterableDataset):
    """Data-loader view: worker ``i`` runs stream ``first + (offset + i) % per_rank``."""

    def __init__(
        self,
        spec: _StreamSpec,
        first: int,
        per_rank: int,
        offset: int,
        states: list[Any],
        restore_rows: bool,
        seed: int,
    ) -> None:
        self.spec, self.first, self.per_rank, self.offset = spec, first, per_rank, offset
        self.states, self.restore_rows, self.seed = states, restore_rows, seed

    def __iter__(self) -> Iterator[tuple[int, StreamOutput, dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        local = (self.offset + (info.id if info is not None else 0)) % self.per_rank
        stream = self.spec.build(self.first + local, self.states[local], self.restore_rows, self.seed)
        while True:
            out = stream.next_batch()
            yield local, out, stream.state_dict()


class DataPipeline:
    """Iterate ``PipelineBatch``es for one rank.

    Args:
        config_path: the mixture config (``cpmbee.data.mixture``).
        tokenizer: a ``CpmBeeTokenizer``.
        max_length / batch_size: each batch is ``batch_size`` rows of ``max_length`` tokens.
        rank / world_size: this process among the data-parallel ranks.
        num_workers: streams per rank, each in its own worker process (0: one stream in this process).
        seed: base seed.
        state: a global state from ``gather_state`` of an earlier run (resume).
        resume_step: the step being resumed (seeds fresh streams when the layout changed).
    """

    def __init__(
        self,
        config_path: str | os.PathLike,
        tokenizer: CpmBeeTokenizerBase,
        *,
        max_length: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        max_depth: int = DEFAULT_MAX_DEPTH,
        state: Mapping[str, Any] | None = None,
        resume_step: int = 0,
        prefetch: int = 2,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.per_rank = max(num_workers, 1)
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self.first = rank * self.per_rank
        num_streams = world_size * self.per_rank
        self.spec = _StreamSpec(
            str(config_path), tokenizer, max_length, batch_size, num_streams, seed, max_depth
        )
        self.consumed = 0
        self.resharded = False
        states: list[Any] = [None] * self.per_rank
        restore_rows, stream_seed = True, seed
        if state is not None:
            if int(state["num_streams"]) == num_streams and int(state["per_rank"]) == self.per_rank:
                states = list(state["streams"][self.first : self.first + self.per_rank])
                self.consumed = int(state["consumed"])
            else:
                config = load_mixture_config(config_path)
                blocks = {
                    e.identity: open_dataset(config.resolve(e.path)).num_blocks for e in config.datasets
                }
                dealt = reshard_states(state["streams"], num_streams, blocks)
                states = dealt[self.first : self.first + self.per_rank]
                restore_rows, stream_seed = False, _seed(seed, resume_step, 7)
                self.resharded = True
        self._states: list[dict[str, Any] | None] = list(states)
        offset = self.consumed % self.per_rank
        self._stream: MixedStream | None
        if num_workers == 0:
            self._stream = self.spec.build(self.first, states[0], restore_rows, stream_seed)
            self._iter: Iterator[Any] | None = None
        else:
            self._stream = None
            loader = torch.utils.data.DataLoader(
                _Streams(self.spec, self.first, self.per_rank, offset, states, restore_rows, stream_seed),
                batch_size=None,
                num_workers=num_workers,
                collate_fn=_identity,
                worker_init_fn=_die_with_parent,
                prefetch_factor=prefetch,
            )
            self._iter = iter(loader)

    def __iter__(self) -> DataPipeline:
        return self

    def __next__(self) -> PipelineBatch:
        if self._stream is not None:
            out = self._stream.next_batch()
            local, state = 0, self._stream.state_dict()
        else:
            assert self._iter is not None
            local, out, state = next(self._iter)
        self._states[local] = state
        self.consumed += 1
        return PipelineBatch(out.batch, out.events, out.counters, stream=self.first + local)

    def state_dict(self) -> dict[str, Any]:
        """This rank's part: ``{"streams": {global stream: state}, "consumed": n}`` (``None`` = not started)."""
        if self._stream is not None and self._states[0] is None:
            self._states[0] = self._stream.state_dict()
        return {"streams": {self.first + i: s for i, s in enumerate(self._states)}, "consumed": self.consumed}

    def close(self) -> None:
        self._iter = None


def gather_state(parts: list[Mapping[str, Any]], world_size: int, per_rank: int) -> dict[str, Any]:
    """Combine every rank's ``state_dict()`` into the global state that ``DataPipeline(state=...)`` takes."""
    streams: dict[int, Any] = {}
    for p in parts:
        streams.update({int(k): v for k, v in p["streams"].items()})
    consumed = {int(p["consumed"]) for p in parts}
    if len(consumed) != 1:
        raise RuntimeError(f"ranks consumed different numbers of batches: {sorted(consumed)}")
    ordered = [streams.get(i) for i in range(world_size * per_rank)]
    return {
        "num_streams": world_size * per_rank,
        "per_rank": per_rank,
        "consumed": consumed.pop(),
        "streams": ordered,
    }
