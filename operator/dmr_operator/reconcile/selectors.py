"""Kubernetes label-selector matching, as the API server evaluates it, for in-memory pod sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy a LabelSelector given as its API dict (camelCase keys).

    An empty selector matches everything, like the API server's; callers that must not select
    everything pass a default selector instead of an empty one.
    """
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    return all(_requirement_holds(r, labels) for r in selector.get("matchExpressions") or ())


def _requirement_holds(requirement: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key = requirement["key"]
    operator = requirement["operator"]
    values: Sequence[str] = requirement.get("values") or ()
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown label selector operator {operator!r}")


def implied_labels(selector: Mapping[str, Any] | None) -> dict[str, str]:
    """Labels every selected object must carry (matchLabels and single-value In)."""
    if not selector:
        return {}
    labels = dict(selector.get("matchLabels") or {})
    for requirement in selector.get("matchExpressions") or ():
        values = requirement.get("values") or []
        if requirement.get("operator") == "In" and len(values) == 1:
            labels[requirement["key"]] = values[0]
    return labels
