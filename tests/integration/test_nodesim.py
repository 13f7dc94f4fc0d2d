"""The node simulator on the real control plane: GPU scheduling by the real scheduler, one
loopback address per pod reachable over HTTP, crashes and restarts, readiness gates, deletion,
and a drain that lets a pod serve through its preStop sleep."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import httpx
import kubernetes
import pytest
from aiohttp import web

from dmr_operator import constants
from dmr_operator.reconcile import agent_workload
from dmr_operator.testing import cluster, nodesim
from dmr_operator.testing.waiting import wait_for

GPU = "nvidia.com/gpu"


class HelloProcess:
    """A stand-in for the process behind a pod: answers GET / with who it is and its start count."""

    def __init__(self, pod: dict[str, Any]) -> None:
        self.pod_name = pod["metadata"]["name"]
        self.starts = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/", self._hello)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.starts += 1

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"{self.pod_name} start {self.starts}")


@pytest.fixture
def pod_process_factory() -> nodesim.PodProcessFactory:
    return HelloProcess


@pytest.fixture
def core(api_client: Any) -> Any:
    return kubernetes.client.CoreV1Api(api_client)


@pytest.fixture
def isolation() -> dict[str, str]:
    """A label only this test's nodes carry: pods select it, so other tests' nodes never matter."""
    return {"test.dmr.dev/run": secrets.token_hex(4)}


def make_pod(
    name: str,
    *,
    node_selector: dict[str, str],
    gpus: int = 0,
    port: int = 8000,
    labels: dict[str, str] | None = None,
    readiness_gates: list[str] | None = None,
    pre_stop_sleep: int = 0,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "example.invalid/hello:1",
        "ports": [{"name": "http", "containerPort": port}],
        "securityContext": agent_workload.container_security(read_only_root=True),
    }
    if pre_stop_sleep:
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": pre_stop_sleep}}}
    if gpus:
        container["resources"] = {"limits": {GPU: str(gpus)}}
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "securityContext": dict(cluster.RESTRICTED_POD_SECURITY),
            "containers": [container],
            "nodeSelector": node_selector,
            "readinessGates": [{"conditionType": gate} for gate in readiness_gates or []],
        },
    }


def pod_condition(pod: Any, kind: str) -> str | None:
    for condition in pod.status.conditions or []:
        if condition.type == kind:
            return str(condition.status)
    return None


def wait_for_pod(
    core: Any, namespace: str, name: str, predicate: Callable[[Any], bool], what: str
) -> Any:
    def matching() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if predicate(pod) else None

    return wait_for(
        matching,
        timeout=30,
        message=f"pod {namespace}/{name} {what}",
    )


def is_ready(pod: Any) -> bool:
    return pod.status.phase == "Running" and pod_condition(pod, "Ready") == "True"


def get(url: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=5) as client:
        return client.get(url)


def test_scheduler_places_gpu_pod_only_on_node_with_free_gpu(
    core: Any, namespace: str, node_simulator: nodesim.NodeSimulator, isolation: dict[str, str]
) -> None:
    gpu_node, cpu_node = (
        f"gpu-{isolation['test.dmr.dev/run']}",
        f"cpu-{isolation['test.dmr.dev/run']}",
    )
    node_simulator.add_node(gpu_node, gpus=1, labels=isolation)
    node_simulator.add_node(cpu_node, gpus=0, labels=isolation)
    gpu_labels = core.read_node(gpu_node).metadata.labels
    assert gpu_labels[nodesim.GPU_PRESENT_LABEL] == "true"

    for name in ("first", "second"):
        core.create_namespaced_pod(namespace, make_pod(name, node_selector=isolation, gpus=1))

    def placement() -> dict[str, Any] | None:
        pods = {p.metadata.name: p for p in core.list_namespaced_pod(namespace).items}
        running = [p for p in pods.values() if p.status.phase == "Running"]
        unschedulable = [
            p
            for p in pods.values()
            if any(
                c.type == "PodScheduled" and c.reason == "Unschedulable"
                for c in p.status.conditions or []
            )
        ]
        return {"running": running, "pending": unschedulable} if running and unschedulable else None

    outcome = wait_for(placement, timeout=30, message="one GPU pod running, one unschedulable")
    (running,), (pending,) = outcome["running"], outcome["pending"]
    assert running.spec.node_name == gpu_node
    assert pending.status.phase == "Pending"
    assert pending.spec.node_name is None


def test_pods_get_distinct_loopback_addresses_reachable_over_http(
    core: Any, namespace: str, node_simulator: nodesim.NodeSimulator, isolation: dict[str, str]
) -> None:
    node_simulator.add_node(f"n-{isolation['test.dmr.dev/run']}", labels=isolation)
    for name in ("alpha", "beta"):
        core.create_namespaced_pod(namespace, make_pod(name, node_selector=isolation, port=8000))
    pods = [wait_for_pod(core, namespace, n, is_ready, "Ready") for n in ("alpha", "beta")]

    addresses = [pod.status.pod_ip for pod in pods]
    assert len(set(addresses)) == 2
    assert all(address.startswith("127.") for address in addresses)
    for pod in pods:
        raw = json.loads(
            core.read_namespaced_pod(pod.metadata.name, namespace, _preload_content=False).data
        )
        assert raw["status"]["podIPs"] == [{"ip": pod.status.pod_ip}]
        assert pod.status.host_ip.startswith("127.")
        assert [c.ready for c in pod.status.container_statuses] == [True]
        response = get(f"http://{pod.status.pod_ip}:8000/")
        assert (response.status_code, response.text) == (200, f"{pod.metadata.name} start 1")


def test_crash_restarts_the_process_and_bumps_restart_count(
    core: Any, namespace: str, node_simulator: nodesim.NodeSimulator, isolation: dict[str, str]
) -> None:
    node_simulator.add_node(f"n-{isolation['test.dmr.dev/run']}", labels=isolation)
    core.create_namespaced_pod(namespace, make_pod("crashy", node_selector=isolation))
    before = wait_for_pod(core, namespace, "crashy", is_ready, "Ready")
    process = node_simulator.process_for(namespace, "crashy")
    assert isinstance(process, HelloProcess)

    assert node_simulator.crash(namespace, "crashy") == 1
    after = wait_for_pod(
        core,
        namespace,
        "crashy",
        lambda p: is_ready(p) and p.status.container_statuses[0].restart_count == 1,
        "Ready with restartCount 1",
    )
    assert after.status.pod_ip == before.status.pod_ip
    assert after.status.container_statuses[0].last_state.terminated.exit_code == 1
    assert process.starts == 2
    assert get(f"http://{after.status.pod_ip}:8000/").text == "crashy start 2"


def test_readiness_gate_holds_ready_until_its_condition_is_true(
    core: Any, namespace: str, node_simulator: nodesim.NodeSimulator, isolation: dict[str, str]
) -> None:
    gate = "dmr.dev/models-ready"
    node_simulator.add_node(f"n-{isolation['test.dmr.dev/run']}", labels=isolation)
    core.create_namespaced_pod(
        namespace, make_pod("gated", node_selector=isolation, readiness_gates=[gate])
    )
    running = wait_for_pod(
        core,
        namespace,
        "gated",
        lambda p: pod_condition(p, "ContainersReady") == "True",
        "with ready containers",
    )
    assert running.status.phase == "Running"
    assert pod_condition(running, "Ready") == "False"

    core.patch_namespaced_pod_status(
        "gated",
        namespace,
        {"status": {"conditions": [{"type": gate, "status": "True"}]}},
        _content_type=nodesim.STRATEGIC_MERGE,
    )
    wait_for_pod(core, namespace, "gated", is_ready, "Ready once the gate is True")


def test_pod_without_process_still_becomes_ready(
    core: Any, api_client: Any, namespace: str, isolation: dict[str, str]
) -> None:
    with nodesim.NodeSimulator(api_client) as simulator:  # no process factory at all
        simulator.add_node(f"n-{isolation['test.dmr.dev/run']}", labels=isolation)
        core.create_namespaced_pod(namespace, make_pod("empty", node_selector=isolation))
        wait_for_pod(core, namespace, "empty", is_ready, "Ready")
        assert simulator.process_for(namespace, "empty") is None


def test_deleting_a_pod_stops_its_process_and_removes_it(
    core: Any, namespace: str, node_simulator: nodesim.NodeSimulator, isolation: dict[str, str]
) -> None:
    node_simulator.add_node(f"n-{isolation['test.dmr.dev/run']}", labels=isolation)
    core.create_namespaced_pod(namespace, make_pod("doomed", node_selector=isolation))
    pod = wait_for_pod(core, namespace, "doomed", is_ready, "Ready")
    url = f"http://{pod.status.pod_ip}:8000/"
    assert get(url).status_code == 200

    core.delete_namespaced_pod("doomed", namespace)  # default grace period: no kubelet to wait for
    wait_for(
        lambda: (
            not core.list_namespaced_pod(namespace, field_selector="metadata.name=doomed").items
        ),
        timeout=30,
        message="the pod to be gone",
    )
    with pytest.raises(httpx.ConnectError):
        get(url)


def test_removing_a_node_deletes_its_pods(
    core: Any, namespace: str, node_simulator: nodesim.NodeSimulator, isolation: dict[str, str]
) -> None:
    node = f"n-{isolation['test.dmr.dev/run']}"
    node_simulator.add_node(node, labels=isolation)
    core.create_namespaced_pod(namespace, make_pod("orphan", node_selector=isolation))
    wait_for_pod(core, namespace, "orphan", is_ready, "Ready")

    node_simulator.remove_node(node)
    assert node not in node_simulator.nodes
    wait_for(
        lambda: not core.list_namespaced_pod(namespace).items,
        timeout=30,
        message="the removed node's pod to be gone",
    )


def test_a_drained_pod_serves_through_its_pre_stop_sleep_then_goes(
    core: Any, namespace: str, node_simulator: nodesim.NodeSimulator, isolation: dict[str, str]
) -> None:
    node = f"n-{isolation['test.dmr.dev/run']}"
    node_simulator.add_node(node, labels=isolation)
    core.create_namespaced_pod(
        namespace, make_pod("draining", node_selector=isolation, pre_stop_sleep=3)
    )
    pod = wait_for_pod(core, namespace, "draining", is_ready, "Ready")
    url = f"http://{pod.status.pod_ip}:8000/"

    assert node_simulator.drain_node(node) == [f"{namespace}/draining"]
    assert core.read_node(node).spec.unschedulable is True
    terminating = wait_for_pod(
        core, namespace, "draining", lambda p: p.metadata.deletion_timestamp is not None, "evicted"
    )
    assert terminating.metadata.deletion_grace_period_seconds == 30
    assert get(url).status_code == 200  # still serving in its preStop sleep
    wait_for(
        lambda: not core.list_namespaced_pod(namespace).items,
        timeout=30,
        message="the drained pod to be gone after its preStop sleep",
    )
    with pytest.raises(httpx.ConnectError):
        get(url)


def test_runner_pods_listen_on_the_dmr_port() -> None:
    runner = make_pod("runner", node_selector={}, labels={constants.POOL_LABEL: "default"})
    assert nodesim.pod_port(runner) == constants.RUNNER_PORT
    runner["spec"]["containers"][0]["ports"].append({"name": "dmr", "containerPort": 9999})
    assert nodesim.pod_port(runner) == 9999
    plain = make_pod("plain", node_selector={}, port=7000)
    assert nodesim.pod_port(plain) == 7000
    plain["spec"]["containers"][0]["ports"] = []
    assert nodesim.pod_port(plain) == nodesim.DEFAULT_POD_PORT
