"""What the placement keeper (``controllers.model_placement``) hands the pure placement: every
copy a pod holds, counted once, until it is gone. Without I/O: Nodes and model sizes are given
as if read, runner workers are not started, and the one unload is a coroutine the test holds.

The end-to-end moves on a real apiserver are in tests/integration/test_model_placement.py; here
the accounting each of them relies on: a copy leaving a pod, a copy being unloaded, models on
every pod of the pool, and pools whose selectors overlap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_placement import needs  # pytest puts tests/unit on the path

from dmr_operator import metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.clients import modelrunner
from dmr_operator.controllers import dmrmodels, model_placement, runner_worker
from dmr_operator.dmr import wire
from dmr_operator.reconcile import dmrmodel, model_memory, model_routing
from dmr_operator.reconcile import runners as runner_views
from dmr_operator.testing import cluster
from dmr_operator.testing.waiting import wait_for_async

GIB = 2**30
NS = "ns"


def gpu_node(name: str, gpu_gib: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": str(gpu_gib * 1024)}},
        "status": {"capacity": {"cpu": "16"}, "allocatable": {"memory": "256Gi"}},
    }


def gpu_pod(name: str, node: str, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": {"dmr.dev/pool": "default", **labels},
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "model-runner", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.9",
            "containerStatuses": [{"name": "model-runner", "ready": True, "restartCount": 0}],
        },
    }


class Cluster:
    """A controller with GPU pods on known Nodes and models of known sizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **gpus: int) -> None:
        self.controller = dmrmodels.DMRModelController(
            http=httpx.AsyncClient(),
            kube=None,  # type: ignore[arg-type]  # label patches go through relabel below
            settings=dmrmodels.ControllerSettings(),
        )
        monkeypatch.setattr(self.controller, "_sync_workers", lambda touched: None)
        self.sizes: dict[str, int] = {}
        self.bodies: dict[str, dict[str, Any]] = {}
        self.generation = 0
        for pod, gib in gpus.items():
            self.controller.placer.nodes[f"node-{pod}"] = gpu_node(f"node-{pod}", gib)
            self.bodies[pod] = gpu_pod(pod, f"node-{pod}")
            self.controller.pod_changed(self.bodies[pod])

    def model(self, name: str, size_gib: float, **spec: Any) -> None:
        """Create or change DMRModel ``name`` (``ai/name``), whose size is ``size_gib`` at the
        contextSize given (the keeper caches sizes per reference and context)."""
        self.generation += 1
        body = cluster.dmrmodel(name, {"model": f"ai/{name}", **spec})
        body["metadata"] |= {"namespace": NS, "uid": f"uid-{name}", "generation": self.generation}
        reference = dmrmodel.target_from_object(body, allowed_runner_hosts=()).normalized
        self.controller.placer.needs[(str(reference), spec.get("contextSize"))] = needs(
            int(size_gib * GIB)
        )
        self.controller.model_changed(body)

    def placed(self, name: str, replicas: int = 1, size_gib: float = 1, **spec: Any) -> None:
        self.model(name, size_gib, placement={"replicas": replicas}, **spec)

    def label(self, pod: str, model: str, value: str | None = "true") -> None:
        """The placement label as the keeper's settle step sets it (None: taken off)."""
        labels = self.bodies[pod]["metadata"]["labels"]
        label = model_routing.placement_label(model)
        if value is None:
            labels.pop(label, None)
        else:
            labels[label] = value
        self.controller.pod_changed(self.bodies[pod])

    def serves(self, pod: str, model: str, size_gib: float) -> None:
        """The model configured on the pod at that size and in its Service, as the keeper's
        settle step leaves it."""
        copies = self.controller.placer.copies.setdefault(f"{NS}/{model}", {})
        copies[f"{NS}/{pod}"] = needs(int(size_gib * GIB))
        self.label(pod, model)

    def chosen(self, name: str) -> tuple[str, ...]:
        return tuple(key.split("/", 1)[1] for key in self.controller.placer.chosen[f"{NS}/{name}"])

    def runner(self, pod: str) -> runner_views.Runner:
        return self.controller.pods[f"{NS}/{pod}"]


