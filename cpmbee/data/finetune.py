"""Fine-tuning data: CPM-Bee dicts with filled answers → padded training batches with labels.

One sample per row (no packing), padded to the longest row of the batch (optionally rounded up to a
multiple), labels ``-100`` everywhere except the answer tokens — the layout of ``cpmbee.prompt``'s
``make_training_batch``, so ``model(**batch).loss`` works and the loss equals CPM-Live's.

**Truncation policy.** A sample longer than ``max_length`` tokens is shortened by trimming *context* text
(string values outside ``<ans>``) from their ends, longest first: the longest leaves are cut down to a
common length ("water filling"), so a long document loses its tail while short fields (a question, the
options) stay whole as long as possible. Keys, the structure tokens and the answer are never cut; when
they alone exceed ``max_length`` the sample is rejected with a ``ValueError`` naming it. Cuts fall on
token boundaries, so the kept text tokenizes exactly as before. ``truncation=False`` rejects every
over-long sample instead.

Inputs may be one dict, a list of dicts, or a dict of lists (a 🤗 ``datasets`` slice); ``None`` values
(how ``datasets`` fills keys missing from a row) are dropped. ``FinetuneCollator`` is the same thing as a
``collate_fn`` for a plain ``torch.utils.data.DataLoader`` over a list or ``Dataset`` of dicts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..inputs import CpmBeeBatch
from ..prompt import (
    ANSWER_KEY,
    DEFAULT_MAX_DEPTH,
    TrainingBatch,
    encode_sample,
    join_samples,
    make_training_batch,
)
from ..tokenizer import CpmBeeTokenizerBase
from .jsonl import iter_jsonl
from .shards import open_dataset

__all__ = [
    "FinetuneCollator",
    "GlobalBatchOrder",
    "choice_candidates",
    "fit_to_length",
    "normalize_samples",
    "prepare_for_finetune",
    "read_jsonl",
    "scan_samples",
]

logger = logging.getLogger(__name__)

Path_ = tuple[str, ...]


# ---------------------------------------------------------------------------------------------------- inputs
def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _is_dict_of_lists(data: Mapping[str, Any]) -> bool:
    values = list(data.values())
    return bool(values) and all(isinstance(v, (list, tuple)) for v in values)


def normalize_samples(data: Any) -> list[Any]:
    """One dict, a list of dicts or a dict of equal-length lists → a list of samples (``None`` values dropped)."""
    if isinstance(data, str):
        return [data]
    if isinstance(data, Mapping):
        if _is_dict_of_lists(data):
            lengths = {k: len(v) for k, v in data.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"a dict of lists needs lists of one length, got {lengths}")
            n = next(iter(lengths.values()))
            return [_drop_none({k: v[i] for k, v in data.items()}) for i in range(n)]
        return [_drop_none(data)]
    if isinstance(data, Sequence):
        return [_drop_none(d) for d in data]
    raise ValueError(f"expected a CPM-Bee dict, a list of them or a dict of lists, got {type(data).__name__}")


def read_jsonl(path: str | os.PathLike, *, require_answer: bool = True) -> list[dict[str, Any]]:
    """Read fine-tuning samples: a JSONL file of CPM-Bee dicts, or a dataset directory (``cpmbee
    build-dataset`` shards, or the original CPM-Bee format read in place), records in stored order.
    A bad sample raises ``ValueError`` naming the file and line (or record)."""
    path = Path(path)
    located: Iterator[tuple[str, Any]]
    if path.is_dir():
        located = open_dataset(path).iter_located()
    elif path.is_file():
        located = ((f"{path}:{number}", sample) for number, sample in iter_jsonl(path))
    else:
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    samples: list[dict[str, Any]] = []
    for where, sample in located:
        if not isinstance(sample, dict):
            raise ValueError(f"{where}: expected a CPM-Bee dict, got {type(sample).__name__}")
        if require_answer and ANSWER_KEY not in sample:
            raise ValueError(f"{where}: no {ANSWER_KEY!r} key (a fine-tuning sample needs its answer)")
        if require_answer and not _has_answer_slot(sample[ANSWER_KEY]):
            raise ValueError(
                f"{where}: {ANSWER_KEY!r} holds no answer text ({sample[ANSWER_KEY]!r}: nothing to learn);"
                " give it a string, or a dict with at least one string"
            )
        samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def _has_answer_slot(answer: Any) -> bool:
    """False for an answer made of dicts only (``{}``, ``{"a": {}}``): it encodes to no token to predict.
    Other values are left to the encoder, which names a wrong type."""
    if isinstance(answer, Mapping):
        return any(_has_answer_slot(value) for value in answer.values())
    return True


def _check_learnable(enc: Any) -> None:
    """A training sample must have a token to predict, or it adds 0 to the loss and counts as a perfect
    answer (``<ans>: {}``)."""
    if not (enc.context == 0).any():
        raise ValueError(f"no answer tokens to learn ({ANSWER_KEY!r} is missing or holds no string)")


# ---------------------------------------------------------------------------------------------------- truncation
def _context_leaves(data: Any) -> Iterator[tuple[Path_, str]]:
    """(path, text) of every string value outside the top-level ``<ans>``; a bare string is one leaf."""
    if isinstance(data, str):
        yield (), data
        return

    def visit(value: Any, path: Path_) -> Iterator[tuple[Path_, str]]:
        if isinstance(value, Mapping):
            for key, child in value.items():
                if not path and key == ANSWER_KEY:
                    continue
                yield from visit(child, (*path, key))
        elif isinstance(value, str):
            yield path, value

    yield from visit(data, ())


def _set_path(data: Any, path: Path_, text: str) -> Any:
    if not path:
        return text
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = text
    return data


def _water_fill(lengths: Sequence[int], excess: int) -> list[int]:
    """New lengths removing exactly ``excess`` tokens, longest leaves first, ties broken toward earlier leaves."""
    lo, hi = 0, max(lengths)
    # Largest cap whose cut removes at least `excess` (the cut shrinks as the cap grows).
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(max(0, n - mid) for n in lengths) >= excess:
            lo = mid
        else:
            hi = mid - 1
    cap = lo
    new = [min(n, cap) for n in lengths]
    give_back = sum(lengths) - sum(new) - excess  # < number of leaves longer than cap
    for i, n in enumerate(lengths):
        if give_back <= 0:
            break
        if n > cap:
            new[i] += 1
            give_back -= 1
    return new


def fit_to_length(
    tokenizer: CpmBeeTokenizerBase, data: Any, max_length: int, *, length: int | None = None
) -> tuple[Any, int]:
    """``data`` shortened to at most ``max_length`` tokens by the truncation policy; returns it and the
    number of tokens removed (0: ``data`` itself is returned unchanged).

    ``length`` is the encoded length of ``data`` when the caller already knows it.
    """
    from ..tokenizer import SPECIAL, escape

    if length is None:
        length = len(encode_sample(tokenizer, data))
    excess = length - max_length
    if excess <= 0:
        return data, 0
    leaves = [(path, tokenizer.pieces(text)) for path, text in _context_leaves(data)]
    lengths = [len(pieces) for _, pieces in leaves]
    if sum(lengths) < excess:
        fixed = length - sum(lengths)
        raise ValueError(
            f"{fixed} tokens of keys, structure and answer alone exceed max_length={max_length}"
            " (only context text is truncated)"
        )
    out = copy.deepcopy(data)
    for (path, pieces), new_len in zip(leaves, _water_fill(lengths, excess)):
        if new_len < len(pieces):
            text = "".join(p.text if p.kind == SPECIAL else escape(p.text) for p in pieces[:new_len])
            out = _set_path(out, path, text)
    return out, excess


# ---------------------------------------------------------------------------------------------------- batches
def _encode_rows(
    tokenizer: CpmBeeTokenizerBase,
    samples: Sequence[Any],
    max_length: int,
    truncation: bool,
    shuffle_answer: bool,
    rng: np.random.RandomState | None,
    max_depth: int,
    first_index: int = 0,
) -> tuple[list[list[Any]], int]:
    rows = []
    truncated = 0
    for offset, sample in enumerate(samples):
        index = first_index + offset
        try:
            enc = encode_sample(tokenizer, sample, max_depth=max_depth)
            _check_learnable(enc)
            changed = len(enc) > max_length
            if changed:
                if not truncation:
                    raise ValueError(
                        f"{len(enc)} tokens, more than max_length={max_length} (truncation is off)"
                    )
                sample, _ = fit_to_length(tokenizer, sample, max_length, length=len(enc))
                truncated += 1
            # Answers are shuffled only once the sample fits, so the RNG stream does not depend on truncation.
            if changed or shuffle_answer:
                enc = encode_sample(
                    tokenizer, sample, max_depth=max_depth, shuffle_answer=shuffle_answer, rng=rng
                )
            assert len(enc) <= max_length, "truncation left the sample too long"
        except ValueError as err:
            raise ValueError(f"sample {index}: {err}") from None
        rows.append([join_samples(enc, raw=sample)])
    return rows, truncated


def _batch(
    tokenizer: CpmBeeTokenizerBase, rows: list[list[Any]], pad_to_multiple_of: int | None
) -> TrainingBatch:
    width = None
    if pad_to_multiple_of:
        longest = max(sum(len(inst) for inst in row) for row in rows)
        width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return make_training_batch(
        rows, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, length=width
    )


def _check_options(max_length: int, pad_to_multiple_of: int | None) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")


def prepare_for_finetune(
    tokenizer: CpmBeeTokenizerBase,
    data: Any,
    max_length: int = 2048,
    *,
    truncation: bool = True,
    pad_to_multiple_of: int | None = None,
    shuffle_answer: bool = False,
    rng: np.random.RandomState | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    return_tensors: str | None = "pt",
) -> Any:
    """Samples with filled ``<ans>`` → one row each, padded to the longest row, with ``labels``.

    Args:
        tokenizer: a ``CpmBeeTokenizer``.
        data: a CPM-Bee dict, a list of them, or a dict of lists.
        max_length: most tokens per row; longer samples are truncated (module docstring) or rejected.
        truncation: trim context text of over-long samples (True) or raise ``ValueError`` (False).
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly shapes).
        shuffle_answer: permute the items of dict answers (as pre-training does), with ``rng``.
        return_tensors: ``"pt"`` for a ``BatchEncoding`` of tensors that unpacks into
            ``CpmBeeForCausalLM.forward`` (``model(**batch).loss``), None for the numpy ``TrainingBatch``.
    """
    _check_options(max_length, pad_to_multiple_of)
    if return_tensors not in ("pt", None):
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
    samples = normalize_samples(data)
    if not samples:
        raise ValueError("prepare_for_finetune needs at least one sample")
    rows, truncated = _encode_rows(tokenizer, samples, max_length, truncation, shuffle_answer, rng, max_depth)
    if truncated:
        logger.info("truncated %d of %d samples to max_length=%d", truncated, len(samples), max_length)
    batch = _batch(tokenizer, rows, pad_to_multiple_of)
    if return_tensors is None:
        return batch
    from transformers import BatchEncoding

    return BatchEncoding(dict(batch.model_inputs()))


class FinetuneCollator:
    """``collate_fn`` for a ``torch.utils.data.DataLoader`` over CPM-Bee dicts (filled ``<ans>``).

    ``DataLoader(samples, batch_size=8, shuffle=True, collate_fn=FinetuneCollator(tokenizer, 512))`` yields
    dicts of tensors for ``model(**batch).loss``. The default collate would turn the dicts into a dict of
    lists; this one takes the list of samples as it is. ``truncated`` counts the samples it had to shorten.

    Args: as ``prepare_for_finetune``; ``seed`` seeds the answer shuffle when ``shuffle_answer`` is on.
    """

    def __init__(
        self,
        tokenizer: CpmBeeTokenizerBase,
        max_length: int = 2048,
        *,
        truncation: bool = True,
        pad_to_multiple_of: int | None = None,
        shuffle_answer: bool = False,
        seed: int | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        _check_options(max_length, pad_to_multiple_of)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.pad_to_multiple_of = pad_to_multiple_of
        self.shuffle_answer = shuffle_answer
        self.rng = np.random.RandomState(seed) if shuffle_answer else None
        self.max_depth = max_depth
        self.truncated = 0

    def encode(self, samples: Any) -> TrainingBatch:
        """The numpy ``TrainingBatch`` of ``samples`` (any form ``normalize_samples`` takes)."""
        samples = normalize_samples(samples)
        if not samples:
            raise ValueError("cannot collate an empty batch")
        rows, truncated = _encode_rows(
            self.tokenizer,
            samples,
            self.max_length,
            self.truncation,
            self.shuffle_answer,
            self.rng,
            self.max_depth,
        )
        self.truncated += truncated
        return _batch(self.tokenizer, rows, self.pad_to_multiple_of)

    def __call__(self, samples: Any) -> CpmBeeBatch:
        return self.encode(samples).model_inputs()


# ---------------------------------------------------------------------------------------------------- runs
def scan_samples(
    tokenizer: CpmBeeTokenizerBase, samples: list[Any], max_length: int, name: str
) -> dict[str, int]:
    """Encode every sample once: fail early on bad data (naming ``name`` and the 1-based sample number),
    count tokens and the samples that truncation will shorten."""
    tokens = truncated = 0
    for i, sample in enumerate(samples):
        try:
            enc = encode_sample(tokenizer, sample)
            _check_learnable(enc)
            n = len(enc)
            if n > max_length:
                fit_to_length(tokenizer, sample, max_length, length=n)
                truncated += 1
                n = max_length
        except ValueError as err:
            raise ValueError(f"{name}: sample {i + 1}: {err}") from None
        tokens += n
    return {"samples": len(samples), "tokens": tokens, "truncated": truncated}


class GlobalBatchOrder:
    """A deterministic stream of global batches over ``n`` samples: micro-batch ``m`` of epoch ``e`` is a
    slice of a permutation seeded with ``seed + e``; the epoch's last batch is filled up from its start.
    Processes take their ``batch_size`` slice of each global batch, so the stream depends only on the
    position ``m`` (what a checkpoint stores) and not on how many processes read it."""

    def __init__(self, n: int, global_batch: int, seed: int, shuffle: bool) -> None:
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self.per_epoch = math.ceil(n / global_batch)
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            perm = (
                np.random.RandomState(self.seed + epoch).permutation(self.n)
                if self.shuffle
                else np.arange(self.n)
            )
            self._cache = (epoch, perm)
        return self._cache[1]

    def global_indices(self, micro: int) -> list[int]:
        epoch, j = divmod(micro, self.per_epoch)
        perm = self.permutation(epoch)
        picked = [int(perm[(j * self.global_batch + k) % self.n]) for k in range(self.global_batch)]
        return picked

    def epoch_of(self, micro: int) -> float:
        return micro / self.per_epoch


# ---------------------------------------------------------------------------------------------------- choices
def choice_candidates(sample: Any, options_key: str = "options") -> list[str] | None:
    """The possible answers of a multiple-choice sample, or None when it is not one.

    A sample is a choice sample when ``sample[options_key]`` is a dict of strings and ``<ans>`` is one of
    its keys (``"<option_2>"``, the CPM-Bee convention) or one of its values (the option text itself).
    """
    if not isinstance(sample, Mapping):
        return None
    options, answer = sample.get(options_key), sample.get(ANSWER_KEY)
    if not isinstance(options, Mapping) or not isinstance(answer, str) or not options:
        return None
    if answer in options:
        return list(options.keys())
    values = list(options.values())
    if all(isinstance(v, str) for v in values) and answer in values:
        return values
    return None
