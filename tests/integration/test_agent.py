"""Agents end to end on the real control plane: DMRModels -> rendered config -> owned children.

The operator runs as its own process; runner pools and Agents' sidecar pods are placed by the real
scheduler on simulated nodes, each runner pod served by a model-runner emulator. Covered: the
two-agent configuration of the unit golden file (handoffs, dmrModel, inline dmr/..., auto, RAG
embedding + reranking) reaching Ready with exactly that YAML in its ConfigMap and no writes after an
operator restart; a Sidecar Agent asking for more GPUs than the nodes have; a DMRModel change
rolling the agent pods and re-configuring the runners; deletion through owner references.
"""

from __future__ import annotations

import importlib.util
import secrets
import sys
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from dmr_operator import constants
from dmr_operator.reconcile import agent_workload
from dmr_operator.testing import cluster, emulator_state, podsecurity
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

AGENTS = constants.AGENT_PLURAL
DMRMODELS = constants.DMRMODEL_PLURAL
CONFIGURE_LLAMA = "/engines/llama.cpp/_configure"
GPU = "nvidia.com/gpu"


def _unit_rendering_module() -> Any:
    """The unit tests' rendering module: its two-agent config and golden file are the reference."""
    path = Path(__file__).parents[1] / "unit" / "test_agent_rendering.py"
    spec = importlib.util.spec_from_file_location("agent_rendering_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


RENDERING = _unit_rendering_module()

# The DMRModels the golden file was rendered against (tests/unit/test_agent_rendering.py).
GOLDEN_MODELS: dict[str, dict[str, Any]] = {
    "qwen": {"model": "ai/qwen3:14B", "contextSize": 32768, "thinkingBudget": "medium"},
    "coder": {
        "model": "hf.co/Qwen/Qwen2.5-Coder-7B-Instruct",
        "backend": "vllm",
        "contextSize": 16384,
        "thinkingBudget": "low",
        "runners": {"poolSelector": {"matchLabels": {constants.POOL_LABEL: "vllm"}}},
    },
    "gemma-embed": {"model": "ai/embeddinggemma", "mode": "embedding"},
    "reranker": {
        "model": "hf.co/ggml-org/qwen3-reranker-0.6b-q8_0-gguf",
        "mode": "reranking",
        "contextSize": 8192,
    },
}
EXTRA_CATALOGUE = {
    "huggingface.co/qwen/qwen2.5-coder-7b-instruct:latest": emulator_state.CatalogueModel(
        reference="huggingface.co/qwen/qwen2.5-coder-7b-instruct:latest",
        digest=emulator_state.fake_digest("coder"),
        format="safetensors",
        size=64 * 2**20,
        parameters="7.62B",
        architecture="qwen2",
    ),
    "huggingface.co/ggml-org/qwen3-reranker-0.6b-q8_0-gguf:latest": emulator_state.CatalogueModel(
        reference="huggingface.co/ggml-org/qwen3-reranker-0.6b-q8_0-gguf:latest",
        digest=emulator_state.fake_digest("reranker"),
        size=32 * 2**20,
        parameters="595.78M",
        architecture="qwen3",
        context_size=8192,
    ),
}


@pytest.fixture
def emulators() -> cluster.EmulatorFactory:
    """Overrides the shared fixture (conftest's pod_process_factory uses it): the golden file's
    two Hugging Face models in every runner's catalogue."""
    return cluster.EmulatorFactory(catalogue=EXTRA_CATALOGUE.values())


@pytest.fixture
def core(api_client: Any) -> Any:
    return kubernetes.client.CoreV1Api(api_client)


@pytest.fixture
def apps(api_client: Any) -> Any:
    return kubernetes.client.AppsV1Api(api_client)


def agent(name: str, config: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.AGENT_KIND,
        "metadata": {"name": name},
        "spec": {"config": config, **spec},
    }


def one_agent_config(model: str = "qwen") -> dict[str, Any]:
    return {
        "agents": {"root": {"model": "main", "instruction": "You help."}},
        "models": {"main": {"dmrModel": model}},
    }


def cpu_nodes(node_simulator: Any, namespace: str, count: int = 1) -> None:
    for index in range(count):
        node_simulator.add_node(f"{namespace}-cpu-{index}")


def agent_pods(core: Any, namespace: str, name: str) -> list[Any]:
    selector = f"{constants.AGENT_LABEL}={name}"
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def pod_template_hash(deployment: Any) -> str:
    return str(deployment.spec.template.metadata.annotations[constants.CONFIG_HASH_ANNOTATION])


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or () if c["type"] == kind)


