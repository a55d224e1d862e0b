"""Mapping templates that reshape raw records into CPM-Bee inputs (the ``transforms`` of a dataset config).

A template is a (nested) dict whose leaves are either constants or ``"$a.b.c"`` paths into the record.
Nested template keys address nested output keys. ``*`` in a source path walks every key of a dict; the
keys it meets fill the ``*`` of the target, in order, so the two must have the same number of ``*``::

    {"input": "$text", "*": "$fields.*", "<ans>": "$answer"}
    # {"text": "t", "fields": {"k1": "v1"}, "answer": "a"} -> {"input": "t", "k1": "v1", "<ans>": "a"}

Output keys come in template order (a ``*`` expands in the record's key order). Errors are ``ValueError``
naming the template entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["apply_transform", "validate_template"]


def _flatten(template: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in template.items():
        target = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.extend(_flatten(value, target))
        elif isinstance(value, str):
            out.append((target, value))
        else:
            raise ValueError(
                f"transform entry {target!r}: expected a string or a dict, got {type(value).__name__}"
            )
    return out


def validate_template(template: Any) -> None:
    """Raise ``ValueError`` if ``template`` is not a well-formed mapping template."""
    if not isinstance(template, Mapping):
        raise ValueError(f"a transform template must be a dict, got {type(template).__name__}")
    for target, source in _flatten(template):
        stars_target = target.split(".").count("*")
        if source.startswith("$"):
            stars_source = source[1:].split(".").count("*")
            if stars_source != stars_target:
                raise ValueError(
                    f"transform entry {target!r}: {stars_target} '*' in the target but {stars_source} in {source!r}"
                )
        elif stars_target:
            raise ValueError(f"transform entry {target!r}: a constant value cannot have '*' in its target")


def _expand(
    data: Any, path: list[str], stars: list[str], target: str, source: str, out: list[tuple[str, Any]]
) -> None:
    if not path:
        parts = target.split(".")
        if parts.count("*") != len(stars):
            raise ValueError(f"transform entry {target!r}: '*' count differs from {source!r}")
        it = iter(stars)
        out.append((".".join(next(it) if p == "*" else p for p in parts), data))
        return
    if not isinstance(data, Mapping):
        raise ValueError(
            f"transform entry {target!r}: {source!r} walks into a {type(data).__name__}, not a dict"
        )
    head, rest = path[0], path[1:]
    if head == "*":
        for key, value in data.items():
            _expand(value, rest, [*stars, key], target, source, out)
    elif head in data:
        _expand(data[head], rest, stars, target, source, out)
    else:
        raise ValueError(f"transform entry {target!r}: the record has no key {head!r} (source {source!r})")


def apply_transform(data: Any, template: Mapping[str, Any] | None) -> Any:
    """Reshape one record with a mapping template (``None`` returns the record unchanged)."""
    if template is None:
        return data
    mapping: list[tuple[str, Any]] = []
    for target, source in _flatten(template):
        if source.startswith("$"):
            _expand(data, source[1:].split("."), [], target, source, mapping)
        elif "*" in target.split("."):
            raise ValueError(f"transform entry {target!r}: a constant value cannot have '*' in its target")
        else:
            mapping.append((target, source))
    result: dict[str, Any] = {}
    for target, value in mapping:
        *parents, leaf = target.split(".")
        node = result
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(f"transform entry {target!r}: {key!r} is already a value, not a dict")
            node = child
        node[leaf] = value
    return result