def test_a_copy_moving_away_keeps_its_room_until_it_is_unloaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, small=8, big=24)
    pods.placed("grower", size_gib=1, contextSize=4096)
    assert pods.chosen("grower") == ("small",)
    pods.serves("small", "grower", 1)
    # Its context grows beyond the small GPU: it moves to the big one...
    pods.placed("grower", size_gib=10, contextSize=65536)
    assert pods.chosen("grower") == ("big",)
    # ... and while its old copy is still on the small pod (labelled until the big one serves),
    # a 7.5 GiB model that would fit the small GPU's 8 GiB does not go there.
    pods.placed("filler", size_gib=7.5)
    assert pods.chosen("filler") == ("big",)
    pods.placed("second", size_gib=7.5)
    assert pods.chosen("second") == ()
    assert "largest free 7.0 GiB on pod ns/small" in str(
        pods.controller.placer.view(pods.controller.targets[f"{NS}/second"]).shortfall
    )


def test_a_copy_being_unloaded_counts_until_the_unload_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, small=8, big=24)
    pods.placed("grower", size_gib=1, contextSize=4096)
    pods.serves("small", "grower", 1)
    pods.placed("grower", size_gib=10, contextSize=65536)
    pods.serves("big", "grower", 10)
    unloading = asyncio.Event()
    unloaded = asyncio.Event()

    async def release(target: Any, runner: runner_views.Runner) -> None:
        unloading.set()
        await unloaded.wait()

    async def relabel(runner: runner_views.Runner, labels: Mapping[str, str | None]) -> None:
        for label, value in labels.items():
            pods.label(runner.name, label.removeprefix(model_routing.PLACEMENT_LABEL_PREFIX), value)

    monkeypatch.setattr(pods.controller, "release", release)
    monkeypatch.setattr(dmrmodels, "REASSIGN_SHARE", 1.0)  # reassignment at each loop pass
    monkeypatch.setattr(pods.controller, "relabel", relabel)
    target = pods.controller.targets[f"{NS}/grower"]
    label = model_routing.placement_label("grower")

    async def scenario() -> None:
        moving = asyncio.create_task(
            pods.controller.placer._release(target, pods.runner("small"), label)
        )
        await unloading.wait()
        # Out of its Service, not yet out of memory: the small GPU has 7 GiB free, not 8.
        assert model_routing.placement_label("grower") not in pods.runner("small").labels
        pods.placed("filler", size_gib=7.5)
        await asyncio.sleep(0)  # the reassignment runs at the next loop pass
        assert pods.chosen("filler") == ("big",)
        pods.placed("second", size_gib=7.5)
        await asyncio.sleep(0)
        assert pods.chosen("second") == ()
        unloaded.set()
        await moving
        await asyncio.sleep(0)
        assert pods.chosen("second") == ("small",)  # the room is free once the unload is done

    asyncio.run(scenario())


def test_models_on_every_pod_take_their_memory_and_slot_on_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, a=16, b=16)
    pods.model("everywhere", 12)  # no placement: on both pods, 12 of their 16 GiB
    pods.placed("placed", size_gib=6)
    assert pods.chosen("placed") == ()
    shortfall = pods.controller.placer.view(pods.controller.targets[f"{NS}/placed"]).shortfall
    assert shortfall == "placed on 0 of 1 pods: needs 6.0 GiB, largest free 4.0 GiB on pod ns/a"
    pods.placed("small", size_gib=3)
    assert pods.chosen("small") == ("a",)


def test_a_pod_two_pools_select_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    pods = Cluster(monkeypatch, shared=10)
    everyone = {"matchLabels": {"dmr.dev/pool": "default"}}
    by_name = {"matchLabels": {"dmr.dev/pool": "default", "kubernetes.io/hostname": "x"}}
    pods.bodies["shared"]["metadata"]["labels"]["kubernetes.io/hostname"] = "x"
    pods.controller.pod_changed(pods.bodies["shared"])
    pods.placed("x", size_gib=6, runners={"poolSelector": everyone})
    pods.placed("y", size_gib=6, runners={"poolSelector": by_name})
    assert pods.chosen("x") == ("shared",)
    assert pods.chosen("y") == ()  # 6 + 6 GiB on a 10 GiB GPU, whichever selector found it


