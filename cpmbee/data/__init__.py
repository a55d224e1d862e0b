"""Training data: record transforms, instance building and best-fit packing into fixed-length rows.

Pre-training data (import the submodules): ``shards`` (the indexed, append-able dataset format and its
resumable block cursor), ``tools`` (build from JSONL, shuffle, merge, mask, compact), ``mixture``
(``datasets.json``-style mixtures with hot reload), ``pipeline`` (a rank's batches, with workers and exact
resume), ``corpus`` (readers for the real offline corpora)."""

from .packing import BatchPacker, InstanceBuilder
from .transforms import apply_transform, validate_template

__all__ = ["BatchPacker", "InstanceBuilder", "apply_transform", "validate_template"]
