"""Standard Kubernetes conditions: building them and merging them without spurious writes.

A condition's ``lastTransitionTime`` changes only when its ``status`` changes, so recomputing the
same state twice yields byte-identical status and costs no write (the steady-state promise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ConditionUpdate:
    """The part of a condition the reconciler decides; timestamps are filled in by ``merge``."""

    type: str
    status: Status
    reason: str
    message: str = ""


STALLED = "Stalled"


def stalled(reason: str, message: str) -> ConditionUpdate:
    """``Stalled=True``: kstatus (Flux) reports the object Failed at once instead of waiting out
    its timeout. Only for states that need a person (a spec to fix); absent otherwise, as
    kstatus wants abnormal-true conditions."""
    return ConditionUpdate(STALLED, "True", reason, message)


def merge_conditions(
    previous: Iterable[Mapping[str, Any]] | None,
    updates: Sequence[ConditionUpdate],
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """New condition list in the order of ``updates``; keeps transition times that still hold."""
    old = {str(c.get("type")): c for c in previous or ()}
    merged: list[dict[str, Any]] = []
    for update in updates:
        before = old.get(update.type)
        unchanged = before is not None and before.get("status") == update.status
        transition = str(before.get("lastTransitionTime")) if unchanged and before else now
        condition: dict[str, Any] = {
            "type": update.type,
            "status": update.status,
            "reason": update.reason,
            "message": update.message,
            "lastTransitionTime": transition,
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        merged.append(condition)
    return merged


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    condition = find(conditions, type_)
    return condition is not None and condition.get("status") == "True"
