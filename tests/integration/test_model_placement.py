"""DMRModels placed on some pods of a pool by capacity, on the real control plane.

A pool of GPU runner pods on simulated nodes of two GPU sizes (GPU feature discovery's
``nvidia.com/gpu.memory`` label), each pod served by a model-runner emulator whose registry
knows models with GGUF metadata. Covered: ``placement.replicas: 2`` puts the model on two pods
with a GPU it fits (never the small one), spread over nodes; only those pods carry its label and
its own Service selects exactly them; the other pods never hear of it; status lists the
placement and PLACED says 2/2. A model that fits nowhere is Pending/Insufficient with the
numbers. A chosen pod lost with its node: the model is configured on another big pod while the
surviving pod keeps serving (it never loses its label), then serves from two pods again. A
drained node's pod (cordon, eviction) serves its one-replica model through its preStop sleep
while the model is configured on another pod, so the model's Service always has a pod that
answers, then lets it go. A model
whose contextSize grows beyond its pod moves: configured on a big pod first while the old pod
serves with its old configuration (never given one that does not fit it), then unloaded there.
A model deleted with ``deletionPolicy: Retain`` keeps its room on its pods until somebody
unloads it there (the runner's read-back no longer lists it).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import kubernetes
import pytest

from dmr_operator import constants
from dmr_operator.reconcile import model_routing
from dmr_operator.testing import cluster, emulator_state
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

DMRMODELS = constants.DMRMODEL_PLURAL
GIB = 2**30


# 12 GiB of weights + 1 GiB of KV cache at 8192 tokens (32 layers x 8 heads x 128 x 2 x 2 bytes
# x 8192 = 1 GiB): fits a 24 GiB GPU, not an 8 GiB one.
MEDIUM = emulator_state.llama_like("medium", size=12 * GIB, layers=32)
# 30 GiB of weights: no GPU of the pool holds it.
HUGE = emulator_state.llama_like("huge", size=30 * GIB, layers=80)
# 6 GiB + 0.75 GiB of KV cache fits the 8 GiB GPU alone, not with its 1.5 GiB draft beside it.
SEVEN = emulator_state.llama_like("seven", size=6 * GIB, layers=24)
SEVEN_DRAFT = emulator_state.llama_like(
    "seven-draft", size=3 * GIB // 2, layers=12, kv_heads=4, head_dim=64
)
# 0.5 GiB of weights and 128 KiB of KV cache per token: at 4096 tokens (1.1 GiB in all) its best
# fit is the 8 GiB GPU (1 GiB per runner slot); at 65536 tokens (8.6 GiB) only a 24 GiB one.
GROWER = emulator_state.llama_like("grower", size=GIB // 2, layers=32)
# MEDIUM's size under another name.
OTHER = emulator_state.llama_like("other", size=12 * GIB, layers=32)


@pytest.fixture
def emulators() -> cluster.EmulatorFactory:
    """Every runner's registry also serves the models above."""
    return cluster.EmulatorFactory(catalogue=(MEDIUM, HUGE, SEVEN, SEVEN_DRAFT, GROWER, OTHER))


@pytest.fixture
def core(api_client: Any) -> Any:
    return kubernetes.client.CoreV1Api(api_client)


@pytest.fixture
def pool(
    api_client: Any, node_simulator: Any, namespace: str, emulators: cluster.EmulatorFactory
) -> dict[str, str]:
    """Three nodes with a 24 GiB GPU and one with an 8 GiB GPU; one runner pod per node.
    Returns pod name -> node name."""
    return make_pool(api_client, node_simulator, namespace)


# Seconds a deleted runner pod serves on, as the chart's pools do (preStopSleepSeconds).
PRE_STOP_SLEEP = 20


