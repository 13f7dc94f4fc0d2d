"""Runner pods as the controller sees them, pool endpoints, the external-URL security boundary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dmr_operator.reconcile import documents, runners, selectors


def pod(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "pool-0",
            "namespace": "ns",
            "uid": "u1",
            "labels": {"dmr.dev/pool": "default"},
        },
        "spec": {
            "nodeName": "gpu-1",
            "containers": [
                {"name": "sidecar", "ports": [{"containerPort": 8080}]},
                {"name": "model-runner", "ports": [{"name": "dmr", "containerPort": 13434}]},
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": "127.0.1.7",
            "containerStatuses": [{"name": "model-runner", "ready": True, "restartCount": 2}],
            **status,
        },
    }


def test_runner_from_pod_uses_the_dmr_port_and_container_restarts() -> None:
    runner = runners.runner_from_pod(pod())
    assert runner.base_url == "http://127.0.1.7:13434"
    assert runner.ready
    assert runner.incarnation == ("u1", "127.0.1.7", "2")
    assert runner.node == "gpu-1"


def test_runner_not_ready_without_ip_or_when_terminating() -> None:
    assert not runners.runner_from_pod(pod(podIP=None)).ready
    terminating = pod()
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not runners.runner_from_pod(terminating).ready
    unready = pod(containerStatuses=[{"name": "model-runner", "ready": False, "restartCount": 0}])
    assert not runners.runner_from_pod(unready).ready


def test_a_native_sidecar_runner_is_found_with_its_restarts() -> None:
    sidecar_pod = pod(
        containerStatuses=[{"name": "docker-agent", "ready": True, "restartCount": 0}],
        initContainerStatuses=[{"name": "model-runner", "ready": True, "restartCount": 3}],
    )
    sidecar_pod["spec"] = {
        "nodeName": "gpu-1",
        "containers": [
            {"name": "docker-agent", "ports": [{"name": "http", "containerPort": 8080}]}
        ],
        "initContainers": [
            {
                "name": "model-runner",
                "restartPolicy": "Always",
                "image": "docker/model-runner:latest-cuda",
                "ports": [{"name": "dmr", "containerPort": 12434}],
                "resources": {"limits": {"nvidia.com/gpu": "2"}},
            }
        ],
    }
    runner = runners.runner_from_pod(sidecar_pod)
    assert runner.base_url == "http://127.0.1.7:12434"
    assert runner.ready and runner.incarnation == ("u1", "127.0.1.7", "3")
    assert (runner.image, runner.gpus) == ("docker/model-runner:latest-cuda", 2)


@pytest.mark.parametrize(
    ("env", "limits", "idle"),
    [
        ([], {}, "5m0s"),
        ([{"name": "MODEL_RUNNER_ENVIRONMENT", "value": "cloud"}], {}, "5m0s"),
        (
            [{"name": "MODEL_RUNNER_ENVIRONMENT", "value": "cloud"}],
            {"nvidia.com/gpu": "1"},
            "8h0m0s",
        ),
        ([{"name": "MODEL_RUNNER_ENVIRONMENT", "value": "cloud"}], {"amd.com/gpu": "1"}, "5m0s"),
        ([], {"nvidia.com/gpu": "1"}, "5m0s"),
    ],
)
def test_the_runners_default_idle_timeout_follows_model_runners_rule(
    env: list[dict[str, str]], limits: dict[str, str], idle: str
) -> None:
    runner_pod = pod()
    runner_pod["spec"]["containers"][1] |= {"env": env, "resources": {"limits": limits}}
    assert runners.runner_from_pod(runner_pod).default_keep_alive == idle


def test_pool_endpoint_is_the_v1_alias_of_the_matching_service() -> None:
    services = [
        {
            "metadata": {"name": "other", "namespace": "ns"},
            "spec": {"selector": {"app": "x"}, "ports": [{"port": 1}]},
        },
        {
            "metadata": {"name": "dmr-pool-default", "namespace": "ns"},
            "spec": {
                "selector": {"dmr.dev/pool": "default"},
                "ports": [{"name": "http", "port": 80, "targetPort": 12434}],
            },
        },
    ]
    selector = {"matchLabels": {"dmr.dev/pool": "default"}}
    assert (
        runners.pool_service_endpoint(services, selector) == "http://dmr-pool-default.ns.svc:80/v1"
    )
    assert runners.pool_service_endpoint(services, {"matchLabels": {"dmr.dev/pool": "b"}}) is None


@pytest.mark.parametrize(
    ("url", "allowed", "problem"),
    [
        ("http://gpu-box:12434", ["gpu-box"], None),
        ("http://gpu-box:12434", ["gpu-box:12434"], None),
        ("http://gpu-box:9999", ["gpu-box:12434"], "not on the operator's allowed"),
        ("http://169.254.169.254/latest", ["169.254.169.254"], "metadata"),
        ("http://metadata.google.internal/", ["metadata.google.internal"], "metadata"),
        ("http://[fe80::1]:12434", ["fe80::1"], "link-local"),
        ("http://169.254.1.1:12434", ["169.254.1.1"], "link-local"),
        ("http://0.0.0.0:12434", ["0.0.0.0"], "unspecified"),
        ("http://user:pw@gpu-box:12434", ["gpu-box"], "credentials"),
        ("ftp://gpu-box", ["gpu-box"], "only http"),
        ("http://GPU-BOX.:12434", ["gpu-box"], None),
    ],
)
def test_external_runner_urls(url: str, allowed: list[str], problem: str | None) -> None:
    found = runners.external_url_problem(url, allowed)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
            {"a": "2"},
            True,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {}, True),
    ],
)
def test_selector_matching(
    selector: dict[str, Any], labels: dict[str, str], expected: bool
) -> None:
    assert selectors.matches(selector, labels) is expected


@pytest.mark.parametrize(
    "url",
    ["http://[::ffff:169.254.169.254]/", "http://0xa9fea9fe/", "http://2852039166/"],
)
def test_metadata_address_in_any_spelling_is_refused(url: str) -> None:
    allowed = [url.split("//")[1].rstrip("/").strip("[]")]
    assert runners.external_url_problem(url, allowed) is not None


async def test_allowed_name_resolving_to_a_refused_address_is_caught_at_call_time() -> None:
    from dmr_operator.controllers import runner_worker

    assert await runner_worker._resolved_address_problem("http://169.254.1.1:12434") is not None
    assert await runner_worker._resolved_address_problem("http://127.0.0.1:12434") is None


def test_a_service_fronts_a_pool_when_its_whole_selector_is_on_the_pool_pods() -> None:
    pool = {"dmr.dev/pool": "default", "app": "runner"}
    assert runners.fronts_pool({"spec": {"selector": {"dmr.dev/pool": "default"}}}, pool)
    assert not runners.fronts_pool({"spec": {"selector": {"dmr.dev/agent": "helper"}}}, pool)
    assert not runners.fronts_pool({"spec": {"selector": {}}}, pool)  # selects nothing
    assert not runners.fronts_pool(None, pool)


def test_only_selector_and_ports_of_a_service_decide_an_endpoint() -> None:
    service = {"metadata": {"resourceVersion": "1"}, "spec": {"selector": {"a": "b"}, "ports": []}}
    bumped = {**service, "metadata": {"resourceVersion": "2", "annotations": {"x": "y"}}}
    assert runners.endpoint_facts(service) == runners.endpoint_facts(bumped)
    moved = {**service, "spec": {"selector": {"a": "b"}, "ports": [{"port": 81}]}}
    assert runners.endpoint_facts(service) != runners.endpoint_facts(moved)
    assert runners.endpoint_facts(None) is None


def test_watched_objects_are_kept_without_managed_fields() -> None:
    body = {"metadata": {"name": "m", "managedFields": [{"manager": "kubectl"}]}, "spec": {}}
    lean = documents.without_managed_fields(body)
    assert lean == {"metadata": {"name": "m"}, "spec": {}}
    assert body["metadata"]["managedFields"]  # the watched object itself is not changed
    plain = {"metadata": {"name": "m"}}
    assert documents.without_managed_fields(plain) is plain


def test_a_watched_object_is_kept_as_its_identity_and_the_parts_asked_for() -> None:
    body = json.loads(
        json.dumps(
            {
                "apiVersion": "dmr.dev/v1alpha1",
                "kind": "DMRModel",
                "metadata": {
                    "name": "m",
                    "namespace": "ns",
                    "uid": "u",
                    "generation": 2,
                    "resourceVersion": "7",
                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                    "labels": {"team": "a"},
                    "managedFields": [{"manager": "kubectl"}],
                },
                "spec": {"model": "ai/m"},
                "status": {
                    "phase": "Ready",
                    "conditions": [{"type": "Ready", "message": "x" * 80}],
                },
            }
        )
    )
    kept = documents.lean(body, "status")
    assert kept == {
        "apiVersion": "dmr.dev/v1alpha1",
        "kind": "DMRModel",
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "uid": "u",
            "generation": 2,
            "resourceVersion": "7",
        },
        "status": body["status"],
    }
    # Keys and short strings are shared with every other object that has them.
    other = documents.lean(json.loads(json.dumps(body)), "status")
    assert next(iter(other["status"])) is next(iter(kept["status"]))
    assert other["status"]["phase"] is kept["status"]["phase"]
    condition, other_condition = kept["status"]["conditions"][0], other["status"]["conditions"][0]
    assert condition["message"] == other_condition["message"]
    assert condition["message"] is not other_condition["message"]  # long ones are left alone


def test_a_placed_models_own_service_never_fronts_a_pool() -> None:
    pool = {"spec": {"selector": {"dmr.dev/pool": "default"}}}
    placed = {"spec": {"selector": {"dmr.dev/pool": "default", "placement.dmr.dev/m": "true"}}}
    assert runners.may_front_a_pool(pool)
    assert not runners.may_front_a_pool(placed)
    assert not runners.may_front_a_pool({"spec": {}})  # selectorless: endpoints by hand