class Finalizer:
    """The DMRModel finalizer (``DMRModelController.finalize``) on the cluster above: each
    labelled pod's worker applied the model (digest ``sha256:<name>``); unloads fail when
    ``unloads_fail`` is set (the runner answers nothing)."""

    def __init__(self, pods: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pods = pods
        self.unloads_fail = False
        controller = pods.controller
        controller.settings = dataclasses.replace(controller.settings, delete_attempts=1)

        async def relabel(runner: runner_views.Runner, labels: Mapping[str, str | None]) -> None:
            for label, value in labels.items():
                pods.label(
                    runner.name, label.removeprefix(model_routing.PLACEMENT_LABEL_PREFIX), value
                )

        self.unloads = 0

        async def unload(*args: Any, **kwargs: Any) -> None:
            self.unloads += 1
            if self.unloads_fail:
                raise modelrunner.RunnerUnreachable("connection refused")

        self.events: list[str] = []

        async def event(body: Any, type_: str, reason: str, message: str) -> None:
            self.events.append(reason)

        monkeypatch.setattr(controller, "relabel", relabel)
        monkeypatch.setattr(controller.status, "event", event)
        monkeypatch.setattr(modelrunner.ModelRunnerClient, "unload", unload)

    def delete(self, name: str) -> None:
        controller = self.pods.controller
        target = controller.targets[f"{NS}/{name}"]
        for runner in controller.placer.runners_for(target):
            worker = types.SimpleNamespace(state=types.SimpleNamespace(applied={}))
            worker.state.applied[target.key] = runner_worker.Applied(
                fingerprint=target.fingerprint,
                backend="llama.cpp",
                digest=f"sha256:{name}",
                request={},
            )
            controller.workers[runner.key] = worker  # type: ignore[assignment]
        body = cluster.dmrmodel(name, {"model": f"ai/{name}"})  # the finalizer reads its target
        body["metadata"] |= {"namespace": NS, "uid": f"uid-{name}"}
        asyncio.run(controller.finalize(body))
        controller.workers.clear()

    def served_then_deleted(self, pod: str, name: str, size_gib: float, **spec: Any) -> None:
        """Placed DMRModel ``name`` (``spec``) served from ``pod`` at ``size_gib``, then
        deleted."""
        self.pods.placed(name, size_gib=size_gib, **spec)
        self.pods.serves(pod, name, size_gib)
        self.delete(name)

    def runner_lists(self, pod: str, *names: str) -> None:
        """A read-back of the pod's runner listing configurations of ``names`` only."""
        entries = [
            wire.ModelConfigEntry.model_validate(
                {
                    "Backend": "llama.cpp",
                    "Model": f"ai/{n}",
                    "ModelID": f"sha256:{n}",
                    "Mode": "completion",
                    "Config": {},
                }
            )
            for n in names
        ]
        self.pods.controller.placer.listed(self.pods.runner(pod), entries)


def test_a_copy_a_deleted_model_retains_counts_until_its_runner_lists_it_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, only=8)
    finalizer = Finalizer(pods, monkeypatch)
    finalizer.served_then_deleted("only", "kept", 6, deletionPolicy="Retain")
    # Out of its Service, still in the runner's memory: 2 of the 8 GiB are free.
    assert model_routing.placement_label("kept") not in pods.runner("only").labels
    pods.placed("next", size_gib=6)
    assert pods.chosen("next") == ()
    finalizer.runner_lists("only", "kept", "other")  # still configured there
    assert pods.chosen("next") == ()
    finalizer.runner_lists("only", "other")  # unloaded by somebody: the room is free
    assert pods.chosen("next") == ("only",)


def test_a_copy_whose_unload_failed_counts_until_its_runner_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, only=8)
    finalizer = Finalizer(pods, monkeypatch)
    finalizer.unloads_fail = True
    finalizer.served_then_deleted("only", "stuck", 6)
    assert finalizer.events == ["CleanupFailed"]  # and the finalizer is released anyway
    pods.placed("next", size_gib=6)
    assert pods.chosen("next") == ()
    # The runner container restarted: model-runner forgot every configuration it had.
    pods.bodies["only"]["status"]["containerStatuses"][0]["restartCount"] = 1
    pods.controller.pod_changed(pods.bodies["only"])
    assert pods.chosen("next") == ("only",)


