"""Where a placed DMRModel is served from: the pod label that marks its holders, its Service, and
what each runner pod can hold. Pure.

With ``spec.placement.replicas`` a model lives on only some pods of its pool
(``reconcile.placement`` chooses them), so the pool's Service would send its requests to pods
without it. Instead each placed DMRModel gets its own Service, selecting the pool's labels plus
``placement.dmr.dev/<model>: "true"``; the operator puts that label on a pod once the model is
configured and verified there, and takes it off before the model is unloaded from the pod. The
Service's endpoints are therefore exactly the pods holding the model, and they follow moves.
A label per model (not one label listing models) because a Service selects by equality only.

Neighbours: ``controllers.model_placement`` applies these (pod label patches, the Service) and
feeds ``reconcile.placement`` with the budgets ``pod_budget`` computes from Nodes.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from dmr_operator import constants
from dmr_operator.reconcile import capacity, placement
from dmr_operator.reconcile import runners as runner_views

PLACEMENT_LABEL_PREFIX: Final = constants.PLACEMENT_LABEL_PREFIX
SERVICE_PREFIX: Final = "dmrm-"
# A label name (the part after the prefix) and a Service name (DNS-1035) both end at 63.
_NAME_MAX: Final = 63
_LABEL_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
_QUANTITY: Final = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|[kmu]|)$")
_QUANTITY_UNITS: Final = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def _shortened(name: str, room: int) -> str:
    """``name`` if it fits in ``room`` characters, else a prefix of it and a hash of all of it
    (two long names sharing a prefix still differ)."""
    if len(name) <= room:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: room - 11].rstrip('-.')}-{digest}"


@functools.lru_cache(maxsize=65536)
def placement_label(model_name: str) -> str:
    """The pod label key saying "this pod serves DMRModel ``model_name``" (value "true")."""
    name = model_name if _LABEL_NAME.match(model_name) else model_name.lower()
    return PLACEMENT_LABEL_PREFIX + _shortened(name, _NAME_MAX)


def orphan_placement_labels(pod_labels: Mapping[str, str], model_names: Iterable[str]) -> list[str]:
    """The placement labels on a pod that name no DMRModel of its namespace (deleted while the
    operator was away): its Service went with the model, the label is all that is left."""
    wanted = {placement_label(name) for name in model_names}
    return sorted(
        label
        for label in pod_labels
        if label.startswith(PLACEMENT_LABEL_PREFIX) and label not in wanted
    )


def model_service_name(model_name: str) -> str:
    """The model's Service: a DNS-1035 label (DMRModel names may carry dots)."""
    room = _NAME_MAX - len(SERVICE_PREFIX)
    return SERVICE_PREFIX + _shortened(model_name.replace(".", "-"), room)


def model_service_endpoint(model_name: str, namespace: str) -> str:
    """The OpenAI base URL of the model's Service (the /v1 alias, as for pools)."""
    return f"http://{model_service_name(model_name)}.{namespace}.svc:80/v1"


def render_model_service(
    *,
    model_name: str,
    namespace: str,
    pool_labels: Mapping[str, str],
    owner: Mapping[str, Any],
) -> dict[str, Any]:
    """The Service whose endpoints are the pods holding the model; owned by the DMRModel, so
    the garbage collector removes it with the model."""
    owner_metadata = owner.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": model_service_name(model_name),
            "namespace": namespace,
            "labels": {
                constants.MODEL_LABEL: _shortened(model_name, _NAME_MAX),
                constants.MANAGED_BY_LABEL: constants.MANAGED_BY,
            },
            "ownerReferences": [
                {
                    "apiVersion": constants.API_VERSION,
                    "kind": constants.DMRMODEL_KIND,
                    "name": owner_metadata.get("name"),
                    "uid": owner_metadata.get("uid"),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {**pool_labels, placement_label(model_name): "true"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": constants.RUNNER_PORT_NAME},
                {
                    "name": constants.RUNNER_PORT_NAME,
                    "port": constants.RUNNER_PORT,
                    "targetPort": constants.RUNNER_PORT_NAME,
                },
            ],
        },
    }


def memory_in_bytes(quantity: Any) -> int | None:
    """A Kubernetes memory quantity (``32Gi``, ``64000000k``, ``1e9`` not taken) in bytes."""
    matched = _QUANTITY.match(str(quantity or "").strip())
    if matched is None or matched.group(2) in ("m", "u"):
        return None
    return int(float(matched.group(1)) * _QUANTITY_UNITS[matched.group(2)])


def pod_budget(
    runner: runner_views.Runner,
    node: Mapping[str, Any],
    *,
    pools: frozenset[str] = frozenset(),
    claimed_gpu_memory: int | None = None,
) -> placement.RunnerPod | None:
    """What a runner pod can hold: its runner slots, its GPUs' memory (the devices its DRA
    claims were allocated, ``claimed_gpu_memory``; else the GPUs its pod asks for x
    ``nvidia.com/gpu.memory`` of its node), else host memory: its container's memory limit
    (the cgroup that would kill it), or without one its node's allocatable memory.
    None when the node says too little to decide (no CPU count)."""
    runner_capacity = capacity.capacity_of(node, pod_gpus=runner.gpus)
    if runner_capacity is None:
        return None
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return placement.RunnerPod(
        key=runner.key,
        pools=pools,
        node=runner.node or "",
        slots=runner_capacity.slots,
        gpu_memory_bytes=claimed_gpu_memory or runner_capacity.gpu_memory or 0,
        host_memory_bytes=memory_in_bytes(runner.memory_limit)
        or memory_in_bytes(allocatable.get("memory"))
        or 0,
    )


def claimed_gpu_memory(
    claims: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]]
) -> int | None:
    """The memory of the devices allocated to ``claims`` (ResourceClaims), from the capacity
    their driver publishes for them (``capacity.memory`` of the device in its ResourceSlice).
    None when no allocated device has a memory capacity (not a GPU, or its slice unknown)."""
    published: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for resource_slice in slices:
        spec = resource_slice.get("spec") or {}
        pool_name = str((spec.get("pool") or {}).get("name"))
        for device in spec.get("devices") or ():
            published[str(spec.get("driver")), pool_name, str(device.get("name"))] = device
    total, known = 0, False
    for claim in claims:
        allocation = (claim.get("status") or {}).get("allocation") or {}
        for result in (allocation.get("devices") or {}).get("results") or ():
            device = published.get(
                (str(result.get("driver")), str(result.get("pool")), str(result.get("device")))
            )
            memory = ((device or {}).get("capacity") or {}).get("memory") or {}
            size = memory_in_bytes(memory.get("value"))
            if size:
                total, known = total + size, True
    return total if known else None
