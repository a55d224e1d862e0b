"""Structured CPM-Bee inputs ↔ token arrays: the one place that defines the prompt format.

A CPM-Bee input is a string or a (nested) dict of strings. It becomes a tree of *segments*: segment 0 is the
root (``"<root>"``), every dict key is a segment, and its value's segments hang below it (a string value is
one leaf segment). Dicts are walked in insertion order. Each segment is tokenized as
``<s> tokens </s>``; leaves under the top-level ``"<ans>"`` key are the answers the model must produce:
they get no ``</s>`` and ``context = 0``.

Every pair of segments gets a relation bucket from the tree (how far each is below their lowest common
ancestor), which the model turns into an attention bias. Tokens that are not in the vocabulary (runs of
unknown characters, special tokens such as ``<mask_3>``) are written as a *family* id (``<unk>``, ``<mask>``)
plus a *sub* index, numbered per family in order of first appearance.

Three consumers share these functions, and only these:

* generation — ``encode_prompt`` removes the answer slots and ``collate_prompts`` left-pads a batch;
* training — ``encode_sample`` + ``join_samples`` build instances, ``make_training_batch`` pads them into
  rows with labels (``cpmbee.data`` packs many instances per row; ``cpmbee.data.finetune`` puts one
  sample per row, as the model card's ``tokenizer.prepare_for_finetune``);
* plain text — ``plain_text_input`` is the CPM-Bee input a plain string stands for (transformers' text
  calls: ``tokenizer(text)``, ``model.generate(**inputs)``, the text-generation pipeline) and
  ``plain_text_prompt`` reads its token ids back.

Batches hold numpy arrays named as the model's inputs (``cpmbee.inputs``); ``model_inputs()`` makes the
tensors for ``model(**batch)``.

The arrays match the original implementation exactly (see tests/test_prompt.py against the golden files);
malformed input raises ``ValueError`` naming the offending field, e.g. ``data['<ans>']['x']``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, cast

import numpy as np

from .inputs import BATCH_NAMES, CpmBeeBatch
from .tokenizer import CpmBeeTokenizerBase, Vocabulary, escape

__all__ = [
    "ANSWER_KEY",
    "ArrayBatch",
    "EncodedSample",
    "ExtState",
    "PromptBatch",
    "PromptSample",
    "PromptTooLong",
    "TrainingBatch",
    "TrainingSample",
    "collate_prompts",
    "encode_prompt",
    "encode_sample",
    "fill_answers",
    "join_samples",
    "make_training_batch",
    "plain_text_input",
    "plain_text_prompt",
    "segment_relations",
]

CpmBeeInput = str | Mapping[str, "CpmBeeInput"]

ANSWER_KEY = "<ans>"
ROOT_TEXT = "<root>"
DEFAULT_MAX_DEPTH = 8
_PLACEHOLDER = re.compile(r"<ans_(\d+)>")


# ---------------------------------------------------------------------------------------------------- tree
@dataclass
class _Segment:
    text: str
    depth: int
    parent: int
    predict: bool
    path: tuple[str, ...]  # keys from the top; for a key segment, the path of the dict holding it
    is_key: bool = False

    @property
    def where(self) -> str:
        """Human-readable location, for error messages."""
        if self.parent < 0:
            return "the root"
        return f"key {self.text!r} of {_field(self.path)}" if self.is_key else _field(self.path)


def _field(path: Sequence[str]) -> str:
    return "data" + "".join(f"[{key!r}]" for key in path)


def _build_segments(data: Any, shuffle_answer: bool, rng: Any) -> list[_Segment]:
    """Pre-order list of segments; segment 0 is the root."""
    segments = [_Segment(ROOT_TEXT, 0, -1, False, ())]

    def visit(value: Any, depth: int, parent: int, predict: bool, path: tuple[str, ...]) -> None:
        if isinstance(value, Mapping):
            items = list(value.items())
            if predict and shuffle_answer:
                order = np.arange(len(items))
                (rng if rng is not None else np.random).shuffle(order)
                items = [items[i] for i in order]
            for key, child in items:
                if not isinstance(key, str):
                    raise ValueError(
                        f"{_field(path)}: keys must be strings, got {type(key).__name__} {key!r}"
                    )
                key_index = len(segments)
                segments.append(_Segment(key, depth, parent, False, path, is_key=True))
                # Only the top-level "<ans>" marks answers; a nested "<ans>" key is ordinary text.
                visit(
                    child, depth + 1, key_index, predict or (depth == 1 and key == ANSWER_KEY), (*path, key)
                )
        elif isinstance(value, str):
            segments.append(_Segment(value, depth, parent, predict, path))
        else:
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ValueError(
                f"{_field(path)}: expected a string or a dict of strings, got {type(value).__name__} {shown}"
            )

    visit(data, 1, 0, False, ())
    return segments


def segment_relations(
    parents: Sequence[int], depths: Sequence[int], max_depth: int = DEFAULT_MAX_DEPTH
) -> np.ndarray:
    """Read-only flattened ``n × n`` relation table of a tree shape (small shapes are memoized: datasets
    repeat them; large ones are not, so a server fed many shapes does not keep every table).

    See ``_segment_relations``.
    """
    if len(parents) > _CACHED_SEGMENTS:
        table = _segment_relations(parents, depths, max_depth)
        table.flags.writeable = False
        return table
    return _segment_relations_cached(tuple(parents), tuple(depths), max_depth)


_CACHED_SEGMENTS = 64  # memoize tables of at most this many segments (16 KiB each)


@lru_cache(maxsize=4096)
def _segment_relations_cached(
    parents: tuple[int, ...], depths: tuple[int, ...], max_depth: int
) -> np.ndarray:
    table = _segment_relations(parents, depths, max_depth)
    table.flags.writeable = False
    return table


def _segment_relations(parents: Sequence[int], depths: Sequence[int], max_depth: int) -> np.ndarray:
    """Flattened ``n × n`` relation buckets (row = query segment, column = key segment).

    With ``c`` the lowest common ancestor of ``a`` and ``b``, ``up = min(depth[a] - depth[c], max_depth - 1)``
    and ``down`` likewise for ``b``; the bucket is ``up * max_depth + down``, plus one when non-zero because
    bucket 1 is kept for "another sample or span". A segment with itself is 0.

    The depth of ``c`` is the number of depths at which ``a`` and ``b`` share their ancestor, less one (in a
    tree, once two paths part they never meet again): one ``n × n`` comparison per tree level.
    """
    n = len(parents)
    depth = np.asarray(depths, dtype=np.int64)
    height = int(depth.max()) + 1 if n else 1
    ancestors = np.full((n, height), -1, dtype=np.int64)  # ancestors[i, d] = ancestor of i at depth d
    for i, p in enumerate(parents):
        if p >= 0:
            ancestors[i] = ancestors[p]
        ancestors[i, depth[i]] = i
    # int16 throughout (a dict nested 32k deep cannot be built: recursion limit), in place where possible
    lca_depth = np.full((n, n), -1, dtype=np.int16)
    for d in range(height):  # + 1 for every depth at which a and b have the same ancestor
        column = ancestors[:, d]
        lca_depth += (column[:, None] == column[None, :]) & (column >= 0)[:, None]
    depth16 = depth.astype(np.int16)
    bucket = depth16[:, None] - lca_depth  # up
    np.minimum(bucket, max_depth - 1, out=bucket)
    down = np.subtract(depth16[None, :], lca_depth, out=lca_depth)
    np.minimum(down, max_depth - 1, out=down)
    bucket *= max_depth
    bucket += down
    bucket += bucket != 0
    return bucket.astype(np.int32).reshape(-1)


# ---------------------------------------------------------------------------------------------------- samples
class PromptTooLong(ValueError):
    """An input with more tokens than the caller's ``max_tokens``; raised as soon as the tokens are counted,
    before the ``num_segments²`` relation table is built."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} tokens")
        self.limit = limit


