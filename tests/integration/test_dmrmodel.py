"""DMRModel end to end on the real control plane: apply, pull, _configure, read-back, status.

The operator runs as its own process against kube-apiserver; runner pods come from a StatefulSet
that the real controller-manager and scheduler place on simulated GPU nodes, each served by its
own model-runner emulator on its pod address. Covered: every option on a 3-replica pool with the
exact wire JSON, runner restart, scale-out, busy / unreachable / failing-pull / rejecting runners
with call counts, deletion with the runner up and down, and a quiet steady state.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import httpx
import kubernetes

from dmr_operator import constants
from dmr_operator.testing import cluster
from dmr_operator.testing.emulator import ModelRunnerEmulator
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

PLURAL = "dmrmodels"
CONFIGURE_LLAMA = "/engines/llama.cpp/_configure"
CONFIGURE_VLLM = "/engines/vllm/_configure"

LLAMA_SPEC = {
    "model": "ai/qwen3:14B",
    "mode": "completion",
    "contextSize": 32768,
    "keepAlive": "-1",
    "runtimeFlags": ["--temp", "0.7", "--top-k", "20"],
    "thinkingBudget": "medium",
    "speculative": {"draftModel": "ai/qwen3:0.6B", "numTokens": 8, "minAcceptanceRate": 0.75},
}
LLAMA_WIRE = {
    "model": "ai/qwen3:14B",
    "mode": "completion",
    "context-size": 32768,
    "runtime-flags": ["--temp", "0.7", "--top-k", "20"],
    "keep_alive": "-1",
    "speculative": {"draft_model": "ai/qwen3:0.6B", "num_tokens": 8, "min_acceptance_rate": 0.75},
    "llamacpp": {"reasoning-budget": 8192},
}
VLLM_SPEC = {
    "model": "ai/qwen3-vllm",
    "backend": "vllm",
    "contextSize": 16384,
    "keepAlive": "30m",
    "runtimeFlags": ["--max-num-seqs", "8"],
    "vllm": {
        "gpuMemoryUtilization": 0.85,
        "hfOverrides": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "max_position": 4096},
    },
}
VLLM_WIRE = {
    "model": "ai/qwen3-vllm:latest",
    "context-size": 16384,
    "runtime-flags": ["--max-num-seqs", "8"],
    "keep_alive": "30m",
    "vllm": {
        "gpu-memory-utilization": 0.85,
        "hf-overrides": {
            "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
            "max_position": 4096,
        },
    },
}


pool = cluster.gpu_runner_pool


def bodies(emulator: ModelRunnerEmulator, path: str) -> list[Any]:
    return [r.body for r in emulator.calls("POST", path)]


def pulled(emulator: ModelRunnerEmulator) -> list[str]:
    return sorted(r.body["from"] for r in emulator.calls("POST", "/models/create"))


def test_every_option_on_a_three_replica_pool(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pods = pool(api_client, node_simulator, namespace, 3)
    objects.create(PLURAL, cluster.dmrmodel("qwen", LLAMA_SPEC))
    objects.create(PLURAL, cluster.dmrmodel("qwen-vllm", VLLM_SPEC))
    llama = objects.wait_phase(PLURAL, "qwen", "Ready")
    vllm = objects.wait_phase(PLURAL, "qwen-vllm", "Ready")

    for pod in pods:
        emulator = emulators.of(namespace, pod)
        # One pull per model (the draft included), then exactly one _configure with the exact JSON.
        assert pulled(emulator) == ["ai/qwen3-vllm:latest", "ai/qwen3:0.6B", "ai/qwen3:14B"]
        assert bodies(emulator, CONFIGURE_LLAMA) == [LLAMA_WIRE]
        assert bodies(emulator, CONFIGURE_VLLM) == [VLLM_WIRE]

    status = llama["status"]
    assert status["runnersSummary"] == "3/3"
    assert status["backend"] == "llama.cpp"
    assert status["normalizedModel"] == "ai/qwen3:14B"
    assert status["digest"].startswith("sha256:")
    assert status["observedGeneration"] == llama["metadata"]["generation"]
    assert status["endpoint"] == f"http://pool-default.{namespace}.svc:80/v1"
    assert sorted(r["pod"] for r in status["runners"]) == pods
    assert {r["state"] for r in status["runners"]} == {"Configured"}
    assert {r["keepAlive"] for r in status["runners"]} == {"-1"}  # spec.keepAlive, echoed
    assert all(r["node"].startswith(namespace) for r in status["runners"])
    # Read back from the runner, in the runner's spelling (keep_alive echoed as a Go duration).
    assert status["effective"] == {
        "context-size": 32768,
        "runtime-flags": ["--temp", "0.7", "--top-k", "20"],
        "speculative": {
            "draft_model": "ai/qwen3:0.6B",
            "num_tokens": 8,
            "min_acceptance_rate": 0.75,
        },
        "keep_alive": "-1",
        "llamacpp": {"reasoning-budget": 8192},
    }
    assert vllm["status"]["effective"]["keep_alive"] == "30m0s"
    assert vllm["status"]["backend"] == "vllm"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert {t: c["status"] for t, c in conditions.items()} == {
        "Pulled": "True",
        "Configured": "True",
        "WithinCapacity": "True",  # one model per single-GPU runner on an 8-CPU node
        "Ready": "True",
    }

    def reasons() -> list[str]:
        return [e.reason for e in cluster.events_for(api_client, namespace, "qwen")]

    # One Configured Event per DMRModel (its Ready transition), not one per runner.
    wait_for(lambda: reasons().count("Configured") == 1, timeout=5, message="a Configured event")
    assert "Pulled" in reasons()


def test_runner_restart_is_reconfigured_without_a_spec_change(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pods = pool(api_client, node_simulator, namespace, 2)
    objects.create(PLURAL, cluster.dmrmodel("qwen", LLAMA_SPEC))
    objects.wait_phase(PLURAL, "qwen", "Ready")
    victim = emulators.of(namespace, pods[0])
    survivor = emulators.of(namespace, pods[1])
    assert len(victim.calls("POST", CONFIGURE_LLAMA)) == 1

    started = time.monotonic()
    node_simulator.crash(namespace, pods[0])
    wait_for(
        lambda: len(victim.calls("POST", CONFIGURE_LLAMA)) == 2,
        timeout=5,
        message="the restarted runner to be configured again",
    )
    elapsed = time.monotonic() - started
    objects.wait_phase(PLURAL, "qwen", "Ready", timeout=5)
    assert bodies(victim, CONFIGURE_LLAMA)[-1] == LLAMA_WIRE
    # The runner kept its store (models are on disk), so nothing was pulled again.
    assert pulled(victim) == ["ai/qwen3:0.6B", "ai/qwen3:14B"]
    # The other runner was left alone.
    assert len(survivor.calls("POST", CONFIGURE_LLAMA)) == 1
    reasons = [e.reason for e in cluster.events_for(api_client, namespace, "qwen")]
    wait_for(
        lambda: (
            "Reconfigured" in [e.reason for e in cluster.events_for(api_client, namespace, "qwen")]
        ),
        timeout=5,
        message=f"a Reconfigured event (have {reasons})",
    )
    print(f"re-configured {elapsed:.2f}s after the crash")


def test_a_runner_pulling_from_a_mirror_is_not_pulled_again_after_a_restart(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    # DEFAULT_REGISTRY on the runner: its store says mirror.local:5000/ai/qwen3:0.6B, a name no
    # reference of the DMRModel spells; the operator must ask the runner, not pull again.
    emulators.default_registry = "mirror.local:5000"
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    objects.create(PLURAL, cluster.dmrmodel("small", {"model": "ai/qwen3:0.6B"}))
    objects.wait_phase(PLURAL, "small", "Ready")
    runner = emulators.of(namespace, pod)
    assert runner.store.models[0].tags == ["mirror.local:5000/ai/qwen3:0.6B"]

    node_simulator.crash(namespace, pod)
    wait_for(
        lambda: len(runner.calls("POST", CONFIGURE_LLAMA)) == 2,
        timeout=10,
        message="the restarted runner to be configured again",
    )
    assert pulled(runner) == ["ai/qwen3:0.6B"]


def test_thirty_models_at_once_wait_for_the_runners_two_pull_slots(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    runner = emulators.of(namespace, pod)
    objects.create(PLURAL, cluster.dmrmodel("served", {"model": "ai/smollm2"}))
    objects.wait_phase(PLURAL, "served", "Ready")
    # Thirty slow pulls (about 0.4 s each): model-runner runs two at a time per process.
    source = runner.catalogue["docker.io/ai/qwen3:0.6B"]
    names = [f"m{index:02d}" for index in range(30)]
    for name in names:
        reference = f"ai/many-{name}:1"
        digest = "sha256:" + f"{int(name[1:]):064x}"
        runner.catalogue[f"docker.io/{reference}"] = dataclasses.replace(
            source, reference=reference, digest=digest
        )
    runner.pull_line_delay = 0.1
    applied = time.monotonic()
    for name in names:
        objects.create(PLURAL, cluster.dmrmodel(name, {"model": f"ai/many-{name}:1"}))

    seen_states: set[str] = set()
    custom: Any = kubernetes.client.CustomObjectsApi(api_client)

    def all_ready() -> bool:
        items = custom.list_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, PLURAL
        )["items"]
        by_name = {item["metadata"]["name"]: item.get("status") or {} for item in items}
        # The model already served stays Ready throughout.
        assert by_name["served"].get("phase") == "Ready", by_name["served"]
        for status in by_name.values():
            seen_states.update(r["state"] for r in status.get("runners") or [])
            seen_states.update(c["reason"] for c in status.get("conditions") or [])
        return all(by_name.get(name, {}).get("phase") == "Ready" for name in names)

    wait_for(all_ready, timeout=60, interval=0.2, message="thirty models Ready")
    print(
        f"FAULT 30 models at once on one runner (pulls ~0.4 s each): all Ready after "
        f"{time.monotonic() - applied:.1f} s, pulls in flight at most {runner.max_pulls_in_flight}"
    )

    assert "Queued" in seen_states and "PullQueued" in seen_states
    assert "RunnerUnreachable" not in seen_states
    warnings = {e.reason for e in cluster.events_for(api_client, namespace, "served")}
    for name in names:
        warnings |= {e.reason for e in cluster.events_for(api_client, namespace, name)}
    assert "RunnerUnreachable" not in warnings
    # The operator never had more pulls open on the runner than it serves, and each model was
    # pulled and configured exactly once.
    assert runner.max_pulls_in_flight == 2
    assert pulled(runner) == sorted([f"ai/many-{n}:1" for n in names] + ["ai/smollm2:latest"])
    configured = sorted(body["model"] for body in bodies(runner, CONFIGURE_LLAMA))
    assert configured == sorted([f"ai/many-{n}:1" for n in names] + ["ai/smollm2:latest"])


def test_a_backend_the_runners_image_lacks_is_a_condition_not_a_retry_loop(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    runner = emulators.of(namespace, pod)
    runner.use_image("latest")  # llama.cpp only: no vLLM binary
    objects.create(PLURAL, cluster.dmrmodel("qwen-vllm", VLLM_SPEC))
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2"}))
    objects.wait_phase(PLURAL, "smol", "Ready")
    failed = objects.wait_phase(PLURAL, "qwen-vllm", "Failed")["status"]
    ready = {c["type"]: c for c in failed["conditions"]}["Ready"]
    assert ready["reason"] == "BackendUnavailable"
    assert "backend vllm is not available on runner" in ready["message"]
    assert f"(image {cluster.RUNNER_IMAGE})" in ready["message"]
    assert "'Not Installed: binary not found'" in ready["message"]
    assert "latest-vllm-cuda" in ready["message"]
    # Nothing the runner could not load was configured, and the retries back off.
    assert runner.calls("POST", CONFIGURE_VLLM) == []
    asked = len(runner.calls("GET", "/engines/status"))
    time.sleep(3)
    assert len(runner.calls("GET", "/engines/status")) - asked <= 1
    moved = time.monotonic()

    # The pool moves to a vLLM image (a new pod process): the model is configured there.
    runner.use_image("latest-vllm-cuda")
    node_simulator.crash(namespace, pod)
    objects.wait_phase(PLURAL, "qwen-vllm", "Ready", timeout=30)
    assert bodies(runner, CONFIGURE_VLLM) == [VLLM_WIRE]
    print(
        f"FAULT pool image without the backend: BackendUnavailable, "
        f"{len(runner.calls('GET', '/engines/status'))} status reads in all, Ready "
        f"{time.monotonic() - moved:.1f} s after the pod came back with a vLLM image"
    )


def test_models_beyond_a_runners_slots_and_gpu_memory_are_flagged(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    # 2 CPUs: model-runner runs min(2, 8) = 2 models at once; one GPU of 100 MiB.
    node_simulator.add_node(
        f"{namespace}-small", gpus=1, cpu="2", labels={"nvidia.com/gpu.memory": "100"}
    )
    cluster.create_runner_pool(api_client, namespace=namespace, replicas=1, gpus=1)
    (pod,) = cluster.wait_for_runner_pods(api_client, namespace, "default", 1)
    models = {"qwen": "ai/qwen3:0.6B", "smol": "ai/smollm2", "gemma": "ai/embeddinggemma"}
    for name, reference in models.items():
        mode = {"mode": "embedding"} if name == "gemma" else {}
        objects.create(PLURAL, cluster.dmrmodel(name, {"model": reference, **mode}))

    def capacity_condition(name: str) -> dict[str, Any] | None:
        conditions = objects.status(PLURAL, name).get("conditions") or []
        return next((c for c in conditions if c["type"] == "WithinCapacity"), None)

    def over(name: str) -> dict[str, Any] | None:
        found = capacity_condition(name)
        message = (found or {}).get("message", "")
        return found if found and "GPUs have" in message else None

    for name in models:
        objects.wait_phase(PLURAL, name, "Ready")  # a warning, not a block
        condition = wait_for(lambda n=name: over(n), timeout=15, message=f"{name} flagged")
        assert condition["status"] == "False" and condition["reason"] == "OverCapacity"
        assert (
            f"3 models are assigned to runner {pod}, which has 2 runner slots"
            in (condition["message"])
        )
        # 64 + 32 + 48 MiB of weights on a 100 MiB GPU.
        assert (
            "need 0.14 GiB (KV caches come on top), its GPUs have 0.10 GiB"
            in (condition["message"])
        )
    # Events follow the status they describe (the status writer posts them after its writes).
    wait_for(
        lambda: (
            "OverCapacity" in {e.reason for e in cluster.events_for(api_client, namespace, "qwen")}
        ),
        timeout=15,
        message="an OverCapacity Event for qwen",
    )

    objects.delete(PLURAL, "gemma")
    for name in ("qwen", "smol"):
        wait_for(
            lambda n=name: (capacity_condition(n) or {}).get("status") == "True",
            timeout=15,
            message=f"{name} within capacity again",
        )


def test_a_gated_model_is_pulled_with_the_token_from_its_secret(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    runner = emulators.of(namespace, pod)
    spec = {"model": "ai/qwen3:0.6B", "pullTokenSecret": {"name": "hf"}}
    objects.create(PLURAL, cluster.dmrmodel("gated", spec))
    # No Secret yet: the pull is not attempted, and the condition names what is missing.
    failed = objects.wait_phase(PLURAL, "gated", "Failed")["status"]
    ready = {c["type"]: c for c in failed["conditions"]}["Ready"]
    assert ready["reason"] == "PullFailed"
    assert f"spec.pullTokenSecret: Secret {namespace}/hf does not exist" in ready["message"]
    assert runner.calls("POST", "/models/create") == []

    core: Any = kubernetes.client.CoreV1Api(api_client)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "hf"}, "stringData": {"token": "hf_abc"}}
    )
    objects.wait_phase(PLURAL, "gated", "Ready", timeout=30)  # the retry reads it
    (pull,) = runner.calls("POST", "/models/create")
    assert pull.body == {"from": "ai/qwen3:0.6B", "bearer-token": "hf_abc"}
    status = objects.status(PLURAL, "gated")
    assert "hf_abc" not in str(status)


def test_scaling_the_pool_out_configures_the_new_pods(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    for index in range(4):
        node_simulator.add_node(f"{namespace}-gpu-{index}", gpus=1)
    cluster.create_runner_pool(api_client, namespace=namespace, replicas=2, gpus=1)
    cluster.wait_for_runner_pods(api_client, namespace, "default", 2)
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2", "contextSize": 4096}))
    assert objects.wait_phase(PLURAL, "smol", "Ready")["status"]["runnersSummary"] == "2/2"

    cluster.scale_runner_pool(api_client, namespace, "default", 4)
    pods = cluster.wait_for_runner_pods(api_client, namespace, "default", 4)
    wait_for(
        lambda: objects.status(PLURAL, "smol").get("runnersSummary") == "4/4",
        timeout=15,
        message="4/4 runners configured",
    )
    for pod in pods:
        assert len(emulators.of(namespace, pod).calls("POST", CONFIGURE_LLAMA)) == 1


def test_busy_runner_waits_with_backoff_then_configures(
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
    emulator.hold_runner("ai/smollm2", seconds=6)
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2", "contextSize": 2048}))
    wait_for(
        lambda: any(
            c["reason"] == "RunnerBusy"
            for c in objects.status(PLURAL, "smol").get("conditions", [])
        ),
        timeout=10,
        message="RunnerBusy condition",
    )
    assert objects.status(PLURAL, "smol")["phase"] == "Configuring"
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=40)
    attempts = emulator.calls("POST", CONFIGURE_LLAMA)
    # Backoff 1, 2, 4, 8 s over a 6 s hold: a handful of attempts, never a storm.
    assert 2 <= len(attempts) <= 5, [r.status for r in attempts]
    assert [r.status for r in attempts][-1] == 202
    assert {r.status for r in attempts[:-1]} == {409}


def test_busy_policy_unload_evicts_then_configures(
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
    emulator.hold_runner("ai/smollm2", seconds=0.5)
    spec = {"model": "ai/smollm2", "contextSize": 2048, "busyPolicy": "Unload"}
    objects.create(PLURAL, cluster.dmrmodel("smol", spec))
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=20)
    assert emulator.calls("POST", "/engines/unload")


def test_unreachable_runner_recovers_on_its_own(
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
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2"}))
    wait_for(
        lambda: (
            objects.status(PLURAL, "smol").get("conditions", [{}])[-1].get("reason")
            == "RunnerUnreachable"
        ),
        timeout=10,
        message="RunnerUnreachable on Ready",
    )
    node_simulator.run(emulator.start_listening())
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=20)
    assert len(emulator.calls("POST", CONFIGURE_LLAMA)) == 1


def test_pull_failing_after_200_is_retried_with_backoff(
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
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2"}))
    wait_for(
        lambda: (
            objects.status(PLURAL, "smol").get("conditions", [{}])[0].get("reason") == "PullFailed"
        ),
        timeout=10,
        message="PullFailed",
    )
    time.sleep(3)  # an observation window: no retry storm while the fault lasts
    assert len(emulator.calls("POST", "/models/create")) == 1
    assert not emulator.calls("POST", CONFIGURE_LLAMA)
    emulator.clear_pull_failures()
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=20)
    assert len(emulator.calls("POST", "/models/create")) == 2


def test_rejected_configuration_is_not_retried_until_the_spec_changes(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    emulator.configure_failure = 'runtime flag "--bogus" is not allowed for backend "llama.cpp"'
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2"}))
    wait_for(
        lambda: objects.status(PLURAL, "smol").get("phase") == "Failed",
        timeout=10,
        message="phase Failed",
    )
    ready = objects.status(PLURAL, "smol")["conditions"][-1]
    assert ready["reason"] == "ConfigRejected"
    assert "--bogus" in ready["message"]
    time.sleep(3)  # verify passes happen every 2 s: none of them may resend the rejected config
    assert len(emulator.calls("POST", CONFIGURE_LLAMA)) == 1
    emulator.configure_failure = None
    objects.patch_spec(PLURAL, "smol", {"contextSize": 4096})
    objects.wait_phase(PLURAL, "smol", "Ready", timeout=10)
    assert len(emulator.calls("POST", CONFIGURE_LLAMA)) == 2


def test_spec_change_reconfigures_and_moves_observed_generation(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2", "contextSize": 2048}))
    objects.wait_phase(PLURAL, "smol", "Ready")
    patched = objects.patch_spec(PLURAL, "smol", {"contextSize": 8192, "keepAlive": "10m"})
    wait_for(
        lambda: (
            objects.status(PLURAL, "smol").get("observedGeneration")
            == patched["metadata"]["generation"]
            and objects.status(PLURAL, "smol").get("phase") == "Ready"
        ),
        timeout=10,
        message="the new generation Ready",
    )
    emulator = emulators.of(namespace, pod)
    assert bodies(emulator, CONFIGURE_LLAMA)[-1] == {
        "model": "ai/smollm2:latest",
        "context-size": 8192,
        "keep_alive": "10m",
    }
    assert objects.status(PLURAL, "smol")["effective"]["keep_alive"] == "10m0s"


def test_delete_unloads_from_a_live_runner(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2"}))
    found = objects.wait_phase(PLURAL, "smol", "Ready")
    assert "dmr.dev/cleanup" in found["metadata"]["finalizers"]
    objects.delete(PLURAL, "smol")
    wait_for(lambda: objects.get(PLURAL, "smol") is None, timeout=15, message="object gone")
    assert bodies(emulator, "/engines/unload") == [
        {"all": False, "backend": "llama.cpp", "models": ["ai/smollm2:latest"]}
    ]
    assert _configs(emulator) == []  # unload with a backend drops the stored configuration


def _configs(emulator: ModelRunnerEmulator) -> list[dict[str, Any]]:
    return list(httpx.get(f"{emulator.url}/engines/_configure", timeout=5).json())


def test_delete_with_the_runner_down_is_released_within_the_bound(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    emulator = emulators.of(namespace, pod)
    objects.create(PLURAL, cluster.dmrmodel("smol", {"model": "ai/smollm2"}))
    objects.wait_phase(PLURAL, "smol", "Ready")
    node_simulator.run(emulator.stop_listening())
    started = time.monotonic()
    objects.delete(PLURAL, "smol")
    wait_for(lambda: objects.get(PLURAL, "smol") is None, timeout=30, message="object gone")
    print(f"released {time.monotonic() - started:.1f}s after delete with the runner down")
    reasons = [e.reason for e in cluster.events_for(api_client, namespace, "smol")]
    assert "CleanupFailed" in reasons


def test_steady_state_costs_no_writes_and_no_configure_calls(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    pods = pool(api_client, node_simulator, namespace, 2)
    for index in range(3):
        spec = {"model": "ai/smollm2", "mode": ["completion", "embedding", "reranking"][index]}
        objects.create(PLURAL, cluster.dmrmodel(f"m{index}", spec))
    for index in range(3):
        objects.wait_phase(PLURAL, f"m{index}", "Ready")
    time.sleep(1)  # let the last status write and Events land before taking the baseline
    versions = {
        f"m{i}": objects.get(PLURAL, f"m{i}")["metadata"]["resourceVersion"] for i in range(3)
    }
    events = len(cluster.events_for(api_client, namespace, "m0"))
    before = {pod: len(emulators.of(namespace, pod).requests) for pod in pods}
    configures = {
        pod: len(emulators.of(namespace, pod).calls("POST", CONFIGURE_LLAMA)) for pod in pods
    }

    window = 60.0
    time.sleep(window)  # the observation window itself: nothing may happen in it

    after = {f"m{i}": objects.get(PLURAL, f"m{i}")["metadata"]["resourceVersion"] for i in range(3)}
    assert after == versions, "a DMRModel was written in steady state"
    assert len(cluster.events_for(api_client, namespace, "m0")) == events
    for pod in pods:
        emulator = emulators.of(namespace, pod)
        assert len(emulator.calls("POST", CONFIGURE_LLAMA)) == configures[pod]
        new = emulator.requests[before[pod] :]
        # Only the periodic read-back (verify interval 2 s), one GET per runner per pass,
        # whatever the number of models.
        assert {(r.method, r.path) for r in new} <= {("GET", "/engines/_configure")}
        assert len(new) <= window / 2 + 2


def test_external_runner_on_the_allow_list_is_configured(
    operator_kubeconfig: Any,
    namespace: str,
    node_simulator: Any,
    crds: None,
    objects: cluster.CustomObjects,
) -> None:
    emulator = ModelRunnerEmulator()
    node_simulator.run(emulator.start("127.0.0.1", 0))
    try:
        with OperatorProcess(
            kubeconfig=operator_kubeconfig,
            namespaces=[namespace],
            extra_args=["--allowed-runner-hosts", f"127.0.0.1:{emulator.port}"],
        ) as process:
            objects.create(
                PLURAL,
                cluster.dmrmodel("ext", {"model": "ai/smollm2", "runners": {"url": emulator.url}}),
            )
            status = objects.wait_phase(PLURAL, "ext", "Ready")["status"]
            assert status["endpoint"] == f"{emulator.url}/v1"
            assert status["runners"][0]["pod"] == f"127.0.0.1:{emulator.port}"
            # Same runner, host not on the list: refused before any call.
            objects.create(
                PLURAL,
                cluster.dmrmodel(
                    "other", {"model": "ai/smollm2", "runners": {"url": "http://127.0.0.2:1"}}
                ),
            )
            assert (
                objects.wait_phase(PLURAL, "other", "Failed")["status"]["conditions"][-1]["reason"]
                == "InvalidSpec"
            )
            assert "Traceback" not in process.log()
    finally:
        node_simulator.run(emulator.stop())
    assert len(emulator.calls("POST", CONFIGURE_LLAMA)) == 1


def test_duplicate_model_on_the_same_pool_is_a_conflict_on_the_newer_object(
    api_client: Any,
    namespace: str,
    node_simulator: Any,
    emulators: cluster.EmulatorFactory,
    operator: OperatorProcess,
    objects: cluster.CustomObjects,
) -> None:
    (pod,) = pool(api_client, node_simulator, namespace, 1)
    objects.create(PLURAL, cluster.dmrmodel("first", {"model": "ai/smollm2", "contextSize": 2048}))
    objects.wait_phase(PLURAL, "first", "Ready")
    objects.create(PLURAL, cluster.dmrmodel("second", {"model": "smollm2", "contextSize": 8192}))
    ready = objects.wait_phase(PLURAL, "second", "Failed")["status"]["conditions"][-1]
    assert ready["reason"] == "Conflict"
    assert "first" in ready["message"]
    # The older object keeps the runner: its configuration was never replaced.
    assert objects.status(PLURAL, "first")["phase"] == "Ready"
    assert [b["context-size"] for b in bodies(emulators.of(namespace, pod), CONFIGURE_LLAMA)] == [
        2048
    ]


def test_pull_and_deletion_policies(
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
    # Never: a model in the store is used as is; a missing one is a PullFailed without a pull.
    objects.create(
        PLURAL, cluster.dmrmodel("never", {"model": "ai/smollm2", "pullPolicy": "Never"})
    )
    objects.create(
        PLURAL, cluster.dmrmodel("missing", {"model": "ai/qwen3", "pullPolicy": "Never"})
    )
    objects.wait_phase(PLURAL, "never", "Ready")
    wait_for(
        lambda: (
            objects.status(PLURAL, "missing").get("conditions", [{}])[0].get("reason")
            == "PullFailed"
        ),
        timeout=10,
        message="PullFailed for a missing model with pullPolicy Never",
    )
    # Always: pulled even though the store has it.
    objects.create(
        PLURAL,
        cluster.dmrmodel(
            "always", {"model": "ai/qwen3:14B", "pullPolicy": "Always", "deletionPolicy": "Delete"}
        ),
    )
    objects.wait_phase(PLURAL, "always", "Ready")
    assert pulled(emulator) == ["ai/qwen3:14B"]
    # Delete: unloaded and removed from the runner's store; Retain: nothing is called.
    objects.delete(PLURAL, "always")
    wait_for(lambda: objects.get(PLURAL, "always") is None, timeout=15, message="always gone")
    assert [r.path for r in emulator.requests if r.method == "DELETE"] == ["/models/ai/qwen3:14B"]
    objects.patch_spec(PLURAL, "never", {"deletionPolicy": "Retain"})
    wait_for(
        lambda: objects.status(PLURAL, "never").get("observedGeneration") == 2,
        timeout=10,
        message="the Retain change observed",
    )
    before = len(emulator.requests)
    objects.delete(PLURAL, "never")
    wait_for(lambda: objects.get(PLURAL, "never") is None, timeout=15, message="never gone")
    assert not [r for r in emulator.requests[before:] if r.method != "GET"]
