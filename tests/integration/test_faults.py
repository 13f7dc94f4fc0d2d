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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
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


def test_a_configured_model_is_ready_again_when_its_runner_answers_again(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    # The runner keeps its configuration while it does not answer (a network blip, an
    # overloaded pod): once it answers, the read-back shows it, and nothing is sent again.
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    objects.create(PLURAL, cluster.dmrmodel("smol", SMOL))
    objects.wait_phase(PLURAL, "smol", "Ready")
    node_simulator.run(emulator.stop_listening())
    wait_reason(objects, "smol", "RunnerUnreachable")  # the 2 s read-back found it gone
    node_simulator.run(emulator.start_listening())
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=40)
    assert len(configures(emulator)) == 1


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
def replica(
    operator_kubeconfig: Path, namespace: str, crds: None, leader_election: Any
) -> Iterator[Callable[..., OperatorProcess]]:
    """Starts operator replicas that elect through the chart's Lease (6 s lease); all are
    stopped at the end and their log tails printed (and checked for missing rights)."""
    started: list[OperatorProcess] = []

    def start(*extra_args: str) -> OperatorProcess:
        process = OperatorProcess(
            kubeconfig=operator_kubeconfig,
            namespaces=[namespace],
            verify_interval=2,
            extra_args=[*leader_election.args, *extra_args],
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
    for index, process in enumerate(started):
        print(f"--- replica {index} log (tail) ---\n{process.log_tail(30)}")
        assert "Forbidden" not in process.log()


def test_two_replicas_only_the_lease_holder_acts_and_standbys_take_over(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    replica: Callable[..., OperatorProcess],
    objects: cluster.CustomObjects,
) -> None:
    pods = pool(api_client, node_simulator, namespace, 2)

    def configured_per_pod(count: int) -> None:
        for pod in pods:
            assert len(configures(emulators.of(namespace, pod))) == count

    first = replica()
    wait_for(first.leading, timeout=20, message="the first replica to lead")
    probe = f"http://127.0.0.1:{controlplane.free_port()}/healthz"
    second = replica(f"--liveness={probe}")
    assert second.standing_by() and not second.leading()
    # A standby answers its liveness probe, or the kubelet would keep restarting it.
    assert httpx.get(probe, timeout=5).json() == {"standby": True}
    for index, mode in enumerate(MODES):
        objects.create(PLURAL, cluster.dmrmodel(f"m{index}", {**SMOL, "mode": mode}))
    for index in range(3):
        objects.wait_phase(PLURAL, f"m{index}", "Ready", timeout=30)
    time.sleep(3)  # room for a second actor to show itself (two verify intervals)
    configured_per_pod(3)

    # A clean stop releases the lease: the standby leads within a retry period or two.
    stopped = time.monotonic()
    assert first.stop() == 0
    wait_for(second.leading, timeout=10, message="the standby to lead after a release")
    handover = time.monotonic() - stopped
    wait_for(  # the same port, now kopf's own probe
        lambda: "standby" not in httpx.get(probe, timeout=5).text,
        timeout=10,
        message="kopf to serve the liveness probe",
        ignore=(httpx.HTTPError,),
    )
    objects.create(PLURAL, cluster.dmrmodel("after-release", {"model": "ai/qwen3:0.6B"}))
    objects.wait_phase(PLURAL, "after-release", "Ready", timeout=30)
    configured_per_pod(4)  # the new leader read back first: nothing configured twice

    # A killed leader renews nothing: a standby leads once the lease duration has passed.
    third = replica()
    assert third.standing_by()
    second.kill()
    killed = time.monotonic()
    objects.create(PLURAL, cluster.dmrmodel("after-kill", {"model": "ai/qwen3:14B"}))
    objects.wait_phase(PLURAL, "after-kill", "Ready", timeout=60)
    takeover = time.monotonic() - killed
    assert takeover >= 4  # not before the lost leader's lease could have run out
    configured_per_pod(5)
    report(
        "two replicas with leader election",
        configures_per_model_pod=1,
        handover_after_release_s=f"{handover:.1f}",
        ready_after_leader_sigkill_s=f"{takeover:.1f}",
    )


def test_a_leader_that_cannot_renew_its_lease_stops_and_exits(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    replica: Callable[..., OperatorProcess],
    leader_election: Any,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    leader = replica()
    wait_for(leader.leading, timeout=20, message="the replica to lead")
    objects.create(PLURAL, cluster.dmrmodel("m", SMOL))
    objects.wait_phase(PLURAL, "m", "Ready", timeout=30)
    # Another holder appears (a partition healed the other way, a manual edit): this
    # replica must assume it is no longer the only actor.
    coordination: Any = kubernetes.client.CoordinationV1Api(api_client)
    taken = time.monotonic()
    coordination.patch_namespaced_lease(
        leader_election.name,
        leader_election.namespace,
        {"spec": {"holderIdentity": "intruder", "renewTime": _micro_now()}},
    )
    wait_for(
        lambda: leader.process is not None and leader.process.poll() is not None,
        timeout=20,
        message="the replica to exit",
    )
    exited = time.monotonic() - taken
    assert leader.process is not None and leader.process.returncode == 1
    assert "not renewed" in leader.log()
    # Gone for good: a new model is not configured by it.
    objects.create(PLURAL, cluster.dmrmodel("later", {"model": "ai/qwen3:0.6B"}))
    time.sleep(2)
    assert not configures(emulators.of(namespace, pod), "ai/qwen3:0.6B")
    report("leader loses its lease", exited_after_s=f"{exited:.1f}")


def _micro_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


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