@dataclass
class ExtState:
    """Out-of-vocabulary bookkeeping of one sample, chained through its in-context samples.

    ``ext_table`` maps tokenizer ext ids to their text; ``token_id_table`` maps a family token (``"<mask>"``)
    to ``{ext id: sub}`` in order of first appearance.
    """

    ext_table: dict[int, str] = field(default_factory=dict)
    token_id_table: dict[str, dict[int, int]] = field(default_factory=dict)

    def copy(self) -> ExtState:
        return ExtState(dict(self.ext_table), {k: dict(v) for k, v in self.token_id_table.items()})


@dataclass
class EncodedSample:
    """One structured input as token arrays (all of length ``len(ids)`` except ``segment_rel``)."""

    ids: np.ndarray  # int32, family id for ext tokens
    subs: np.ndarray  # int32, sub index (0 for vocabulary tokens)
    context: np.ndarray  # int8, 1 = given, 0 = to be predicted
    segments: np.ndarray  # int32, segment index of each token
    segment_rel: np.ndarray  # int32, flattened num_segments² relation buckets
    num_segments: int
    ext_state: ExtState

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _family(text: str) -> str:
    """``<mask_7>`` → ``<mask>``, ``<option>`` → ``<option>``; unknown-character runs → ``<unk>``."""
    if text.startswith("<") and text.endswith(">"):
        return "<" + text[1:-1].split("_", 1)[0] + ">"
    return "<unk>"


