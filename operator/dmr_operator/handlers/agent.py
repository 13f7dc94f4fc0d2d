"""kopf handlers for Agents and what they are made of: watch events in, ``AgentController`` acts.

Agents, DMRModels (their status decides resolution and readiness), and the Agents' own workloads,
pods and Services (selected by the ``dmr.dev/agent`` label). No finalizer: children go with their
owner references.
"""

from __future__ import annotations

from typing import Any

import kopf

from dmr_operator import constants

_AGENT_CHILD = {constants.AGENT_LABEL: kopf.PRESENT}


def _deleted(event: kopf.RawEvent) -> bool:
    return event["type"] == "DELETED"


@kopf.on.event(constants.GROUP, constants.VERSION, constants.AGENT_PLURAL)
async def agent_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    body = event["object"]
    if _deleted(event):
        metadata = body.get("metadata") or {}
        memo.agents.agent_gone(str(metadata.get("namespace")), str(metadata.get("name")))
    else:
        memo.agents.agent_changed(body)


@kopf.on.event(constants.GROUP, constants.VERSION, constants.DMRMODEL_PLURAL)
async def agent_dmrmodel_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.agents.dmrmodel_changed(event["object"], deleted=_deleted(event))


@kopf.on.event("apps", "v1", "deployments", labels=_AGENT_CHILD)
@kopf.on.event("apps", "v1", "statefulsets", labels=_AGENT_CHILD)
async def agent_workload_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.agents.workload_changed(event["object"], deleted=_deleted(event))


@kopf.on.event("", "v1", "pods", labels=_AGENT_CHILD)
async def agent_pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.agents.pod_changed(event["object"], deleted=_deleted(event))


@kopf.on.event("", "v1", "services", labels=_AGENT_CHILD)
async def agent_service_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.agents.service_changed(event["object"], deleted=_deleted(event))


@kopf.on.event("", "v1", "configmaps", labels=_AGENT_CHILD)
async def agent_configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.agents.configmap_changed(event["object"], deleted=_deleted(event))