def test_an_unloaded_copy_frees_its_room_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    pods = Cluster(monkeypatch, only=8)
    finalizer = Finalizer(pods, monkeypatch)
    finalizer.served_then_deleted("only", "gone", 6)
    pods.placed("next", size_gib=6)
    assert pods.chosen("next") == ("only",)


def test_a_model_created_again_takes_over_the_copy_its_namesake_retained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A GitOps move (the DMRModel deleted with Retain, applied again under another name): the
    # model's copy is where it was, counted once, and stays there.
    pods = Cluster(monkeypatch, only=16)
    finalizer = Finalizer(pods, monkeypatch)
    finalizer.served_then_deleted("only", "before", 10, model="ai/shared", deletionPolicy="Retain")
    pods.placed("after", size_gib=10, model="ai/shared")
    assert pods.chosen("after") == ("only",)  # not 10 GiB more beside the copy: that one
    pods.serves("only", "after", 10)
    pods.placed("filler", size_gib=5)  # 6 GiB free beside the one copy of ai/shared
    assert pods.chosen("filler") == ("only",)


def test_a_copy_whose_unload_failed_after_a_move_still_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, small=8, big=24)
    finalizer = Finalizer(pods, monkeypatch)
    pods.placed("grower", size_gib=1, contextSize=4096)
    pods.serves("small", "grower", 1)
    pods.placed("grower", size_gib=10, contextSize=65536)
    pods.serves("big", "grower", 10)

    async def release(target: Any, runner: runner_views.Runner) -> str:
        return "sha256:grower"  # the runner did not answer the unload

    monkeypatch.setattr(pods.controller, "release", release)
    target = pods.controller.targets[f"{NS}/grower"]
    label = model_routing.placement_label("grower")
    asyncio.run(pods.controller.placer._release(target, pods.runner("small"), label))
    pods.placed("filler", size_gib=7.5)  # the small GPU's 8 GiB hold 7 beside the old copy
    assert pods.chosen("filler") == ("big",)
    pods.placed("second", size_gib=7.5)
    assert pods.chosen("second") == ()
    finalizer.runner_lists("small")  # its read-back: the old copy is gone after all
    assert pods.chosen("second") == ("small",)


class FlakyNodes:
    """The Kubernetes client as placement reads Nodes: 503 until ``answering``."""

    def __init__(self, nodes: Mapping[str, Mapping[str, Any]]) -> None:
        self.nodes = nodes
        self.answering = False
        self.reads = 0

    async def get(self, *, api_version: str, kind: str, namespace: str, name: str) -> Any:
        self.reads += 1
        if not self.answering:
            raise kube_client.KubeError(503, "the server is currently unable to handle the request")
        return self.nodes[name]


def test_a_node_that_could_not_be_read_is_read_again_not_taken_as_unbounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An apiserver restarting answers 503 for a while. Were the Node taken as unreadable for
    # good (as when reading Nodes is not allowed), its pod would be placed on by runner slots
    # alone: a 12 GiB model onto an 8 GiB GPU.
    monkeypatch.setattr(model_placement, "NEEDS_RETRY_SECONDS", 0.2)
    pods = Cluster(monkeypatch)
    kube = FlakyNodes({"node-small": gpu_node("node-small", 8)})
    pods.controller.kube = kube  # type: ignore[assignment]
    big = f"{NS}/big"

    async def scenario() -> None:
        pods.bodies["small"] = gpu_pod("small", "node-small")
        pods.controller.pod_changed(pods.bodies["small"])
        pods.placed("big", size_gib=12)
        await asyncio.sleep(0.5)
        assert big not in pods.controller.placer.chosen  # waiting for its pod's Node
        assert kube.reads <= 3  # at 0, 0.2 and 0.4 s: no loop of failing reads
        kube.answering = True
        await wait_for_async(
            lambda: (
                "largest free 8.0 GiB"
                in str(pods.controller.placer.view(pods.controller.targets[big]).shortfall)
            ),
            timeout=5,
            message="big Insufficient on the 8 GiB GPU",
        )
        assert pods.chosen("big") == ()

    asyncio.run(scenario())