def encode_sample(
    tokenizer: CpmBeeTokenizerBase,
    data: CpmBeeInput,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    shuffle_answer: bool = False,
    rng: np.random.RandomState | None = None,
    ext_state: ExtState | None = None,
    max_tokens: int | None = None,
) -> EncodedSample:
    """Encode a structured input.

    Args:
        tokenizer: the CPM-Bee tokenizer.
        data: a string or a nested dict of strings.
        max_depth: depth cap of the segment relations (8 as the released models; 16 allowed).
        shuffle_answer: permute the items of every dict under ``<ans>`` (pre-training does, so the model
            does not learn a fixed answer order). Uses ``rng.shuffle`` (legacy ``RandomState`` semantics,
            the global numpy RNG when ``rng`` is None).
        ext_state: state of an earlier sample to continue from (in-context samples share ext numbering);
            it is not modified.
        max_tokens: raise ``PromptTooLong`` as soon as the sample has more tokens than this.
    """
    if max_depth < 2:
        raise ValueError(f"max_depth must be at least 2, got {max_depth}")
    segments = _build_segments(data, shuffle_answer, rng)
    n = len(segments)

    state = ext_state.copy() if ext_state is not None else ExtState()
    table, families = state.ext_table, state.token_id_table
    reverse = {text: i for i, text in table.items()}
    vocab, vocab_size = tokenizer.encoder, tokenizer.vocab_size
    bos, eos = tokenizer.bos_id, tokenizer.eos_id

    ids: list[int] = []
    ext_positions: list[int] = []  # positions whose id is a tokenizer ext id, replaced below
    ext_subs: list[int] = []
    lengths: list[int] = []
    for seg in segments:
        start = len(ids)
        ids.append(bos)
        try:
            tokenizer.encode_into(seg.text, ids, table, reverse)
        except ValueError as err:
            raise ValueError(f"{seg.where}: {err}") from None
        if len(ids) > start + 1 and max(ids[start + 1 :]) >= vocab_size:
            for k in range(start + 1, len(ids)):
                token_id = ids[k]
                if token_id < vocab_size:
                    continue
                text = table[token_id]
                family = _family(text)
                members = families.setdefault(family, {})
                sub = members.setdefault(token_id, len(members))
                family_id = vocab.get(family)
                if family_id is None:
                    raise ValueError(
                        f"{seg.where}: invalid token {text!r}: its family {family!r} is not in the vocabulary"
                        " (write a literal '<' as '<<')"
                    )
                ids[k] = family_id
                ext_positions.append(k)
                ext_subs.append(sub)
        if not seg.predict:
            ids.append(eos)
        lengths.append(len(ids) - start)
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(max_tokens)

    segment_rel = segment_relations([s.parent for s in segments], [s.depth for s in segments], max_depth)
    subs = np.zeros(len(ids), dtype=np.int32)
    subs[ext_positions] = ext_subs
    length_arr = np.asarray(lengths, dtype=np.int64)
    context = np.repeat(np.asarray([0 if s.predict else 1 for s in segments], dtype=np.int8), length_arr)
    return EncodedSample(
        ids=np.asarray(ids, dtype=np.int32),
        subs=subs,
        context=context,
        segments=np.repeat(np.arange(n, dtype=np.int32), length_arr),
        segment_rel=segment_rel,
        num_segments=n,
        ext_state=state,
    )


