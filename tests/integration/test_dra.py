"""GPUs through Dynamic Resource Allocation on the real control plane.

The node simulator publishes ResourceSlices for its simulated GPUs (NVIDIA's driver name and
attributes, a memory capacity per device); the real kube-controller-manager makes ResourceClaims
from the templates, the real kube-scheduler allocates devices by the DeviceClass's and the claim's
CEL selectors and binds; the simulator then prepares the allocated devices as a driver's kubelet
plugin would. Covered: a chart pool asking for a GPU of at least 40 GiB lands only on the node
that has one, and its model is configured there, its status naming the pool pod that waits; a
Sidecar Agent's claim template (the operator's, named by its request) places its pods the same
way, a pod with no GPU left stays Pending with the scheduler's words in the Agent's status; a
changed request is a new template and the former one goes; a device selector the apiserver
refuses is the Agent's ConfigValid=False.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from dmr_operator import constants
from dmr_operator.testing import cluster, emulator_state, helm, manifests, nodesim
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

CHART = Path(__file__).parents[2] / "charts" / "dmr-operator"
AGENTS = constants.AGENT_PLURAL
DMRMODELS = constants.DMRMODEL_PLURAL
RESOURCE = ("resource.k8s.io", "v1")
AT_LEAST_40GI = "device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('40Gi')) >= 0"
POOL_STORAGE = "1Gi"
GIB = 2**30


@pytest.fixture
def core(api_client: Any) -> Any:
    return kubernetes.client.CoreV1Api(api_client)


@pytest.fixture
def custom(api_client: Any) -> Any:
    return kubernetes.client.CustomObjectsApi(api_client)


@pytest.fixture
def gpu_nodes(node_simulator: nodesim.NodeSimulator, namespace: str) -> dict[str, str]:
    """A node with one 16 GiB GPU and a node with one 80 GiB GPU, both through DRA only."""
    nodes = {"small": f"{namespace}-small", "big": f"{namespace}-big"}
    node_simulator.add_node(nodes["small"], dra_gpus=[nodesim.SimulatedGpu(memory="16Gi")])
    node_simulator.add_node(
        nodes["big"], dra_gpus=[nodesim.SimulatedGpu(memory="80Gi", product="NVIDIA-A100-80GB")]
    )
    return nodes


@pytest.fixture
def device_class(custom: Any, namespace: str) -> Iterator[str]:
    """A DeviceClass for the simulated driver's GPUs (cluster scoped: named per test)."""
    name = f"{namespace}-gpu"
    custom.create_cluster_custom_object(
        *RESOURCE,
        "deviceclasses",
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {"selectors": [{"cel": {"expression": "device.driver == 'gpu.nvidia.com'"}}]},
        },
    )
    yield name
    with contextlib.suppress(kubernetes.client.ApiException):
        custom.delete_cluster_custom_object(*RESOURCE, "deviceclasses", name)


def claim_templates(custom: Any, namespace: str) -> list[str]:
    listing = custom.list_namespaced_custom_object(*RESOURCE, namespace, "resourceclaimtemplates")
    return sorted(item["metadata"]["name"] for item in listing["items"])


def pods_by_phase(core: Any, namespace: str, selector: str) -> dict[str, list[Any]]:
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    phases: dict[str, list[Any]] = {}
    for pod in pods:
        if pod.metadata.deletion_timestamp is None:
            phases.setdefault(pod.status.phase, []).append(pod)
    return phases


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or () if c["type"] == kind)


@contextlib.contextmanager
def chart_pool(
    api_client: Any, namespace: str, selectors: list[str], replicas: int = 2
) -> Iterator[None]:
    """The chart's default runner pool, its GPUs claimed through a DeviceClass of the chart
    with these CEL ``selectors``; removed (the cluster-scoped class, the volumes) after."""
    rendered = helm.render_chart(
        CHART,
        values={
            "replicaCount": 0,
            "rbac": {"create": False},
            "serviceAccount": {"create": False},
            "crds": {"install": False},
            "metrics": {"enabled": False},
            "deviceClasses": [{"name": f"{namespace}-gpu-class", "selectors": selectors}],
            "runnerPools": [
                {
                    "name": constants.DEFAULT_POOL,
                    "accelerator": "nvidia",
                    "replicas": replicas,
                    "storage": {"size": POOL_STORAGE},
                    "gpuClaim": {"deviceClassName": f"{namespace}-gpu-class"},
                }
            ],
        },
        release=namespace,
        namespace=namespace,
    )
    wanted = {"DeviceClass", "ResourceClaimTemplate", "StatefulSet", "Service"}
    chart_objects = [o for o in helm.sort_for_install(rendered) if o["kind"] in wanted]
    assert {o["kind"] for o in chart_objects} == wanted
    applier = manifests.Applier(api_client, field_manager="helm")
    # No storage provisioner here: a placeholder volume per replica's model store.
    volumes = [
        manifests.placeholder_volume(f"{namespace}-models-{i}", size=POOL_STORAGE)
        for i in range(replicas)
    ]
    try:
        for volume in volumes:
            applier.apply(volume)
        applier.apply_all(chart_objects, namespace=namespace)
        yield
    finally:
        for obj in chart_objects:
            if obj["kind"] == "DeviceClass":
                with contextlib.suppress(kubernetes.client.ApiException):
                    applier.delete(obj)
        for volume in volumes:
            with contextlib.suppress(kubernetes.client.ApiException):
                applier.delete(volume)


