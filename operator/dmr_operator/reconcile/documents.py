"""JSON-like documents: walking them with readable paths, keeping watched objects lean. Pure."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


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