# ---------------------------------------------------------------------------------------------------- generation
@dataclass
class PromptSample:
    """A structured input ready for generation: the given tokens and where the answers go."""

    ids: np.ndarray
    subs: np.ndarray
    segments: np.ndarray
    sample_ids: np.ndarray  # 0 for the main sample, k for the k-th in-context sample
    num_segments: np.ndarray  # per token: number of segments of its sample
    segment_rel_offset: np.ndarray  # per token: offset of its sample's table in `segment_rel`
    segment_rel: np.ndarray
    predict_segments: list[tuple[int, int]]  # (segment id, answer number ≥ 1), in sequence order
    answer_paths: list[tuple[str, ...]]  # answer number k → keys below "<ans>" (empty: "<ans>" itself)
    ext_state: ExtState

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _with_placeholders(data: CpmBeeInput) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """Copy of ``data`` whose ``<ans>`` leaves are ``<ans_1>``, ``<ans_2>``, … (depth-first)."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"data must be a dict with an {ANSWER_KEY!r} key to generate, got {type(data).__name__}"
        )
    if ANSWER_KEY not in data:
        raise ValueError(f'data has no {ANSWER_KEY!r} key: nothing to generate (add "{ANSWER_KEY}": "")')
    paths: list[tuple[str, ...]] = []

    def visit(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, Mapping):
            if not value:
                raise ValueError(f"{_field((ANSWER_KEY, *path))} is an empty dict: no answer slot to fill")
            return {k: visit(v, (*path, k)) for k, v in value.items()}
        paths.append(path)
        return f"<ans_{len(paths)}>"

    out = dict(data)
    out[ANSWER_KEY] = visit(data[ANSWER_KEY], ())
    return out, paths


def _encode_within(limit: int | None, *args: Any, **kwargs: Any) -> EncodedSample:
    """``encode_sample`` whose ``PromptTooLong`` names ``limit`` (the prompt's budget) instead of its own."""
    try:
        return encode_sample(*args, **kwargs)
    except PromptTooLong:
        raise PromptTooLong(limit or 0) from None


def encode_prompt(
    tokenizer: CpmBeeTokenizerBase,
    data: CpmBeeInput,
    *,
    samples: Sequence[CpmBeeInput] = (),
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_tokens: int | None = None,
) -> PromptSample:
    """Encode ``data`` for generation: answer slots become placeholders and are cut out of the input.

    Whatever ``<ans>`` holds (``""``, a text, a dict of them) only gives the answer slots; existing text is
    discarded. ``samples`` are in-context examples appended after the prompt (with filled answers).
    ``max_tokens`` bounds the prompt's length: ``PromptTooLong`` is raised while counting, before the
    quadratic work, so an oversized input costs no more than reading it.
    """
    filled, paths = _with_placeholders(data)
    # each answer slot encodes as <s> <ans_k> (2 tokens), cut out of the prompt below
    budget = None if max_tokens is None else max_tokens + 2 * len(paths)
    enc = _encode_within(max_tokens, tokenizer, filled, max_depth=max_depth, max_tokens=budget)
    answer_subs: dict[int, int] = {}
    for ext_id, sub in enc.ext_state.token_id_table.get(ANSWER_KEY, {}).items():
        match = _PLACEHOLDER.fullmatch(enc.ext_state.ext_table[ext_id])
        if match:
            answer_subs[sub] = int(match.group(1))
    ans_id = tokenizer.encoder[ANSWER_KEY]
    keep = enc.context == 1
    slots = np.flatnonzero(~keep & (enc.ids == ans_id))
    predict = [(int(enc.segments[i]), answer_subs[int(enc.subs[i])]) for i in slots]
    if not predict:
        raise ValueError(f"{_field((ANSWER_KEY,))}: no answer to predict")

    given = dataclasses.replace(
        enc, ids=enc.ids[keep], subs=enc.subs[keep], context=enc.context[keep], segments=enc.segments[keep]
    )
    length = len(given)
    if max_tokens is not None and length > max_tokens:
        raise PromptTooLong(max_tokens)
    state, extra = enc.ext_state, []
    for sample in samples:
        left = None if max_tokens is None else max_tokens - length
        extra.append(
            _encode_within(
                max_tokens, tokenizer, sample, max_depth=max_depth, ext_state=state, max_tokens=left
            )
        )
        length += len(extra[-1])
        state = extra[-1].ext_state
    joined = join_samples(given, extra)
    return PromptSample(
        ids=joined.ids,
        subs=joined.subs,
        segments=joined.segments,
        sample_ids=joined.sample_ids,
        num_segments=joined.num_segments,
        segment_rel_offset=joined.segment_rel_offset,
        segment_rel=joined.segment_rel,
        predict_segments=predict,
        answer_paths=paths,
        ext_state=state,
    )


@dataclass
class ArrayBatch:
    """The arrays every batch has, named as the model's inputs (``cpmbee.inputs.CpmBeeInputs`` documents
    them); subclasses add their own (``position``, ``length``, ``labels``, …) and bookkeeping."""

    input_ids: np.ndarray  # (B, L) int32
    input_id_sub: np.ndarray
    context: np.ndarray  # (B, L) bool
    sample_ids: np.ndarray
    num_segments: np.ndarray
    segment: np.ndarray
    segment_rel_offset: np.ndarray
    segment_rel: np.ndarray  # (B, R)
    ext_table_ids: np.ndarray  # (E,) family id of each extra output column
    ext_table_sub: np.ndarray  # (E,) its sub

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The model-input arrays (and ``labels``) by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in BATCH_NAMES}

    def model_inputs(self, device: Any = None) -> CpmBeeBatch:
        """The arrays as tensors on ``device``, for ``model(**batch)``."""
        import torch

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in self.arrays().items()}
        return cast(CpmBeeBatch, tensors)


