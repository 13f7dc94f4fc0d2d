"""DMRModelController's bookkeeping without I/O: which watch events make status work.

What it does on a real apiserver and runners is in tests/integration/test_dmrmodel.py; here only
the cost rules: an event that cannot change a DMRModel's status must not mark it for recompute
(at a thousand DMRModels, every marked one is a status computation).
"""

from __future__ import annotations

from typing import Any

import httpx

from dmr_operator.controllers import dmrmodels
from dmr_operator.testing import cluster


def controller_with_models(*names: str) -> dmrmodels.DMRModelController:
    controller = dmrmodels.DMRModelController(
        http=httpx.AsyncClient(),
        kube=None,  # type: ignore[arg-type]  # no API calls in these tests
        settings=dmrmodels.ControllerSettings(),
    )
    for index, name in enumerate(names):
        body = cluster.dmrmodel(name, {"model": f"ai/m{index}"})
        body["metadata"] |= {"namespace": "ns", "uid": f"uid-{name}", "generation": 1}
        controller.model_changed(body)
    controller.status._dirty.clear()
    return controller


def service(name: str, selector: dict[str, str], **metadata: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", **metadata},
        "spec": {"selector": selector, "ports": [{"port": 80, "targetPort": 12434}]},
    }


def marked(controller: dmrmodels.DMRModelController) -> set[str]:
    found = set(controller.status._dirty)
    controller.status._dirty.clear()
    return found


def test_an_agents_service_marks_no_dmrmodel() -> None:
    controller = controller_with_models("a", "b")
    controller.service_changed(service("helper", {"dmr.dev/agent": "helper"}))
    assert marked(controller) == set()


def test_a_pool_service_marks_the_models_of_its_pool_once() -> None:
    controller = controller_with_models("a", "b")
    pool = service("dmr-pool-default", {"dmr.dev/pool": "default"}, resourceVersion="1")
    controller.service_changed(pool)
    assert marked(controller) == {"ns/a", "ns/b"}
    # The same Service again (resourceVersion bump, annotation): no endpoint can change.
    controller.service_changed({**pool, "metadata": {**pool["metadata"], "resourceVersion": "2"}})
    assert marked(controller) == set()
    controller.service_changed(pool, deleted=True)
    assert marked(controller) == {"ns/a", "ns/b"}


def test_a_service_that_stops_fronting_the_pool_marks_its_models() -> None:
    controller = controller_with_models("a")
    controller.service_changed(service("front", {"dmr.dev/pool": "default"}))
    marked(controller)
    controller.service_changed(service("front", {"dmr.dev/pool": "elsewhere"}))
    assert marked(controller) == {"ns/a"}


def test_events_older_than_our_status_writes_do_not_undo_them() -> None:
    controller = controller_with_models("a")
    body = dict(controller.bodies["ns/a"])
    configuring, ready = {"phase": "Configuring"}, {"phase": "Ready"}

    def event(status: dict[str, Any]) -> dict[str, Any]:
        controller.model_changed({**body, "status": status})
        return dict(controller.bodies["ns/a"]["status"])

    # We wrote Configuring over {} and then Ready over Configuring; kopf's finalizer patch (with
    # the status from before both) and the echo of the first write are still on their way.
    controller.status._unechoed["ns/a"] = ([{}, configuring], ready)
    assert event({}) == ready
    assert event(configuring) == ready
    assert event(ready) == ready  # our last write has arrived
    assert "ns/a" not in controller.status._unechoed
    assert event({}) == {}  # from now on whatever the watch shows is taken


def test_another_clients_status_is_taken_even_when_our_echo_was_skipped() -> None:
    # kopf handles only the last of a burst of events for one object: the echo may never come.
    controller = controller_with_models("a")
    body = dict(controller.bodies["ns/a"])
    controller.status._unechoed["ns/a"] = ([{}], {"phase": "Ready"})
    controller.model_changed({**body, "status": {"phase": "Failed", "runners": []}})
    assert controller.bodies["ns/a"]["status"] == {"phase": "Failed", "runners": []}
    assert "ns/a" not in controller.status._unechoed


def runner_pod(name: str, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": {"dmr.dev/pool": "default", **labels},
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "model-runner"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9"},
    }


def placed_models(*names: str) -> dmrmodels.DMRModelController:
    controller = controller_with_models()
    for name in names:
        body = cluster.dmrmodel(name, {"model": f"ai/{name}", "placement": {"replicas": 1}})
        body["metadata"] |= {"namespace": "ns", "uid": f"uid-{name}", "generation": 1}
        controller.model_changed(body)
    controller.status._dirty.clear()
    return controller


def test_a_placement_label_on_a_pod_marks_only_the_model_it_names() -> None:
    # Each label patch is a pod event; at 200 placed models a namespace, marking them all on
    # every one of them was 200 status computations per patch.
    controller = placed_models("a", "b", "c")
    controller.pod_changed(runner_pod("r-0"))
    marked(controller)
    controller.pod_changed(runner_pod("r-0", **{"placement.dmr.dev/b": "true"}))
    assert marked(controller) == {"ns/b"}
    controller.pod_changed(runner_pod("r-0", **{"other/label": "x", "placement.dmr.dev/b": "true"}))
    assert marked(controller) == set()


def test_another_namespaces_pods_and_services_mark_nothing_here() -> None:
    controller = controller_with_models("a")
    controller.pod_changed(runner_pod("r-0", namespace="elsewhere"))
    other = service("dmr-pool-default", {"dmr.dev/pool": "default"})
    controller.service_changed({**other, "metadata": {**other["metadata"], "namespace": "x"}})
    assert marked(controller) == set()
    assert controller.pods_in("elsewhere")[0].key == "elsewhere/r-0"
    assert [t.key for t in controller.targets_in("ns")] == ["ns/a"]
    controller.model_gone("ns", "a")
    assert controller.targets_in("ns") == []


def test_a_placed_models_own_service_is_not_kept() -> None:
    # One per placed DMRModel (10,000 at 10,000): never a pool's endpoint, so never held.
    controller = placed_models("a")
    own = service("dmrm-a", {"dmr.dev/pool": "default", "placement.dmr.dev/a": "true"})
    controller.service_changed(own)
    assert "dmrm-a" not in controller.services.get("ns", {})
    assert marked(controller) == set()
    pool = service("dmr-pool-default", {"dmr.dev/pool": "default"}, managedFields=[{"m": "x"}])
    controller.service_changed(pool)
    kept = controller.services["ns"]["dmr-pool-default"]
    assert "managedFields" not in kept["metadata"] and kept["spec"] == pool["spec"]
