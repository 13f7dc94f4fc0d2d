"""Placement's routing and budgets (``reconcile.model_routing``): the label and Service that make
a placed model's endpoints exactly its holders, and what a runner pod can hold."""

from __future__ import annotations

from typing import Any

import pytest

from dmr_operator import constants
from dmr_operator.reconcile import model_routing
from dmr_operator.reconcile import runners as runner_views

GIB = 2**30


def node(*, cpu: str | None = "16", memory: str = "64Gi", gpu_mib: str | None = None) -> Any:
    labels = {"nvidia.com/gpu.memory": gpu_mib} if gpu_mib else {}
    capacity = {"cpu": cpu} if cpu else {}
    return {
        "metadata": {"name": "n1", "labels": labels},
        "status": {"capacity": capacity, "allocatable": {"memory": memory}},
    }


def runner_pod(limits: dict[str, str]) -> runner_views.Runner:
    return runner_views.runner_from_pod(
        {
            "metadata": {"name": "r-0", "namespace": "ns", "uid": "u", "labels": {}},
            "spec": {
                "nodeName": "n1",
                "containers": [
                    {
                        "name": constants.RUNNER_CONTAINER,
                        "image": "docker/model-runner:latest",
                        "resources": {"limits": limits},
                    }
                ],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }
    )


def test_a_gpu_pod_is_budgeted_its_gpus_times_the_nodes_memory_per_gpu() -> None:
    budget = model_routing.pod_budget(
        runner_pod({"nvidia.com/gpu": "2", "memory": "8Gi"}), node(gpu_mib="24576")
    )
    assert budget is not None
    assert (budget.gpu_memory_bytes, budget.memory_bytes, budget.slots) == (48 * GIB, 48 * GIB, 8)


def test_a_cpu_pod_with_a_memory_limit_is_budgeted_that_limit_not_its_nodes_memory() -> None:
    # Fifty pods on one node must not each be promised all of it: the cgroup limit is the pod's.
    budget = model_routing.pod_budget(runner_pod({"memory": "24Gi"}), node())
    assert budget is not None
    assert (budget.gpu_memory_bytes, budget.memory_bytes) == (0, 24 * GIB)


def test_a_cpu_pod_without_a_limit_falls_back_to_its_nodes_allocatable_memory() -> None:
    budget = model_routing.pod_budget(runner_pod({}), node(cpu="4", memory="64Gi"))
    assert budget is not None
    assert (budget.memory_bytes, budget.slots) == (64 * GIB, 4)


def test_a_node_without_a_cpu_count_gives_no_budget() -> None:
    assert model_routing.pod_budget(runner_pod({}), node(cpu=None)) is None


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("32Gi", 32 * GIB), ("64000000k", 64 * 10**9), ("1.5Gi", int(1.5 * GIB)), ("100m", None)],
)
def test_memory_quantities(quantity: str, expected: int | None) -> None:
    assert model_routing.memory_in_bytes(quantity) == expected


def test_long_names_keep_label_and_service_names_legal_and_distinct() -> None:
    first, second = "a" * 70 + "-one", "a" * 70 + "-two"
    labels = {model_routing.placement_label(n) for n in (first, second)}
    services = {model_routing.model_service_name(n) for n in (first, second, "m.v1")}
    assert len(labels) == 2 and len(services) == 3
    assert all(len(label.split("/", 1)[1]) <= 63 for label in labels)
    assert all(len(name) <= 63 and "." not in name for name in services)


def test_the_service_selects_the_pool_and_the_models_holders_and_is_owned_by_the_model() -> None:
    service = model_routing.render_model_service(
        model_name="llama",
        namespace="ns",
        pool_labels={constants.POOL_LABEL: "default"},
        owner={"metadata": {"name": "llama", "uid": "u1"}},
    )
    assert service["spec"]["selector"] == {
        constants.POOL_LABEL: "default",
        "placement.dmr.dev/llama": "true",
    }
    (owner,) = service["metadata"]["ownerReferences"]
    assert (owner["uid"], owner["controller"]) == ("u1", True)


def test_orphan_labels_are_the_placement_labels_of_models_that_are_gone() -> None:
    labels = {
        constants.POOL_LABEL: "default",
        "placement.dmr.dev/kept": "true",
        "placement.dmr.dev/gone": "true",
        "team": "x",
    }
    assert model_routing.orphan_placement_labels(labels, ["kept", "other"]) == [
        "placement.dmr.dev/gone"
    ]
    assert model_routing.orphan_placement_labels(labels, ["kept", "gone"]) == []