@dataclass
class PromptBatch(ArrayBatch):
    """A left-padded batch of prompts plus what is needed to turn generated ids back into answers.

    Padding has ``num_segments == 0``, which the model reads as "not a token".
    """

    position: np.ndarray  # (B, L) int32
    predict_segments: list[list[tuple[int, int]]]
    answer_paths: list[list[tuple[str, ...]]]
    # Per row: output column (vocab id for sub 0, vocab_size + k for ext column k) → text.
    ext_tables: list[dict[int, str]]


def collate_prompts(tokenizer: Vocabulary, prompts: Sequence[PromptSample]) -> PromptBatch:
    """Left-pad prompts into one batch and build the batch's extra output columns.

    Every ``(family, sub > 0)`` pair of any row (families in first-appearance order, ``<ans>`` excluded) gets a
    column ``vocab_size + k``; a sub-0 member is the family's own vocabulary id.
    """
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt")
    vocab_size = tokenizer.vocab_size
    columns: dict[tuple[int, int], int] = {}
    ext_tables: list[dict[int, str]] = []
    for p in prompts:
        row_table: dict[int, str] = {}
        for family, members in p.ext_state.token_id_table.items():
            if family == ANSWER_KEY:
                continue
            family_id = tokenizer.encoder[family]
            for ext_id, sub in members.items():
                if sub > 0:
                    col = columns.setdefault((family_id, sub), vocab_size + len(columns))
                    row_table[col] = p.ext_state.ext_table[ext_id]
                else:
                    row_table[family_id] = p.ext_state.ext_table[ext_id]
        ext_tables.append(row_table)

    batch, length = len(prompts), max(len(p) for p in prompts)
    arrays = {
        name: np.zeros((batch, length), dtype=np.int32)
        for name in (
            "input_ids",
            "input_id_sub",
            "position",
            "sample_ids",
            "num_segments",
            "segment",
            "segment_rel_offset",
        )
    }
    context = np.zeros((batch, length), dtype=bool)
    rel_width = max(p.segment_rel.shape[0] for p in prompts)
    segment_rel = np.zeros((batch, rel_width), dtype=np.int32)
    for b, p in enumerate(prompts):
        pad = length - len(p)
        arrays["input_ids"][b, pad:] = p.ids
        arrays["input_id_sub"][b, pad:] = p.subs
        arrays["position"][b, pad:] = np.arange(len(p), dtype=np.int32)
        arrays["sample_ids"][b, pad:] = p.sample_ids
        arrays["num_segments"][b, pad:] = p.num_segments
        arrays["segment"][b, pad:] = p.segments
        arrays["segment_rel_offset"][b, pad:] = p.segment_rel_offset
        context[b, pad:] = True
        segment_rel[b, : p.segment_rel.shape[0]] = p.segment_rel
    keys = list(columns)
    return PromptBatch(
        **arrays,
        context=context,
        segment_rel=segment_rel,
        ext_table_ids=np.asarray([k[0] for k in keys], dtype=np.int32),
        ext_table_sub=np.asarray([k[1] for k in keys], dtype=np.int32),
        predict_segments=[list(p.predict_segments) for p in prompts],
        answer_paths=[list(p.answer_paths) for p in prompts],
        ext_tables=ext_tables,
    )


