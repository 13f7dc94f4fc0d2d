"""examples/ on the real control plane: every file applies cleanly and everything reaches Ready.

The files are server-side applied in name order, as ``kubectl apply --server-side -f examples/``
would, with the operator running. 00-pool.yaml's model-runner pods are placed by the real
scheduler on simulated nodes (one GPU node tainted like kind-config.yaml's worker, one CPU node)
and served by emulators; the Sidecar Agent gets its GPU and its model store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dmr_operator import constants
from dmr_operator.testing import cluster, manifests
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

EXAMPLES = Path(__file__).parents[2] / "examples"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
PLURALS = {constants.DMRMODEL_KIND: constants.DMRMODEL_PLURAL, "Agent": constants.AGENT_PLURAL}


def example_objects() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, document)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def sidecar_store_sizes() -> list[str]:
    return [
        obj["spec"]["runner"]["storage"]["size"]
        for _, obj in example_objects()
        if obj["kind"] == constants.AGENT_KIND
        and (obj["spec"].get("runner") or {}).get("storage", {}).get("size")
    ]


def sidecar_models() -> set[str]:
    """The DMRModels that Sidecar Agents configure on their own runners."""
    return {
        model["dmrModel"]
        for _, obj in example_objects()
        if obj["kind"] == constants.AGENT_KIND
        and (obj["spec"].get("runner") or {}).get("mode") == "Sidecar"
        for model in obj["spec"]["config"].get("models", {}).values()
        if "dmrModel" in model
    }


@pytest.fixture
def placeholder_volumes(api_client: Any, namespace: str) -> Any:
    """A volume for each Sidecar Agent's persistent model store (no provisioner here)."""
    applier = manifests.Applier(api_client)
    volumes = [
        manifests.placeholder_volume(f"{namespace}-store-{index}", size=size)
        for index, size in enumerate(sidecar_store_sizes())
    ]
    applier.apply_all(volumes)
    yield volumes
    for volume in volumes:
        applier.delete(volume)


def test_every_example_applies_and_becomes_ready(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    placeholder_volumes: Any,
) -> None:
    node_simulator.add_node(f"{namespace}-gpu-0", gpus=1, taints=[GPU_TAINT])
    node_simulator.add_node(f"{namespace}-cpu-0")
    applier = manifests.Applier(api_client, field_manager="kubectl")
    applied: dict[str, list[str]] = {}
    for file_name, obj in example_objects():
        result = applier.apply(obj, namespace=namespace)
        assert result["metadata"]["namespace"] == namespace, file_name
        applied.setdefault(obj["kind"], []).append(obj["metadata"]["name"])
    assert set(applied) == {"Service", "StatefulSet", "DMRModel", "Agent"}

    for kind in (constants.DMRMODEL_KIND, constants.AGENT_KIND):
        for name in applied[kind]:
            found = objects.wait_phase(PLURALS[kind], name, "Ready", timeout=90)
            assert found["status"]["observedGeneration"] == found["metadata"]["generation"]
    (pool_service,) = applied["Service"]
    for name in applied[constants.DMRMODEL_KIND]:
        # The pool's runner, plus the Sidecar Agent's own for the model it uses (its status may
        # land a moment after the sidecar pod's readiness gate).
        runners = 1 + (name in sidecar_models())
        status = wait_for(
            lambda name=name, runners=runners: (
                found
                if (found := objects.status(constants.DMRMODEL_PLURAL, name)).get("runnersSummary")
                == f"{runners}/{runners}"
                else None
            ),
            timeout=15,
            message=f"{name}: {runners}/{runners} runners",
        )
        assert status["endpoint"] == f"http://{pool_service}.{namespace}.svc:80/v1"
