"""JSON-like documents: walking them with readable paths, keeping watched objects lean. Pure."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any, Final

# What identifies a watched object, for status patches and Events about it.
_IDENTITY: Final = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
)
# Strings up to this long are shared among objects (condition types, reasons, phases, model and
# pod names, timestamps); longer ones (messages) are kept as they are.
_SHARED_STRING_MAX: Final = 64


def iter_keys(value: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every mapping key at every depth as (path, key, value): ``a.b[2].c``-style paths."""
    if isinstance(value, Mapping):
        for key, child in value.items():
            where = f"{path}.{key}" if path else str(key)
            yield where, str(key), child
            yield from iter_keys(child, where)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from iter_keys(child, f"{path}[{index}]")


def without_managed_fields(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """``body`` without ``metadata.managedFields``: server-side-apply bookkeeping, often the
    largest part of an object and never read here. Controllers keep thousands of watched
    objects in memory."""
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping) or "managedFields" not in metadata:
        return body
    return {
        **body,
        "metadata": {k: v for k, v in metadata.items() if k != "managedFields"},
    }


def lean(body: Mapping[str, Any], *parts: str) -> dict[str, Any]:
    """What a controller keeps of a watched object: apiVersion, kind, the metadata that
    identifies it and the top-level ``parts`` asked for (e.g. ``status``), compacted.

    Decoded JSON gives every object its own copy of every key and value: kept as watched,
    3,000 DMRModels and their 3,000 Services held 56 MB (bench/placement_scale.py), and their
    annotations (kubectl's last-applied-configuration), labels and managedFields are never
    read back."""
    metadata = body.get("metadata") or {}
    kept: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {key: metadata[key] for key in _IDENTITY if key in metadata},
    }
    for part in parts:
        if part in body:
            kept[part] = body[part]
    compacted: dict[str, Any] = compact(kept)
    return compacted


def compact(value: Any) -> Any:
    """A copy of a JSON-like value whose mapping keys and short strings are interned: equal
    strings in thousands of objects are then one string in memory."""
    if isinstance(value, Mapping):
        return {sys.intern(str(key)): compact(child) for key, child in value.items()}
    if isinstance(value, list):
        return [compact(child) for child in value]
    if isinstance(value, str) and len(value) <= _SHARED_STRING_MAX:
        return sys.intern(value)
    return value