def owner_uids(obj: Any) -> list[str]:
    return [o.uid for o in obj.metadata.owner_references or () if o.controller]


def resource_versions(
    core: Any, apps: Any, objects: Any, namespace: str, name: str
) -> dict[str, Any]:
    return {
        "agent": (objects.get(AGENTS, name) or {})["metadata"]["resourceVersion"],
        "configmap": core.read_namespaced_config_map(
            agent_workload.configmap_name(name), namespace
        ).metadata.resource_version,
        "deployment": apps.read_namespaced_deployment(name, namespace).metadata.resource_version,
        "service": core.read_namespaced_service(name, namespace).metadata.resource_version,
    }


def test_two_agent_config_is_ready_with_the_golden_rendering_and_quiet_after_restart(
    api_client: Any,
    operator_kubeconfig: Any,
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    apps: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    cpu_nodes(node_simulator, namespace)
    cluster.create_runner_pool(api_client, namespace=namespace, name="default")
    cluster.create_runner_pool(api_client, namespace=namespace, name="vllm")
    for name, spec in GOLDEN_MODELS.items():
        objects.create(DMRMODELS, cluster.dmrmodel(name, spec))
    objects.create(AGENTS, agent("team", RENDERING.two_agent_config(), defaultModel="ai/qwen3:14B"))

    ready = objects.wait_phase(AGENTS, "team", "Ready", timeout=60)
    status = ready["status"]
    assert status["readyModels"] == "5/5"
    assert {m["alias"]: m["dmrModel"] for m in status["models"]} == {
        "local": "qwen",
        "reranker": "reranker",
        "coder": "coder",
        "gemma-embed": "gemma-embed",
        "qwen": "qwen",
    }
    assert all(m["ready"] for m in status["models"])
    # Two agents on shared runners, but one replica and no other Agent: no unload warning.
    assert status["warnings"] == []

    expected = (
        RENDERING.GOLDEN.read_text()
        .replace("http://dmr-default.team.svc:80/v1", f"http://pool-default.{namespace}.svc:80/v1")
        .replace("http://dmr-vllm.team.svc:80/v1", f"http://pool-vllm.{namespace}.svc:80/v1")
    )
    configmap = core.read_namespaced_config_map(agent_workload.configmap_name("team"), namespace)
    # The same document as the golden file; not byte for byte, since the API server returns
    # spec.config with its keys sorted and the rendering keeps the order it is given.
    assert yaml.safe_load(configmap.data[agent_workload.CONFIG_FILE]) == yaml.safe_load(expected)
    deployment = apps.read_namespaced_deployment("team", namespace)
    assert pod_template_hash(deployment) == status["configHash"]
    assert deployment.spec.replicas == 1
    uid = ready["metadata"]["uid"]
    service = core.read_namespaced_service("team", namespace)
    assert_restricted(core, namespace, "team")
    for child in (configmap, deployment, service):
        assert owner_uids(child) == [uid]
        assert child.metadata.labels[constants.AGENT_LABEL] == "team"
        assert child.metadata.labels[constants.MANAGED_BY_LABEL] == constants.MANAGED_BY

    # The Agent's models are configured on the runners by the DMRModel machinery.
    (default_runner,) = [
        e for pod, e in emulators.in_namespace(namespace).items() if "default" in pod
    ]
    configured = {r.body["model"] for r in default_runner.calls("POST", CONFIGURE_LLAMA)}
    assert "ai/qwen3:14B" in configured

    # Steady state across an operator restart: the new process adopts what is there, no writes.
    before = resource_versions(core, apps, objects, namespace, "team")
    operator.stop()
    with OperatorProcess(
        kubeconfig=operator_kubeconfig, namespaces=[namespace], verify_interval=2
    ) as restarted:
        wait_for(
            lambda: "agent " + f"{namespace}/team: in sync" in restarted.log(),
            timeout=30,
            message="the restarted operator to look at the Agent",
        )
        assert resource_versions(core, apps, objects, namespace, "team") == before, (
            restarted.log_tail()
        )

        # A second Agent on the same runners: the team, whose agents unload on switch, is looked
        # at again and now warns about it.
        objects.create(AGENTS, agent("helper", one_agent_config()))

        def team_warnings() -> list[str]:
            return list(((objects.get(AGENTS, "team") or {}).get("status") or {})["warnings"])

        wait_for(
            lambda: any("Agent helper" in w for w in team_warnings()),
            timeout=30,
            message="the team's unload warning naming Agent helper",
        )


def test_sidecar_agent_wanting_more_gpus_than_the_nodes_have(
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    for index in range(2):
        node_simulator.add_node(f"{namespace}-gpu-{index}", gpus=1)
    objects.create(DMRMODELS, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))
    objects.create(
        AGENTS,
        agent(
            "gpu",
            one_agent_config("small"),
            replicas=3,
            runner={"mode": "Sidecar", "gpus": {"count": 1}},
        ),
    )

    def two_running_one_pending() -> dict[str, list[Any]] | None:
        pods = agent_pods(core, namespace, "gpu")
        running = [p for p in pods if p.status.phase == "Running"]
        pending = [p for p in pods if p.status.phase == "Pending"]
        return (
            {"running": running, "pending": pending}
            if (len(running), len(pending))
            == (
                2,
                1,
            )
            else None
        )

    placed = wait_for(two_running_one_pending, timeout=60, message="2 Running and 1 Pending pods")
    assert {p.spec.node_name for p in placed["running"]} == {
        f"{namespace}-gpu-0",
        f"{namespace}-gpu-1",
    }

    def degraded() -> dict[str, Any] | None:
        status = objects.status(AGENTS, "gpu")
        return (
            status
            if status.get("phase") == "Degraded" and status.get("readyReplicas") == 2
            else None
        )

    status = wait_for(degraded, timeout=60, message="Agent gpu Degraded with 2 ready pods")
    available = condition(status, "Available")
    assert (available["status"], available["reason"]) == ("True", "Unschedulable")
    assert f"Insufficient {GPU}" in available["message"]
    (pending,) = placed["pending"]
    assert any(
        w.startswith(f"pod {pending.metadata.name} cannot be scheduled") for w in status["warnings"]
    )
    assert status["readyOfDesired"] == "2/3"
    # Each running pod's own runner got the model, through its private pool.
    for pod in placed["running"]:
        assert pod.metadata.labels[constants.POOL_LABEL] == agent_workload.sidecar_pool_name("gpu")
        runner = emulators.of(namespace, pod.metadata.name)
        assert [r.body["model"] for r in runner.calls("POST", CONFIGURE_LLAMA)] == ["ai/qwen3:0.6B"]
    reasons = {e.reason for e in cluster.events_for(core.api_client, namespace, "gpu")}
    assert "Unschedulable" in reasons
    assert_restricted(core, namespace, "gpu")


def assert_restricted(core: Any, namespace: str, agent_name: str) -> None:
    """Pods the operator's workloads create meet the "restricted" Pod Security Standard."""
    pods = core.list_namespaced_pod(
        namespace, label_selector=f"{constants.AGENT_LABEL}={agent_name}"
    )
    assert pods.items
    for pod in pods.items:
        spec = core.api_client.sanitize_for_serialization(pod)["spec"]
        assert podsecurity.check_restricted(spec) == [], pod.metadata.name


def pool_agent(
    api_client: Any, namespace: str, node_simulator: Any, objects: cluster.CustomObjects
) -> dict[str, Any]:
    """A Pool-mode Agent on DMRModel qwen (one runner), Ready."""
    cpu_nodes(node_simulator, namespace)
    cluster.create_runner_pool(api_client, namespace=namespace)
    objects.create(
        DMRMODELS, cluster.dmrmodel("qwen", {"model": "ai/qwen3:0.6B", "contextSize": 4096})
    )
    objects.create(AGENTS, agent("helper", one_agent_config(), replicas=2))
    return objects.wait_phase(AGENTS, "helper", "Ready", timeout=60)


def test_dmrmodel_change_rolls_agent_pods_and_reconfigures_runners(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    apps: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    ready = pool_agent(api_client, namespace, node_simulator, objects)
    old_hash = ready["status"]["configHash"]
    old_pods = {p.metadata.name for p in agent_pods(core, namespace, "helper")}
    assert len(old_pods) == 2
    (runner,) = emulators.in_namespace(namespace).values()

    objects.patch_spec(DMRMODELS, "qwen", {"contextSize": 8192})

    def rolled() -> list[Any] | None:
        pods = agent_pods(core, namespace, "helper")
        fresh = [
            p
            for p in pods
            if p.metadata.name not in old_pods
            and p.metadata.annotations[constants.CONFIG_HASH_ANNOTATION] != old_hash
            and p.status.phase == "Running"
        ]
        return fresh if len(fresh) == 2 and len(pods) == 2 else None

    wait_for(rolled, timeout=60, message="two new agent pods with a new config hash")
    status = objects.wait_phase(AGENTS, "helper", "Ready", timeout=60)["status"]
    assert status["configHash"] != old_hash
    assert (
        pod_template_hash(apps.read_namespaced_deployment("helper", namespace))
        == status["configHash"]
    )
    configmap = core.read_namespaced_config_map(agent_workload.configmap_name("helper"), namespace)
    rendered = yaml.safe_load(configmap.data[agent_workload.CONFIG_FILE])
    assert rendered["models"]["main"]["provider_opts"] == {"context_size": 8192}
    wait_for(
        lambda: (
            [r.body.get("context-size") for r in runner.calls("POST", CONFIGURE_LLAMA)][-1:]
            == [8192]
        ),
        timeout=30,
        message="the runner re-configured with context-size 8192",
    )
    reasons = [e.reason for e in cluster.events_for(api_client, namespace, "helper")]
    assert "RollingOut" in reasons


def test_deleting_the_agent_removes_its_children_and_nothing_else(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    apps: Any,
) -> None:
    bystander = {"metadata": {"name": f"bystander-{secrets.token_hex(2)}"}, "data": {"a": "b"}}
    core.create_namespaced_config_map(namespace, bystander)
    pool_agent(api_client, namespace, node_simulator, objects)

    objects.delete(AGENTS, "helper")

    def children() -> dict[str, list[str]]:
        selector = f"{constants.AGENT_LABEL}=helper"
        return {
            "configmaps": [
                c.metadata.name
                for c in core.list_namespaced_config_map(namespace, label_selector=selector).items
            ],
            "deployments": [
                d.metadata.name
                for d in apps.list_namespaced_deployment(namespace, label_selector=selector).items
            ],
            "services": [
                s.metadata.name
                for s in core.list_namespaced_service(namespace, label_selector=selector).items
            ],
            "pods": [p.metadata.name for p in agent_pods(core, namespace, "helper")],
        }

    wait_for(
        lambda: not any(children().values()),
        timeout=60,
        message="the Agent's children garbage-collected",
    )
    assert objects.get(DMRMODELS, "qwen") is not None
    assert objects.status(DMRMODELS, "qwen")["phase"] == "Ready"
    assert core.read_namespaced_config_map(bystander["metadata"]["name"], namespace).data == {
        "a": "b"
    }
    assert core.read_namespaced_service("pool-default", namespace) is not None
    assert cluster.ready_runner_pods(api_client, namespace, "default")
    assert objects.get(AGENTS, "helper") is None


@pytest.mark.parametrize("retain", [False, True], ids=["deleted-with-agent", "retainOnDelete"])
def test_sidecar_model_store_claims_go_with_their_agent_unless_kept(
    namespace: str,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    apps: Any,
    retain: bool,
) -> None:
    """The real StatefulSet controller and garbage collector apply the retention policy the
    operator renders: the claim is owned by the StatefulSet (and deleted with the Agent) by
    default, and left alone with ``retainOnDelete``. No node is needed: the controller makes the
    claim before the pod, and the pod may stay Pending."""
    objects.create(DMRMODELS, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))
    storage = {"size": "1Gi", "retainOnDelete": retain}
    objects.create(
        AGENTS,
        agent("stored", one_agent_config("small"), runner={"mode": "Sidecar", "storage": storage}),
    )
    claim = "models-stored-0"
    pvc = wait_for(
        lambda: core.read_namespaced_persistent_volume_claim(claim, namespace),
        timeout=60,
        message=f"PersistentVolumeClaim {claim}",
        ignore=(kubernetes.client.ApiException,),
    )
    statefulset = apps.read_namespaced_stateful_set("stored", namespace)
    policy = statefulset.spec.persistent_volume_claim_retention_policy
    assert (policy.when_deleted, policy.when_scaled) == ("Retain" if retain else "Delete", "Retain")

    def owners() -> list[str]:
        found = core.read_namespaced_persistent_volume_claim(claim, namespace)
        return [f"{o.kind}/{o.name}" for o in found.metadata.owner_references or ()]

    if not retain:  # the controller hands the claim to the StatefulSet for deletion
        wait_for(
            lambda: owners() == ["StatefulSet/stored"], message="the claim owned by its StatefulSet"
        )
    assert pvc.metadata.labels[constants.AGENT_LABEL] == "stored"

    objects.delete(AGENTS, "stored")

    def statefulset_gone() -> bool:
        try:
            apps.read_namespaced_stateful_set("stored", namespace)
        except kubernetes.client.ApiException as error:
            return error.status == 404
        return False

    wait_for(statefulset_gone, timeout=60, message="the StatefulSet garbage-collected")
    wait_for(lambda: not agent_pods(core, namespace, "stored"), timeout=60, message="the pod gone")

    def names() -> list[str]:
        claims = core.list_namespaced_persistent_volume_claim(namespace).items
        return [c.metadata.name for c in claims if c.metadata.deletion_timestamp is None]

    if retain:
        assert names() == [claim]
        assert owners() == []
    else:
        wait_for(lambda: names() == [], timeout=60, message=f"{claim} deleted with the Agent")


def test_sidecar_runner_is_a_native_sidecar_restarted_and_reconfigured_on_its_own(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    cpu_nodes(node_simulator, namespace)
    objects.create(DMRMODELS, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))
    objects.create(AGENTS, agent("helper", one_agent_config("small"), runner={"mode": "Sidecar"}))

    def ready_pod() -> Any:
        pods = agent_pods(core, namespace, "helper")
        ready = [
            p
            for p in pods
            if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]
        return ready[0] if ready else None

    pod = wait_for(ready_pod, timeout=60, message="the Sidecar agent pod Ready")
    # Admitted by the real 1.37 apiserver (restricted Pod Security) as an init container that
    # keeps running; the kubelet (simulated) reports it among the init containers.
    (sidecar,) = pod.spec.init_containers
    assert (sidecar.name, sidecar.restart_policy) == (constants.RUNNER_CONTAINER, "Always")
    assert [c.name for c in pod.spec.containers] == ["docker-agent"]
    (sidecar_status,) = pod.status.init_container_statuses
    assert sidecar_status.ready and sidecar_status.state.running is not None
    runner = emulators.of(namespace, pod.metadata.name)
    assert len(runner.calls("POST", CONFIGURE_LLAMA)) == 1

    # The sidecar crashes alone: it restarts (restartCount on its init status) and the
    # operator configures the new process, docker-agent untouched.
    assert node_simulator.crash(namespace, pod.metadata.name, constants.RUNNER_CONTAINER) == 1
    wait_for(
        lambda: len(runner.calls("POST", CONFIGURE_LLAMA)) == 2,
        timeout=15,
        message="the restarted sidecar configured again",
    )
    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert pod.status.init_container_statuses[0].restart_count == 1
    assert pod.status.container_statuses[0].restart_count == 0
    assert_restricted(core, namespace, "helper")