def test_chart_pool_asking_for_a_big_gpu_lands_on_the_node_that_has_one(
    api_client: Any,
    namespace: str,
    node_simulator: nodesim.NodeSimulator,
    gpu_nodes: dict[str, str],
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    custom: Any,
) -> None:
    with chart_pool(api_client, namespace, ["device.driver == 'gpu.nvidia.com'", AT_LEAST_40GI]):
        objects.create(DMRMODELS, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))

        selector = f"{constants.POOL_LABEL}={constants.DEFAULT_POOL}"

        def one_running_one_pending() -> dict[str, list[Any]] | None:
            phases = pods_by_phase(core, namespace, selector)
            counts = (len(phases.get("Running", [])), len(phases.get("Pending", [])))
            return phases if counts == (1, 1) else None

        phases = wait_for(one_running_one_pending, timeout=60, message="1 Running, 1 Pending")
        (running,) = phases["Running"]
        (pending,) = phases["Pending"]
        # Only the 80 GiB GPU matches the class; the 16 GiB node is never chosen.
        assert running.spec.node_name == gpu_nodes["big"]
        assert node_simulator.devices_of(namespace, running.metadata.name) == (
            f"gpu.nvidia.com/{gpu_nodes['big']}/gpu-0",
        )
        scheduled = next(c for c in pending.status.conditions if c.type == "PodScheduled")
        assert scheduled.reason == "Unschedulable"
        assert "cannot allocate all claims" in scheduled.message
        # The claim the scheduler allocated, and the device the "driver" prepared.
        (claim_ref,) = running.status.resource_claim_statuses
        claim = custom.get_namespaced_custom_object(
            *RESOURCE, namespace, "resourceclaims", claim_ref.resource_claim_name
        )
        (result,) = claim["status"]["allocation"]["devices"]["results"]
        assert (result["pool"], result["device"]) == (gpu_nodes["big"], "gpu-0")
        (prepared,) = claim["status"]["devices"]
        assert prepared["conditions"][0]["type"] == "Ready"

        model = objects.wait_phase(DMRMODELS, "small", "Ready", timeout=60)
        assert [r["pod"] for r in model["status"]["runners"]] == [running.metadata.name]
        # The pool pod that waits is in the model's status, with the scheduler's words.
        ready = condition(model["status"], "Ready")
        assert f"pod {pending.metadata.name} cannot be scheduled: " in ready["message"]
        assert "cannot allocate all claims" in ready["message"]


# 30 GiB of weights + 1.5 GiB of KV cache: only the 80 GiB GPU holds it. 20 GiB: one copy fits
# there, a second nowhere (the other GPU has 16 GiB).
THIRTY = emulator_state.llama_like("thirty", size=30 * GIB, layers=48)
TWENTY = emulator_state.llama_like("twenty", size=20 * GIB, layers=48)


@pytest.fixture
def emulators() -> cluster.EmulatorFactory:
    return cluster.EmulatorFactory(catalogue=(THIRTY, TWENTY))


def test_placement_counts_the_memory_of_the_gpus_a_pods_claims_were_allocated(
    api_client: Any,
    namespace: str,
    gpu_nodes: dict[str, str],
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
) -> None:
    # No nvidia.com/gpu.memory label and no nvidia.com/gpu resource: the GPUs' memory is known
    # only from the devices the scheduler allocated and what their driver publishes of them.
    with chart_pool(api_client, namespace, ["device.driver == 'gpu.nvidia.com'"]):
        pods = cluster.wait_for_runner_pods(api_client, namespace, constants.DEFAULT_POOL, 2)
        node_of = {pod: core.read_namespaced_pod(pod, namespace).spec.node_name for pod in pods}
        big = next(pod for pod, node in node_of.items() if node == gpu_nodes["big"])
        small = next(pod for pod in pods if pod != big)
        for name, replicas in (("thirty", 1), ("twenty", 2)):
            spec = {"model": f"ai/{name}", "placement": {"replicas": replicas}}
            objects.create(DMRMODELS, cluster.dmrmodel(name, spec))

        def placed(name: str) -> dict[str, Any] | None:
            status = objects.status(DMRMODELS, name)
            return status if status.get("placement") and status.get("placedSummary") else None

        thirty = wait_for(lambda: placed("thirty"), timeout=60, message="thirty placed")
        assert [e["pod"] for e in thirty["placement"]] == [big], thirty
        twenty = wait_for(
            lambda: (s := placed("twenty")) and s.get("phase") == "Degraded" and s,
            timeout=60,
            message="twenty on one pod, short of the second",
        )
        ready = condition(twenty, "Ready")
        assert ready["reason"] == "Insufficient", ready
        # 80 GiB less thirty's 31.6 GiB holds it; the 16 GiB GPU is the largest free elsewhere.
        assert f"largest free 16.0 GiB on pod {namespace}/{small}" in ready["message"], ready
        assert [e["pod"] for e in twenty["placement"]] == [big]


