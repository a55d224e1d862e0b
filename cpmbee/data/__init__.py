"""Training data: record transforms, instance building and best-fit packing into fixed-length rows."""

from .packing import BatchPacker, InstanceBuilder
from .transforms import apply_transform, validate_template

__all__ = ["BatchPacker", "InstanceBuilder", "apply_transform", "validate_template"]