def fill_answers(
    data: CpmBeeInput, answer_paths: Sequence[tuple[str, ...]], answers: Mapping[int, str | None]
) -> Any:
    """A copy of ``data`` with answer ``k`` (1-based) written at ``answer_paths[k-1]``; missing ones are None."""
    out = copy.deepcopy(data)
    if not isinstance(out, dict):
        raise ValueError("fill_answers needs a dict input")
    for k, path in enumerate(answer_paths, start=1):
        text = answers.get(k)
        if not path:
            out[ANSWER_KEY] = text
            continue
        node = out[ANSWER_KEY]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = text
    return out


# ---------------------------------------------------------------------------------------------------- plain text
PLAIN_TEXT_KEY = "input"


def plain_text_input(text: str) -> dict[str, str]:
    """The CPM-Bee input a plain string stands for: ``{"input": text, "<ans>": ""}`` with ``<`` in the text
    taken literally (escaped). transformers' text calls use it: ``tokenizer(text)`` gives the ids of its
    prompt, ``model.generate(**inputs)`` and the text-generation pipeline fill its answer."""
    if not isinstance(text, str):
        raise ValueError(f"plain text must be a string, got {type(text).__name__}")
    return {PLAIN_TEXT_KEY: escape(text), ANSWER_KEY: ""}