@pytest.fixture
def draining_pool(
    api_client: Any, node_simulator: Any, namespace: str, emulators: cluster.EmulatorFactory
) -> dict[str, str]:
    """The pool above, its pods serving through a preStop sleep when deleted."""
    return make_pool(api_client, node_simulator, namespace, pre_stop_sleep=PRE_STOP_SLEEP)


def make_pool(
    api_client: Any, node_simulator: Any, namespace: str, *, pre_stop_sleep: int = 0
) -> dict[str, str]:
    for index in range(3):
        node_simulator.add_node(
            f"{namespace}-big-{index}", gpus=1, labels={"nvidia.com/gpu.memory": "24576"}
        )
    node_simulator.add_node(f"{namespace}-small", gpus=1, labels={"nvidia.com/gpu.memory": "8192"})
    cluster.create_runner_pool(
        api_client, namespace=namespace, replicas=4, gpus=1, pre_stop_sleep=pre_stop_sleep
    )
    names = cluster.wait_for_runner_pods(api_client, namespace, constants.DEFAULT_POOL, 4)
    core = kubernetes.client.CoreV1Api(api_client)
    return {name: core.read_namespaced_pod(name, namespace).spec.node_name for name in names}


def labelled_pods(core: Any, namespace: str, model: str) -> set[str]:
    selector = f"{model_routing.placement_label(model)}=true"
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return {p.metadata.name for p in pods if p.metadata.deletion_timestamp is None}


def create_placed(objects: cluster.CustomObjects, name: str, replicas: int) -> None:
    spec = {"model": f"ai/{name}", "placement": {"replicas": replicas}}
    objects.create(DMRMODELS, cluster.dmrmodel(name, spec))


def placed_ready(objects: cluster.CustomObjects, name: str, count: int) -> Any:
    def ready() -> dict[str, Any] | None:
        status = objects.status(DMRMODELS, name)
        done = status.get("phase") == "Ready" and status.get("placedSummary") == f"{count}/{count}"
        return status if done else None

    try:
        return wait_for(ready, timeout=60, message=f"{name} Ready and placed {count}/{count}")
    except AssertionError as error:
        raise AssertionError(f"{error}; status now: {objects.status(DMRMODELS, name)}") from None


