"""Fault matrix on the real control plane: what a person sees, bounded retries, recovery time.

Each test injects one fault into a running system (runner, kube-apiserver, the operator itself,
another client), checks that nothing is lost (every DMRModel ends Ready with its exact
configuration on every runner), the status shown while the fault lasts, that retries are bounded
(calls counted in the emulator's request log), and prints ``FAULT <name>: ...`` with the measured
recovery time after the fault ends (BENCHMARKS.md collects them). Faults test_dmrmodel.py already
proves in one shape are checked here from another angle (longer faults, restarts, several models).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3

from dmr_operator import constants
from dmr_operator.testing import cluster, controlplane
from dmr_operator.testing.emulator import ModelRunnerEmulator
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

PLURAL = "dmrmodels"
CONFIGURE = "/engines/llama.cpp/_configure"
SMOL = {"model": "ai/smollm2", "contextSize": 2048}
SMOL_WIRE = {"model": "ai/smollm2:latest", "context-size": 2048}
# One model in three modes: distinct DMRModels (the same model and mode twice is a Conflict).
MODES = ("completion", "embedding", "reranking")
PEERING_CRDS = Path(__file__).parents[2] / "charts" / "dmr-operator" / "crds" / "kopf-peering.yaml"


pool = cluster.gpu_runner_pool


def configures(emulator: ModelRunnerEmulator, model: str | None = None) -> list[Any]:
    return [
        r
        for r in emulator.calls("POST", CONFIGURE)
        if model is None or (r.body or {}).get("model") == model
    ]


def ready_condition(objects: cluster.CustomObjects, name: str) -> dict[str, Any]:
    conditions = objects.status(PLURAL, name).get("conditions") or [{}]
    return dict({c.get("type"): c for c in conditions}.get("Ready") or {})


def wait_reason(objects: cluster.CustomObjects, name: str, reason: str, timeout: float = 15) -> Any:
    return wait_for(
        lambda: (
            ready_condition(objects, name)
            if ready_condition(objects, name).get("reason") == reason
            else None
        ),
        timeout=timeout,
        message=f"{name} Ready condition reason {reason}",
    )


def report(name: str, **figures: Any) -> None:
    print(f"FAULT {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def test_runner_unreachable_at_create(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    node_simulator.run(emulator.stop_listening())
    for index, mode in enumerate(MODES):
        objects.create(PLURAL, cluster.dmrmodel(f"m{index}", {**SMOL, "mode": mode}))
    condition = wait_reason(objects, "m0", "RunnerUnreachable")
    assert pod in condition["message"] or "127." in condition["message"], condition
    assert objects.status(PLURAL, "m0")["phase"] != "Ready"
    time.sleep(8)  # the fault lasts; backoff 1, 2, 4 s caps the connection attempts
    restored = time.monotonic()
    node_simulator.run(emulator.start_listening())
    for index in range(3):
        objects.wait_phase(PLURAL, f"m{index}", "Ready", timeout=40)
    recovery = time.monotonic() - restored
    assert len(configures(emulator)) == 3  # one per model: nothing lost, nothing doubled
    report("runner unreachable at create", recovery_s=f"{recovery:.1f}", configures=3)
    # Unreachable backoff reaches 8 s after 4 failures: recovery within one backoff step.
    assert recovery < 20


def test_runner_restart_drops_configs_of_many_models(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    modes = MODES
    for mode in modes:
        objects.create(PLURAL, cluster.dmrmodel(mode, {**SMOL, "mode": mode}))
    for mode in modes:
        objects.wait_phase(PLURAL, mode, "Ready")
    before = len(emulator.requests)
    crashed = time.monotonic()
    node_simulator.crash(namespace, pod)
    wait_for(
        lambda: len(configures(emulator)) == 2 * len(modes),
        timeout=10,
        message="every configuration re-applied",
    )
    recovery = time.monotonic() - crashed
    for mode in modes:
        objects.wait_phase(PLURAL, mode, "Ready", timeout=10)
    calls = [f"{r.method} {r.path}" for r in emulator.requests[before:]]
    assert "POST /models/create" not in calls  # the store survives a restart: no re-pull
    assert calls.count(f"POST {CONFIGURE}") == len(modes)
    report(
        "runner restart dropping configs",
        recovery_s=f"{recovery:.2f}",
        calls_after=len(calls),
        configures=len(modes),
    )


def test_runner_busy_for_a_minute_retries_are_capped(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    emulator.preload_store("ai/smollm2")
    hold = 60.0
    emulator.hold_runner("ai/smollm2", seconds=hold)
    held_until = time.monotonic() + hold
    objects.create(PLURAL, cluster.dmrmodel("smol", SMOL))
    condition = wait_reason(objects, "smol", "RunnerBusy")
    assert "retry in" in condition["message"]
    assert objects.status(PLURAL, "smol")["phase"] == "Configuring"
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=hold + 40)
    recovery = time.monotonic() - held_until
    attempts = [r.status for r in configures(emulator)]
    # Backoff 1, 2, 4, 8, 16, then 30 s at most: about 7 attempts in a minute, never a storm.
    assert set(attempts[:-1]) == {409} and attempts[-1] == 202
    assert len(attempts) <= 9, attempts
    report("runner 409 busy for 60 s", attempts=len(attempts), recovery_s=f"{recovery:.1f}")
    assert recovery <= 31  # the longest backoff step


def test_runner_500_on_validation_then_runner_restart(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    """A rejected configuration is not retried while the same runner process says no; a new
    runner process (e.g. a fixed image rolled out) gets one fresh attempt on its own."""
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    emulator.configure_failure = 'unknown flag "--bogus"'
    objects.create(PLURAL, cluster.dmrmodel("smol", SMOL))
    wait_for(
        lambda: objects.status(PLURAL, "smol").get("phase") == "Failed",
        timeout=10,
        message="Failed",
    )
    condition = ready_condition(objects, "smol")
    assert condition["reason"] == "ConfigRejected" and "--bogus" in condition["message"]
    time.sleep(5)  # verify interval 2 s: two passes, no resend
    assert len(configures(emulator)) == 1
    emulator.configure_failure = None
    fixed = time.monotonic()
    node_simulator.crash(namespace, pod)
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=15)
    report(
        "runner 500 on validation",
        configures_while_rejecting=1,
        recovery_after_runner_restart_s=f"{time.monotonic() - fixed:.2f}",
    )
    assert [r.body for r in configures(emulator)][-1] == SMOL_WIRE


def test_pull_failing_after_200_backs_off_then_recovers(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    emulator.fail_pull("ai/smollm2")
    objects.create(PLURAL, cluster.dmrmodel("smol", SMOL))
    wait_for(
        lambda: objects.status(PLURAL, "smol").get("phase") == "Failed",
        timeout=10,
        message="Failed",
    )
    status = objects.status(PLURAL, "smol")
    pulled = {c["type"]: c for c in status["conditions"]}["Pulled"]
    assert pulled["reason"] == "PullFailed" and pulled["message"] == "pulled on 0/1 runner(s)"
    # The runner's own words, per runner:
    assert "connection reset" in status["runners"][0]["message"], status["runners"]
    time.sleep(12)  # failure backoff 5, 10 s: at most 3 pulls in this window
    pulls = len(emulator.calls("POST", "/models/create"))
    assert 2 <= pulls <= 3, pulls
    assert not configures(emulator)
    emulator.clear_pull_failures()
    fixed = time.monotonic()
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=30)
    report(
        "pull failing after the 200",
        pulls_in_12s=pulls,
        recovery_s=f"{time.monotonic() - fixed:.1f}",
    )
    assert len(configures(emulator)) == 1


def test_slow_runner_times_out_says_why_and_recovers(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    emulator.latency = 11.0  # above the client's 10 s read timeout (clients/modelrunner.py)
    objects.create(PLURAL, cluster.dmrmodel("smol", SMOL))
    condition = wait_reason(objects, "smol", "RunnerUnreachable", timeout=25)
    assert "Timeout" in condition["message"], condition
    emulator.latency = 0.0
    fast = time.monotonic()
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=40)
    recovery = time.monotonic() - fast
    report("slow runner (11 s > 10 s timeout)", recovery_s=f"{recovery:.1f}")
    assert [r.body for r in configures(emulator)] == [SMOL_WIRE]


@pytest.mark.apiserver_restart
def test_apiserver_restart_mid_reconcile(
    api_client: Any,
    control_plane: controlplane.ControlPlane,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pods = pool(api_client, node_simulator, namespace, 2)
    for pod in pods:
        emulators.of(namespace, pod).pull_line_delay = 0.3  # pulls in flight during the restart
    names = ["a", "b", "c"]
    for name, mode in zip(names, MODES, strict=True):
        objects.create(PLURAL, cluster.dmrmodel(name, {**SMOL, "mode": mode}))
    wait_for(
        lambda: all(emulators.of(namespace, p).calls("POST", "/models/create") for p in pods),
        timeout=10,
        message="pulls started",
    )
    restarted = time.monotonic()
    control_plane.restart_apiserver()  # etcd keeps the data

    def all_ready() -> bool:
        try:
            return all(objects.status(PLURAL, name).get("phase") == "Ready" for name in names)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError):
            return False  # right after the restart, reads may fail: "not yet"

    wait_for(all_ready, timeout=60, message="every model Ready after the apiserver restart")
    recovery = time.monotonic() - restarted
    for pod in pods:
        emulator = emulators.of(namespace, pod)
        assert len(configures(emulator)) == len(names)  # one each, none lost, none doubled
    report("apiserver restart mid-reconcile", all_ready_after_s=f"{recovery:.1f}")


def test_operator_sigkill_mid_reconcile_and_restart(
    api_client: Any,
    control_plane: controlplane.ControlPlane,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    objects.create(PLURAL, cluster.dmrmodel("done", SMOL))
    objects.wait_phase(PLURAL, "done", "Ready")
    emulator.pull_line_delay = 0.5
    objects.create(PLURAL, cluster.dmrmodel("pulling", {"model": "ai/qwen3:14B"}))
    wait_for(
        lambda: objects.status(PLURAL, "pulling").get("phase") == "Pulling",
        timeout=10,
        message="a slow pull in progress",
    )
    operator.kill()
    emulator.pull_line_delay = 0.0
    restarted = time.monotonic()
    operator.start()
    objects.wait_phase(PLURAL, "pulling", "Ready", timeout=40)
    recovery = time.monotonic() - restarted
    # The operator read back first: the verified model was not configured again.
    assert len(configures(emulator, "ai/smollm2:latest")) == 1
    assert len(configures(emulator, "ai/qwen3:14B")) == 1
    assert objects.status(PLURAL, "done")["phase"] == "Ready"
    report("operator SIGKILL mid-pull", ready_after_restart_s=f"{recovery:.1f}")


@pytest.fixture
def peering(api_client: Any, namespace: str) -> Iterator[str]:
    extensions: Any = kubernetes.client.ApiextensionsV1Api(api_client)
    for crd in cluster.load_manifests(PEERING_CRDS):
        try:
            extensions.create_custom_resource_definition(crd)
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise
    custom: Any = kubernetes.client.CustomObjectsApi(api_client)
    body = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "dmr"}}
    wait_for(
        lambda: custom.create_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", body
        ),
        timeout=30,
        message="KopfPeering created",
        ignore=(kubernetes.client.ApiException,),
    )
    yield "dmr"


def test_two_replicas_with_peering_only_one_acts_and_standby_takes_over(
    api_client: Any,
    control_plane: controlplane.ControlPlane,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    crds: None,
    peering: str,
    objects: cluster.CustomObjects,
) -> None:
    pods = pool(api_client, node_simulator, namespace, 2)

    def replica(priority: int) -> OperatorProcess:
        return OperatorProcess(
            kubeconfig=control_plane.kubeconfig_path,
            namespaces=[namespace],
            verify_interval=2,
            extra_args=["--peering", peering, "--priority", str(priority)],
        )

    leader, standby = replica(100), replica(50)
    leader.start()
    standby.start()
    try:
        for index, mode in enumerate(MODES):
            objects.create(PLURAL, cluster.dmrmodel(f"m{index}", {**SMOL, "mode": mode}))
        for index in range(3):
            objects.wait_phase(PLURAL, f"m{index}", "Ready", timeout=30)
        time.sleep(3)  # room for a second actor to show itself
        for pod in pods:
            assert len(configures(emulators.of(namespace, pod))) == 3  # one actor
        leader.kill()
        killed = time.monotonic()
        objects.create(PLURAL, cluster.dmrmodel("after", {"model": "ai/qwen3:0.6B"}))
        # kopf treats a silent peer as alive for its peering lifetime (60 s) before resuming.
        objects.wait_phase(PLURAL, "after", "Ready", timeout=120)
        takeover = time.monotonic() - killed
        for pod in pods:
            assert len(configures(emulators.of(namespace, pod))) == 4
        report(
            "two replicas with peering", configures_per_model_pod=1, takeover_s=f"{takeover:.0f}"
        )
    finally:
        leader.stop()
        standby.stop()
        for role, process in (("leader", leader), ("standby", standby)):
            print(f"--- {role} log (tail) ---\n{process.log_tail(40)}")


def test_status_overwritten_by_another_client_is_restored(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    objects.create(PLURAL, cluster.dmrmodel("smol", SMOL))
    objects.wait_phase(PLURAL, "smol", "Ready")
    custom: Any = kubernetes.client.CustomObjectsApi(api_client)
    overwritten = time.monotonic()
    custom.patch_namespaced_custom_object_status(
        constants.GROUP,
        constants.VERSION,
        namespace,
        PLURAL,
        "smol",
        {"status": {"phase": "Failed", "runners": []}},
        _content_type=cluster.MERGE_PATCH,
    )
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=10)
    restored = time.monotonic() - overwritten
    assert objects.status(PLURAL, "smol")["runnersSummary"] == "1/1"
    # Concurrent spec changes while status writes are in flight: the last generation wins.
    for size in (3072, 4096, 6144, 8192):
        patched = objects.patch_spec(PLURAL, "smol", {"contextSize": size})
    generation = patched["metadata"]["generation"]
    wait_for(
        lambda: (
            objects.status(PLURAL, "smol").get("observedGeneration") == generation
            and objects.status(PLURAL, "smol").get("phase") == "Ready"
        ),
        timeout=15,
        message="the last generation Ready",
    )
    emulator = emulators.of(namespace, pod)
    assert configures(emulator)[-1].body == {**SMOL_WIRE, "context-size": 8192}
    assert objects.status(PLURAL, "smol")["effective"]["context-size"] == 8192
    report(
        "status overwritten / concurrent spec changes",
        restored_s=f"{restored:.2f}",
        configures_for_4_changes=len(configures(emulator)) - 1,
    )


def test_delete_while_runner_down_is_bounded_and_counted(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    """The finalizer is released after a bounded number of unload attempts, with an Event."""
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    objects.create(PLURAL, cluster.dmrmodel("smol", SMOL))
    objects.wait_phase(PLURAL, "smol", "Ready")
    node_simulator.run(emulator.stop_listening())
    deleted = time.monotonic()
    objects.delete(PLURAL, "smol")
    wait_for(lambda: objects.get(PLURAL, "smol") is None, timeout=40, message="object gone")
    released = time.monotonic() - deleted
    node_simulator.run(emulator.start_listening())
    reasons = [e.reason for e in cluster.events_for(api_client, namespace, "smol")]
    assert "CleanupFailed" in reasons
    # delete_attempts = 3 with 1 s, 2 s pauses and a 2 s connect timeout: bounded.
    assert released < 20
    report("DMRModel deleted while its runner is down", released_s=f"{released:.1f}")
