"""Leader election rules over a ``coordination.k8s.io/v1`` Lease, pure: who may lead, what to write.

Only one operator replica may talk to runners: two actors would configure every runner twice and
fight over status. The elected replica holds a Lease in its own namespace and renews it; the
others wait until it is released or has not been renewed for a whole lease duration. This module
decides (``LeaseView``, ``Observation``, ``claim``); ``controllers/leadership.py`` does the I/O.

Expiry is judged on this process's monotonic clock from the moment it *observed* the holder's
last renewal, not from the ``renewTime`` written by another machine, so clock skew between nodes
cannot hand the lease to two replicas (the rule client-go's leader election follows too).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

API_VERSION = "coordination.k8s.io/v1"


@dataclasses.dataclass(frozen=True)
class LeaseTimings:
    """How long a lease lasts, how long a leader keeps trying to renew, how often it tries.

    The renew deadline is shorter than the duration, so a leader that cannot renew stops acting
    before any standby may take over.
    """

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    @classmethod
    def for_duration(cls, duration: float) -> LeaseTimings:
        """client-go's default proportions (15 s / 10 s / 2 s) scaled to ``duration``."""
        return cls(duration=duration, renew_deadline=duration * 2 / 3, retry_period=duration / 7.5)

    def problems(self) -> list[str]:
        found = []
        if self.duration < 1:
            found.append("lease duration must be at least 1 s")
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            found.append("need 0 < retry period < renew deadline < lease duration")
        return found


@dataclasses.dataclass(frozen=True)
class LeaseView:
    """The parts of a Lease that matter to the election."""

    holder: str
    duration_seconds: int
    renew_time: str | None
    transitions: int
    resource_version: str | None

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> LeaseView:
        spec = lease.get("spec") or {}
        metadata = lease.get("metadata") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=metadata.get("resourceVersion"),
        )


@dataclasses.dataclass(frozen=True)
class Observation:
    """A lease record as this process saw it, and when (monotonic seconds) it last changed."""

    lease: LeaseView
    changed_at: float

    def after(self, lease: LeaseView, now: float) -> Observation:
        """The observation once ``lease`` has been read at ``now``: the clock restarts on change."""
        same = (lease.holder, lease.renew_time) == (self.lease.holder, self.lease.renew_time)
        return Observation(lease=lease, changed_at=self.changed_at if same else now)

    def free_for(self, identity: str, now: float) -> bool:
        """May ``identity`` take (or keep) the lease at ``now``?"""
        holder = self.lease.holder
        if not holder or holder == identity:
            return True
        return now - self.changed_at >= self.lease.duration_seconds


def claim(
    current: LeaseView | None,
    *,
    identity: str,
    timings: LeaseTimings,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The Lease ``spec`` to write to take or renew leadership.

    ``acquireTime`` and ``leaseTransitions`` change only when the holder changes, so a renewal
    rewrites ``renewTime`` and nothing else a person would look at.
    """
    stamp = micro_time(now)
    spec: dict[str, Any] = {
        "holderIdentity": identity,
        "leaseDurationSeconds": max(1, round(timings.duration)),
        "renewTime": stamp,
    }
    if current is None:
        spec |= {"acquireTime": stamp, "leaseTransitions": 0}
    elif current.holder != identity:
        spec |= {"acquireTime": stamp, "leaseTransitions": current.transitions + 1}
    return spec


def released() -> dict[str, Any]:
    """The ``spec`` fields a leader writes when it stops: the lease is free at once.

    ``leaseDurationSeconds`` of 1 also frees it for a replica that does not treat an empty
    holder as free.
    """
    return {"holderIdentity": None, "leaseDurationSeconds": 1}


def micro_time(now: datetime.datetime) -> str:
    """Kubernetes ``MicroTime`` (RFC 3339 with microseconds, UTC)."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