def plain_text_prompt(ids: Sequence[int], *, bos_id: int, eos_id: int) -> PromptSample:
    """The prompt of ``plain_text_input(text)`` rebuilt from its token ids alone (``tokenizer(text)``'s
    ``input_ids`` without padding). The layout fixes the segment tree; the ids give its four given segments,
    each ``<s> … </s>``, the text being the third. Only ``<s>``/``</s>`` are needed, so transformers'
    ``generate(input_ids)`` can do this without a tokenizer.

    The tokens get sub index 0 (plain ids carry no ext table: characters outside the vocabulary are
    ``<unk>``). Ids that are not such a prompt raise ``ValueError``.
    """
    tree = _build_segments(plain_text_input(""), False, None)
    given = [i for i, seg in enumerate(tree) if not seg.predict]
    ids = [int(i) for i in ids]
    starts = [j for j, token in enumerate(ids) if token == bos_id]
    ends = [j for j, token in enumerate(ids) if token == eos_id]
    framed = (
        len(starts) == len(given) and starts[0] == 0 and ends == [*(j - 1 for j in starts[1:]), len(ids) - 1]
    )
    if not framed:
        raise ValueError(
            "input_ids are not a plain-text prompt (tokenizer(text)'s layout {'input': text, '<ans>': ''});"
            " for CPM-Bee dicts call model.generate(data, tokenizer)"
        )
    lengths = np.diff([*starts, len(ids)])
    n = len(ids)
    return PromptSample(
        ids=np.asarray(ids, dtype=np.int32),
        subs=np.zeros(n, dtype=np.int32),
        segments=np.repeat(np.asarray(given, dtype=np.int32), lengths),
        sample_ids=np.zeros(n, dtype=np.int32),
        num_segments=np.full(n, len(tree), dtype=np.int32),
        segment_rel_offset=np.zeros(n, dtype=np.int32),
        segment_rel=segment_relations([s.parent for s in tree], [s.depth for s in tree]),
        predict_segments=[(i, k) for k, i in enumerate((i for i, s in enumerate(tree) if s.predict), 1)],
        answer_paths=[()],
        ext_state=ExtState(),
    )


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainingSample:
    """One training instance: a main sample followed by its in-context samples (``sample_ids`` 1, 2, …)."""

    ids: np.ndarray
    subs: np.ndarray
    context: np.ndarray  # int8; in-context samples are all context
    segments: np.ndarray
    sample_ids: np.ndarray
    num_segments: np.ndarray
    segment_rel_offset: np.ndarray
    segment_rel: np.ndarray
    raw: Any = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def join_samples(main: EncodedSample, extra: Sequence[EncodedSample] = (), raw: Any = None) -> TrainingSample:
    """Concatenate a main sample and in-context samples (encode those with ``ext_state`` chained)."""
    parts = [
        (
            main.ids,
            main.subs,
            main.context,
            main.segments,
            np.zeros_like(main.ids),
            np.full_like(main.ids, main.num_segments),
            np.zeros_like(main.ids),
        )
    ]
    rels = [main.segment_rel]
    offset = main.segment_rel.shape[0]
    for k, s in enumerate(extra, start=1):
        parts.append(
            (
                s.ids,
                s.subs,
                np.ones_like(s.context),
                s.segments,
                np.full_like(s.ids, k),
                np.full_like(s.ids, s.num_segments),
                np.full_like(s.ids, offset),
            )
        )
        rels.append(s.segment_rel)
        offset += s.segment_rel.shape[0]
    cols = [np.concatenate(c) for c in zip(*parts)]
    return TrainingSample(
        ids=cols[0].astype(np.int32),
        subs=cols[1].astype(np.int32),
        context=cols[2].astype(np.int8),
        segments=cols[3].astype(np.int32),
        sample_ids=cols[4].astype(np.int32),
        num_segments=cols[5].astype(np.int32),
        segment_rel_offset=cols[6].astype(np.int32),
        segment_rel=np.concatenate(rels).astype(np.int32),
        raw=raw,
    )


@dataclass
class TrainingBatch(ArrayBatch):
    """Right-padded training rows; each row holds one or more instances (``span`` numbers them)."""

    length: np.ndarray  # (B,) valid tokens per row
    span: np.ndarray
    labels: np.ndarray  # (B, L) int32, -100 = no loss
    task_ids: np.ndarray  # (B, L) index into task_names
    task_names: list[str]
    raw_data: list[Any]


def _label_row(
    labels: np.ndarray,
    ids: np.ndarray,
    subs: np.ndarray,
    context: np.ndarray,
    columns: dict[tuple[int, int], int],
    vocab_size: int,
    bos_id: int,
    eos_id: int,
) -> None:
    """Write one row's next-token labels into ``labels`` (see ``make_training_batch``); new ``(id, sub)``
    pairs get the next extra column in ``columns``."""
    target = ids.astype(np.int64)
    for j in np.flatnonzero(subs > 0):
        key = (int(ids[j]), int(subs[j]))
        target[j] = vocab_size + columns.setdefault(key, len(columns))
    target[ids == bos_id] = eos_id
    predict_next = ~context[:-1]
    predict_next[0] = False  # the original starts at j = 2
    labels[:-1][predict_next] = target[1:][predict_next]
    if not context[-1]:
        labels[-1] = eos_id


