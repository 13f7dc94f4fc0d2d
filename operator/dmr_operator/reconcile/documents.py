"""Walking JSON-like documents (spec fields users write freely) with readable paths. Pure."""

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