def sidecar_agent(name: str, gpus: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.AGENT_KIND,
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "config": {
                "agents": {"root": {"model": "main", "instruction": "You help."}},
                "models": {"main": {"dmrModel": "small"}},
            },
            "runner": {"mode": "Sidecar", "gpus": gpus},
        },
    }


def test_sidecar_agent_claims_a_big_gpu_and_a_pod_without_one_says_why(
    namespace: str,
    node_simulator: nodesim.NodeSimulator,
    gpu_nodes: dict[str, str],
    device_class: str,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    custom: Any,
) -> None:
    objects.create(DMRMODELS, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))
    gpus = {"deviceClassName": device_class, "selectors": [AT_LEAST_40GI]}
    objects.create(AGENTS, sidecar_agent("gpu", gpus, replicas=2))
    selector = f"{constants.AGENT_LABEL}=gpu"

    def one_ready_one_pending() -> dict[str, Any] | None:
        status = objects.status(AGENTS, "gpu")
        phases = pods_by_phase(core, namespace, selector)
        counts = (len(phases.get("Running", [])), len(phases.get("Pending", [])))
        ready = status.get("readyReplicas") == 1 and status.get("phase") == "Degraded"
        return {"status": status, "phases": phases} if ready and counts == (1, 1) else None

    seen = wait_for(one_ready_one_pending, timeout=90, message="Agent gpu: 1 ready, 1 Pending")
    (running,) = seen["phases"]["Running"]
    assert running.spec.node_name == gpu_nodes["big"]
    assert node_simulator.devices_of(namespace, running.metadata.name) == (
        f"gpu.nvidia.com/{gpu_nodes['big']}/gpu-0",
    )
    available = condition(seen["status"], "Available")
    assert (available["status"], available["reason"]) == ("True", "Unschedulable")
    assert "cannot allocate all claims" in available["message"]
    (template,) = claim_templates(custom, namespace)
    assert template.startswith("gpu-gpus-")
    # The sidecar's own runner got the model (configured through its private pool).
    assert running.metadata.labels[constants.POOL_LABEL]

    # A changed request is a new template (the apiserver refuses edits to one); the former goes.
    objects.patch_spec(AGENTS, "gpu", {"replicas": 1, "runner": {"gpus": {"selectors": None}}})

    def replaced() -> list[str] | None:
        names = claim_templates(custom, namespace)
        return names if len(names) == 1 and names[0] != template else None

    (new_template,) = wait_for(replaced, timeout=60, message="a new claim template, the old gone")
    assert new_template.startswith("gpu-gpus-")


def test_device_selector_the_apiserver_refuses_is_the_agents_config_error(
    namespace: str,
    device_class: str,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    custom: Any,
) -> None:
    objects.create(DMRMODELS, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))
    gpus = {"deviceClassName": device_class, "selectors": ["device.memory >"]}
    objects.create(AGENTS, sidecar_agent("bad", gpus))

    def config_valid() -> dict[str, Any] | None:
        status = objects.status(AGENTS, "bad")
        return next((c for c in status.get("conditions") or () if c["type"] == "ConfigValid"), None)

    def refused() -> dict[str, Any] | None:
        valid = config_valid()
        return valid if valid and valid["status"] == "False" else None

    valid = wait_for(refused, timeout=60, message="Agent bad ConfigValid=False")
    assert "spec.runner.gpus: the apiserver refused the GPU claim template" in valid["message"]
    assert "selectors" in valid["message"]
    # Nothing was rolled out from it, and no retry loop: no workload, no template.
    assert claim_templates(custom, namespace) == []
    assert (
        core.list_namespaced_pod(namespace, label_selector=f"{constants.AGENT_LABEL}=bad").items
        == []
    )
    assert operator.log().count("GPU claim template refused") == 1
    # A change that leaves the GPU request as it was is planned without asking the apiserver
    # again: the refusal is remembered for that request, so there is no retry loop.
    patched = objects.patch_spec(AGENTS, "bad", {"env": [{"name": "LOG_LEVEL", "value": "debug"}]})
    generation = patched["metadata"]["generation"]

    def planned_again() -> dict[str, Any] | None:
        valid = config_valid()
        return valid if valid and valid.get("observedGeneration") == generation else None

    again = wait_for(planned_again, timeout=60, message="ConfigValid of the new generation")
    assert again["status"] == "False"
    assert operator.log().count("GPU claim template refused") == 1