def make_training_batch(
    rows: Sequence[Sequence[TrainingSample]],
    *,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    length: int | None = None,
    tasks: Sequence[Sequence[str]] | None = None,
) -> TrainingBatch:
    """Pad rows of instances into a batch with next-token labels.

    Labels: position ``j-1`` predicts token ``j`` when ``j > 1`` and token ``j-1`` is not context — the
    ext column for an ext token, ``</s>`` when token ``j`` is the ``<s>`` of the next segment; the last token
    of a row predicts ``</s>`` when it is not context. Everything else is -100. The batch's extra output
    columns are the ``(id, sub > 0)`` pairs in row-major order of first appearance (a placeholder ``(0, 1)``
    when there is none, so the projection always has a column).

    ``length`` pads every row to that many tokens (default: the longest row).
    """
    row_lengths = [sum(len(inst) for inst in row) for row in rows]
    width = max(row_lengths, default=0) if length is None else length
    if any(n > width for n in row_lengths):
        raise ValueError(f"a row holds {max(row_lengths)} tokens, more than the batch length {width}")
    batch = len(rows)
    shape = (batch, width)
    out = {
        name: np.zeros(shape, dtype=np.int32)
        for name in (
            "input_ids",
            "input_id_sub",
            "sample_ids",
            "num_segments",
            "segment",
            "segment_rel_offset",
            "span",
            "task_ids",
        )
    }
    context = np.zeros(shape, dtype=bool)
    labels = np.full(shape, -100, dtype=np.int32)
    rel_width = max((sum(inst.segment_rel.shape[0] for inst in row) for row in rows), default=0)
    segment_rel = np.zeros((batch, rel_width), dtype=np.int32)
    task_names = sorted({t for row in tasks for t in row}) if tasks else []
    task_index = {name: i for i, name in enumerate(task_names)}
    columns: dict[tuple[int, int], int] = {}
    raw_data: list[Any] = []

    for b, row in enumerate(rows):
        pos = rel_pos = 0
        for span_id, inst in enumerate(row):
            n = len(inst)
            sl = slice(pos, pos + n)
            out["input_ids"][b, sl] = inst.ids
            out["input_id_sub"][b, sl] = inst.subs
            out["sample_ids"][b, sl] = inst.sample_ids
            out["num_segments"][b, sl] = inst.num_segments
            out["segment"][b, sl] = inst.segments
            out["segment_rel_offset"][b, sl] = inst.segment_rel_offset + rel_pos
            out["span"][b, sl] = span_id
            if tasks:
                out["task_ids"][b, sl] = task_index[tasks[b][span_id]]
            context[b, sl] = inst.context != 0
            segment_rel[b, rel_pos : rel_pos + inst.segment_rel.shape[0]] = inst.segment_rel
            rel_pos += inst.segment_rel.shape[0]
            pos += n
            raw_data.append(inst.raw)
        if pos:
            cells = (
                labels[b, :pos],
                out["input_ids"][b, :pos],
                out["input_id_sub"][b, :pos],
                context[b, :pos],
            )
            _label_row(*cells, columns, vocab_size, bos_id, eos_id)

    keys = list(columns) or [(0, 1)]
    return TrainingBatch(
        **{k: v for k, v in out.items() if k != "task_ids"},
        length=np.asarray(row_lengths, dtype=np.int32),
        context=context,
        segment_rel=segment_rel,
        ext_table_ids=np.asarray([k[0] for k in keys], dtype=np.int32),
        ext_table_sub=np.asarray([k[1] for k in keys], dtype=np.int32),
        labels=labels,
        task_ids=out["task_ids"],
        task_names=task_names,
        raw_data=raw_data,
    )
