"""kopf handlers for what runners are made of: model-runner pods and the Services in front."""

from __future__ import annotations

from typing import Any

import kopf

from dmr_operator import constants


@kopf.on.event("", "v1", "pods", labels={constants.POOL_LABEL: kopf.PRESENT})
async def runner_pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A runner pod appeared, changed (IP, readiness, restarts) or went away."""
    memo.dmrmodels.pod_changed(event["object"], deleted=event["type"] == "DELETED")


@kopf.on.event("", "v1", "services", labels={constants.AGENT_LABEL: kopf.ABSENT})
async def service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Services decide the endpoint a DMRModel publishes for its pool (an Agent's own do not)."""
    memo.dmrmodels.service_changed(event["object"], deleted=event["type"] == "DELETED")