def ready_condition(objects: cluster.CustomObjects, name: str) -> dict[str, Any]:
    conditions = objects.status(DMRMODELS, name).get("conditions") or ()
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_a_model_is_placed_where_it_fits_and_served_only_there(
    namespace: str,
    pool: dict[str, str],
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    create_placed(objects, "medium", 2)
    status = placed_ready(objects, "medium", 2)
    chosen = {entry["pod"] for entry in status["placement"]}
    assert len(chosen) == 2
    nodes = {pool[pod] for pod in chosen}
    assert all("-big-" in node for node in nodes)  # never the 8 GiB GPU
    assert len(nodes) == 2  # spread over nodes
    assert labelled_pods(core, namespace, "medium") == chosen
    assert {r["pod"] for r in status["runners"]} == chosen
    # Its own Service, selecting the pool and its label: exactly the chosen pods.
    service_name = model_routing.model_service_name("medium")
    assert status["endpoint"] == f"http://{service_name}.{namespace}.svc:80/v1"
    service = core.read_namespaced_service(service_name, namespace)
    assert service.spec.selector == {
        constants.POOL_LABEL: constants.DEFAULT_POOL,
        model_routing.placement_label("medium"): "true",
    }
    assert service.metadata.owner_references[0].kind == constants.DMRMODEL_KIND
    # The pods not chosen never got the model, not even pulled.
    runners = emulators.in_namespace(namespace)
    for pod in set(pool) - chosen:
        assert runners[pod].calls("POST", "/models/create") == [], pod
        assert runners[pod].calls("POST", "/engines/llama.cpp/_configure") == [], pod


def test_a_model_that_fits_nowhere_says_so_with_the_numbers(
    namespace: str,
    pool: dict[str, str],
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    create_placed(objects, "huge", 1)

    def insufficient() -> dict[str, Any] | None:
        ready = ready_condition(objects, "huge")
        return ready if ready.get("reason") == "Insufficient" else None

    ready = wait_for(insufficient, timeout=60, message="huge Ready=False Insufficient")
    assert ready["status"] == "False"
    assert "placed on 0 of 1 pods: needs 32.6 GiB" in ready["message"]
    assert "GiB, largest free 24.0 GiB on pod" in ready["message"]
    status = objects.status(DMRMODELS, "huge")
    assert status["phase"] == "Pending"
    assert status["placedSummary"] == "0/1"


def test_a_lost_pod_is_replaced_before_the_survivor_stops_serving(
    namespace: str,
    pool: dict[str, str],
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
) -> None:
    create_placed(objects, "medium", 2)
    status = placed_ready(objects, "medium", 2)
    lost, survivor = sorted(entry["pod"] for entry in status["placement"])
    node_simulator.remove_node(pool[lost])
    spare = next(
        pod for pod, node in pool.items() if "-big-" in node and pod not in (lost, survivor)
    )

    def moved() -> set[str] | None:
        serving = labelled_pods(core, namespace, "medium")
        # Never an outage: the survivor keeps serving the whole time.
        assert survivor in serving, f"{survivor} stopped serving during the move: {serving}"
        status = objects.status(DMRMODELS, "medium")
        done = serving == {survivor, spare} and status.get("placedSummary") == "2/2"
        return serving if done and status.get("phase") == "Ready" else None

    wait_for(moved, timeout=90, message=f"medium served from {survivor} and {spare}")
    status = objects.status(DMRMODELS, "medium")
    assert {e["pod"] for e in status["placement"]} == {survivor, spare}
    assert status["placedSummary"] == "2/2"


def test_a_drained_pods_model_is_served_throughout_its_move(
    namespace: str,
    draining_pool: dict[str, str],
    node_simulator: Any,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    # One replica: during a drain only the leaving pod has the model until another pod does.
    create_placed(objects, "medium", 1)
    status = placed_ready(objects, "medium", 1)
    (leaving,) = [entry["pod"] for entry in status["placement"]]
    node_simulator.drain_node(draining_pool[leaving])
    started = time.monotonic()

    def endpoints() -> tuple[set[str], set[str]]:
        """The pods the model's Service sends to as kube-proxy picks them: its Ready ones,
        else its terminating ones (still Ready while they run out their preStop sleep)."""
        selector = f"{model_routing.placement_label('medium')}=true"
        ready, terminating = set(), set()
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ()):
                leaving_now = pod.metadata.deletion_timestamp is not None
                (terminating if leaving_now else ready).add(pod.metadata.name)
        return ready, terminating

    def moved() -> str | None:
        ready, terminating = endpoints()
        # Never an outage: a pod the Service can send to, and it answers.
        assert ready or terminating, "nobody could serve medium during the drain"
        for pod in ready or terminating:
            pod_address = node_simulator.address_of(namespace, pod)
            answer = http.post(
                f"http://{pod_address}:{constants.RUNNER_PORT}/engines/v1/chat/completions",
                json={"model": "ai/medium", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert answer.status_code == 200, (pod, answer.text)
        status = objects.status(DMRMODELS, "medium")
        placed = [entry["pod"] for entry in status.get("placement") or ()]
        done = status.get("phase") == "Ready" and ready == set(placed) and leaving not in ready
        return placed[0] if done else None

    with httpx.Client(timeout=5) as http:
        new = wait_for(moved, timeout=PRE_STOP_SLEEP, message="medium served from another pod")
    assert time.monotonic() - started < PRE_STOP_SLEEP  # moved within the preStop sleep
    assert "-big-" in draining_pool[new] and new != leaving
    # The leaving pod served while the new one was prepared, and let the model go after.
    unloads = emulators.of(namespace, leaving).calls("POST", "/engines/unload")
    assert any("ai/medium:latest" in str((c.body or {}).get("models")) for c in unloads), unloads


def test_an_operator_restart_keeps_the_placement_and_writes_nothing(
    namespace: str,
    pool: dict[str, str],
    operator: OperatorProcess,
    operator_kubeconfig: Any,
    objects: cluster.CustomObjects,
    core: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    create_placed(objects, "medium", 2)
    placed_ready(objects, "medium", 2)
    chosen = labelled_pods(core, namespace, "medium")
    version = (objects.get(DMRMODELS, "medium") or {})["metadata"]["resourceVersion"]
    runners = emulators.in_namespace(namespace)
    writes = {pod: len(runners[pod].requests) for pod in pool}
    operator.stop()
    with OperatorProcess(
        kubeconfig=operator_kubeconfig, namespaces=[namespace], verify_interval=2
    ) as restarted:
        # Two read-backs on every chosen pod: the new process has looked at them, twice.
        def read_back_twice() -> bool:
            return all(
                sum(
                    1
                    for r in runners[pod].requests[writes[pod] :]
                    if (r.method, r.path) == ("GET", "/engines/_configure")
                )
                >= 2
                for pod in chosen
            )

        try:
            wait_for(read_back_twice, timeout=30, message="read-backs by the restarted operator")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{restarted.log_tail(60)}") from None
        assert labelled_pods(core, namespace, "medium") == chosen, restarted.log_tail()
        after = (objects.get(DMRMODELS, "medium") or {})["metadata"]["resourceVersion"]
        assert after == version, restarted.log_tail()
        for pod in pool:
            new = runners[pod].requests[writes[pod] :]
            assert [r.path for r in new if r.method != "GET"] == [], pod


def test_a_speculative_draft_counts_toward_what_its_model_needs(
    namespace: str,
    pool: dict[str, str],
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    spec = {
        "model": "ai/seven",
        "speculative": {"draftModel": "ai/seven-draft"},
        "placement": {"replicas": 4},
    }
    objects.create(DMRMODELS, cluster.dmrmodel("seven", spec))

    def three_of_four() -> dict[str, Any] | None:
        status = objects.status(DMRMODELS, "seven")
        ready = [c for c in status.get("conditions") or () if c["type"] == "Ready"]
        placed = ready and ready[0]["reason"] == "Insufficient" and len(status["placement"]) == 3
        return status if placed else None

    status = wait_for(three_of_four, timeout=60, message="seven placed on the 3 big GPUs only")
    assert all("-big-" in pool[entry["pod"]] for entry in status["placement"])
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "placed on 3 of 4 pods" in ready["message"]


def test_a_model_whose_context_outgrows_its_pod_moves_without_an_outage(
    namespace: str,
    pool: dict[str, str],
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    core: Any,
    emulators: cluster.EmulatorFactory,
) -> None:
    spec = {"model": "ai/grower", "contextSize": 4096, "placement": {"replicas": 1}}
    objects.create(DMRMODELS, cluster.dmrmodel("grower", spec))
    status = placed_ready(objects, "grower", 1)
    (old,) = [entry["pod"] for entry in status["placement"]]
    assert "-small" in pool[old], status["placement"]
    objects.patch_spec(DMRMODELS, "grower", {"contextSize": 65536})

    def moved() -> str | None:
        serving = labelled_pods(core, namespace, "grower")
        assert serving, "nobody served grower during the move"
        status = objects.status(DMRMODELS, "grower")
        placed = [entry["pod"] for entry in status.get("placement") or ()]
        done = (
            status.get("phase") == "Ready"
            and status.get("observedGeneration") == 2
            and len(placed) == 1
            and serving == set(placed)
        )
        return placed[0] if done else None

    new = wait_for(moved, timeout=90, message="grower served from a big pod")
    assert "-big-" in pool[new]
    runners = emulators.in_namespace(namespace)
    # The old pod kept the configuration it served with, and let the model go at the end.
    contexts = [
        (call.body or {}).get("context-size")
        for call in runners[old].calls("POST", "/engines/llama.cpp/_configure")
    ]
    assert contexts == [4096], contexts
    unloads = runners[old].calls("POST", "/engines/unload")
    assert any("ai/grower:latest" in str((c.body or {}).get("models")) for c in unloads), unloads
    new_contexts = [
        (call.body or {}).get("context-size")
        for call in runners[new].calls("POST", "/engines/llama.cpp/_configure")
    ]
    assert new_contexts == [65536], new_contexts


def test_labels_of_a_model_deleted_while_no_operator_ran_come_off_its_pods(
    namespace: str,
    pool: dict[str, str],
    operator: OperatorProcess,
    operator_kubeconfig: Any,
    objects: cluster.CustomObjects,
    core: Any,
) -> None:
    create_placed(objects, "medium", 1)
    create_placed(objects, "grower", 1)
    placed_ready(objects, "medium", 1)
    placed_ready(objects, "grower", 1)
    operator.stop()
    # With no operator to run the finalizer, a person removes it: the object goes at once.
    objects.api.delete_namespaced_custom_object(
        constants.GROUP, constants.VERSION, namespace, DMRMODELS, "medium"
    )
    objects.api.patch_namespaced_custom_object(
        constants.GROUP,
        constants.VERSION,
        namespace,
        DMRMODELS,
        "medium",
        {"metadata": {"finalizers": None}},
        _content_type=cluster.MERGE_PATCH,
    )
    wait_for(lambda: objects.get(DMRMODELS, "medium") is None, timeout=30, message="medium deleted")
    assert labelled_pods(core, namespace, "medium")
    with OperatorProcess(
        kubeconfig=operator_kubeconfig, namespaces=[namespace], verify_interval=2
    ) as restarted:
        wait_for(
            lambda: not labelled_pods(core, namespace, "medium"),
            timeout=30,
            message=f"medium's label removed\n{restarted.log_tail(40)}",
        )
        assert len(labelled_pods(core, namespace, "grower")) == 1  # the living keep theirs


def test_a_copy_a_deleted_model_retains_keeps_its_room_until_it_is_unloaded(
    namespace: str,
    pool: dict[str, str],
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
    emulators: cluster.EmulatorFactory,
) -> None:
    # deletionPolicy Retain leaves the model configured (and maybe loaded) on its pods, and
    # model-runner admits no load by GPU memory: placement must not give its room away.
    spec = {"model": "ai/medium", "placement": {"replicas": 3}, "deletionPolicy": "Retain"}
    objects.create(DMRMODELS, cluster.dmrmodel("medium", spec))
    held = {entry["pod"] for entry in placed_ready(objects, "medium", 3)["placement"]}
    objects.delete(DMRMODELS, "medium")
    wait_for(lambda: objects.get(DMRMODELS, "medium") is None, timeout=30, message="medium gone")
    create_placed(objects, "other", 1)  # 13.1 GiB like medium: 10.9 GiB free on each big GPU
    try:
        wait_for(
            lambda: "largest free 10.9 GiB" in ready_condition(objects, "other").get("message", ""),
            timeout=60,
            message="other Insufficient beside the retained copies",
        )
    except AssertionError as error:
        raise AssertionError(f"{error}; status: {objects.status(DMRMODELS, 'other')}") from None
    # Somebody unloads the retained copy from one pod: its next read-back frees the room.
    freed = sorted(held)[0]
    runner = emulators.in_namespace(namespace)[freed]
    httpx.post(
        f"{runner.url}/engines/unload",
        json={"backend": "llama.cpp", "models": ["ai/medium"]},
        timeout=10,
    ).raise_for_status()
    placed = placed_ready(objects, "other", 1)["placement"]
    assert [entry["pod"] for entry in placed] == [freed]