def test_metrics_show_each_pods_room_as_placement_counts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, small=8, big=24)
    pods.placed("a", size_gib=6)
    pods.placed("b", size_gib=6)
    pods.placed("huge", size_gib=30)  # fits nowhere
    monkeypatch.setattr(metrics.PLACEMENT, "pods", pods.controller.placer.rooms)
    monkeypatch.setattr(metrics.PLACEMENT, "short", pods.controller.placer.short_models)
    scraped = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(prometheus_client.generate_latest().decode())
        for sample in family.samples
        if sample.name.startswith("dmr_operator_placement_")
    }
    for pod, gib in (("small", 8), ("big", 24)):
        on_it = [model for model in ("a", "b") if pods.chosen(model) == (pod,)]
        labels = (("namespace", NS), ("pod", pod))
        assert scraped[("dmr_operator_placement_memory_bytes", labels)] == gib * GIB
        assert scraped[("dmr_operator_placement_placed_bytes", labels)] == 6 * GIB * len(on_it)
        assert scraped[("dmr_operator_placement_slots", labels)] == 8
        assert scraped[("dmr_operator_placement_placed_slots", labels)] == len(on_it)
    placed = [v for (name, _), v in scraped.items() if name.endswith("_placed_bytes")]
    assert sum(placed) == 12 * GIB  # a and b, each on one pod
    assert scraped[("dmr_operator_placement_short_models", (("namespace", NS),))] == 1


def test_a_model_created_again_under_the_name_for_another_model_does_not_take_the_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, only=8)
    finalizer = Finalizer(pods, monkeypatch)
    finalizer.served_then_deleted("only", "x", 6, model="ai/first", deletionPolicy="Retain")
    pods.placed("x", size_gib=6, model="ai/second")  # 6 GiB beside ai/first's 6: no room
    assert pods.chosen("x") == ()


def test_a_model_deleted_in_the_middle_of_a_move_is_unloaded_from_the_pod_it_was_leaving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pods = Cluster(monkeypatch, small=8, big=24)
    finalizer = Finalizer(pods, monkeypatch)
    pods.placed("grower", size_gib=1, contextSize=4096)
    pods.serves("small", "grower", 1)
    pods.placed("grower", size_gib=10, contextSize=65536)  # moving to big, not there yet
    assert pods.chosen("grower") == ("big",)
    finalizer.delete("grower")
    assert finalizer.unloads == 2  # big, where it was being configured, and small, serving
    assert pods.controller.placer.left == {}  # both unloaded: nothing left counting anywhere


def test_a_size_that_could_not_be_read_is_read_again_after_a_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_placement, "NEEDS_RETRY_SECONDS", 0.2)
    pods = Cluster(monkeypatch, only=8)
    registry = {"answering": False, "reads": 0}

    async def get_model(self: Any, reference: str, *, remote: bool = False) -> Any:
        registry["reads"] += 1
        if not registry["answering"]:
            raise modelrunner.RunnerUnreachable("registry timeout")
        return types.SimpleNamespace(config=types.SimpleNamespace(size="6GiB"))

    monkeypatch.setattr(modelrunner.ModelRunnerClient, "get_model", get_model)
    monkeypatch.setattr(model_memory, "needs_of", lambda model, context_size: needs(6 * GIB))
    body = cluster.dmrmodel("m", {"model": "ai/m", "placement": {"replicas": 1}})
    body["metadata"] |= {"namespace": NS, "uid": "uid-m", "generation": 1}
    target_key = f"{NS}/m"

    async def scenario() -> None:
        pods.controller.model_changed(body)
        await asyncio.sleep(0.5)
        assert target_key not in pods.controller.placer.chosen
        waiting = pods.controller.placer.waiting[target_key]
        assert "could not read the size of ai/m:latest" in waiting
        assert waiting.endswith("asking again in 30 s")
        assert registry["reads"] <= 3  # at 0, 0.2 and 0.4 s: no loop of failing reads
        registry["answering"] = True
        await wait_for_async(
            lambda: pods.controller.placer.chosen.get(target_key) == (f"{NS}/only",),
            timeout=5,
            message="m placed once its size is read",
        )

    asyncio.run(scenario())
