"""The model's inputs, named once.

A CPM-Bee forward takes ``input_ids`` plus up to twelve more ``(B, L)``-shaped tensors that describe where
each token sits in the structured prompt. ``CpmBeeInputs`` names and documents them; every producer
(``cpmbee.prompt``'s batches, the tokenizer, the fine-tuning collator, the decoder's per-step inputs) builds
one, and ``CpmBeeForCausalLM.forward(input_ids, **inputs: Unpack[CpmBeeInputs])`` takes it, so
``model(**batch)`` works and the type checker checks every key at every call.

It is a ``TypedDict`` (a plain ``dict`` at run time), as ``transformers`` types its forward keywords:
``BatchEncoding`` and the collators' dicts *are* such inputs without conversion, and per-row operations of a
decoding engine (keep rows, move to a device) stay one-line dict comprehensions, see ``to_device`` and
``select_rows``.

``TokenMeta`` is the per-token metadata that the attention mask and the position bias read: for the new
tokens of a forward (queries), and — through ``CpmBeeCache.append`` — for every cached token (keys).

This module does not import torch at run time (the CLI reads the names without loading it).
"""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from typing_extensions import NotRequired

if TYPE_CHECKING:
    import torch

__all__ = [
    "BATCH_NAMES",
    "MODEL_INPUT_NAMES",
    "CpmBeeBatch",
    "CpmBeeInputs",
    "TokenMeta",
    "select_rows",
    "to_device",
]


class CpmBeeInputs(TypedDict, total=False):
    """The forward's keyword tensors besides ``input_ids``; all ``(B, L)`` integer tensors unless noted.

    Every key is optional: a missing one takes the default given, which describes a single plain segment.
    """

    input_id_sub: "torch.Tensor"
    """Sub index of each token: tells ``<mask_0>`` from ``<mask_1>`` (default 0)."""
    position: "torch.Tensor"
    """Position of each token in its sample (default ``arange`` after the cached tokens)."""
    context: "torch.Tensor"
    """Bool, True for given tokens; False for answer tokens, which see only what precedes them (default True)."""
    sample_ids: "torch.Tensor"
    """0 for the main sample, k for in-context sample k (default 0)."""
    num_segments: "torch.Tensor"
    """Segment count of each token's sample; 0 marks left padding (default 1)."""
    segment: "torch.Tensor"
    """Segment index of each token (default 0)."""
    segment_rel_offset: "torch.Tensor"
    """Offset of each token's sample table in ``segment_rel`` (default 0)."""
    segment_rel: "torch.Tensor"
    """``(B, R)`` flattened segment-relation tables, ``num_segments²`` entries per sample (default one 0)."""
    span: "torch.Tensor"
    """Index of the packed instance a token belongs to; instances never see each other (default 0)."""
    length: "torch.Tensor"
    """``(B,)`` valid tokens of right-padded training rows; positions beyond are padding. Without it, padding
    is ``num_segments == 0`` (left padding, generation)."""
    ext_table_ids: "torch.Tensor"
    """``(E,)`` family id of each extra output column of the batch (default none)."""
    ext_table_sub: "torch.Tensor"
    """``(E,)`` sub index of each extra output column (required with ``ext_table_ids``)."""


class CpmBeeBatch(CpmBeeInputs):
    """A whole batch as the producers hand it over: ``input_ids`` ``(B, L)``, the inputs, and for training
    ``labels`` ``(B, L)`` (next-token targets, ``V + k`` = ext column k, -100 = no loss)."""

    input_ids: "torch.Tensor"
    labels: NotRequired["torch.Tensor"]


class TokenMeta(TypedDict):
    """Per-token metadata of queries or keys, each ``(B, L)`` (queries) or ``(B, K)`` (keys)."""

    position: "torch.Tensor"
    context: "torch.Tensor"  # bool
    sample_ids: "torch.Tensor"
    segment: "torch.Tensor"
    span: "torch.Tensor"
    valid: "torch.Tensor"  # bool: a real token, not padding


MODEL_INPUT_NAMES: tuple[str, ...] = ("input_ids", *CpmBeeInputs.__annotations__)
"""Every tensor ``forward`` reads, in one order."""

BATCH_NAMES: tuple[str, ...] = (*MODEL_INPUT_NAMES, "labels")
"""``MODEL_INPUT_NAMES`` plus training ``labels``: the keys a batch may have."""


def to_device(inputs: Mapping[str, Any], device: Any) -> dict[str, Any]:
    """A copy of ``inputs`` with every tensor moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}


# per-row inputs: everything but the batch-wide ext-column tables
_BATCH_WIDE = frozenset({"ext_table_ids", "ext_table_sub"})


def select_rows(inputs: Mapping[str, Any], rows: "torch.Tensor | Sequence[int]") -> dict[str, Any]:
    """The rows ``rows`` of a batch (in that order; repeats allowed, e.g. for beams). The batch-wide
    ext-column tables are kept whole."""
    return {k: v if k in _BATCH_WIDE else v[rows] for k, v in inputs.items()}
