"""The restricted Pod Security checker (dmr_operator.testing.podsecurity), and the chart's pods.

Covers: a compliant pod passes; each restricted and baseline rule is caught on its own;
pod-level settings count for every container; the operator and every kind of runner pool the
chart renders would be admitted in a namespace enforcing "restricted".
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from dmr_operator.testing import helm, podsecurity

CHART = Path(__file__).resolve().parents[2] / "charts" / "dmr-operator"

COMPLIANT: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [
        {
            "name": "app",
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
            },
            "ports": [{"containerPort": 8080}],
        }
    ],
    "volumes": [
        {"name": "scratch", "emptyDir": {}},
        {"name": "store", "persistentVolumeClaim": {"claimName": "x"}},
        {"name": "token", "projected": {"sources": []}},
    ],
}


def mutated(path: str, value: Any) -> dict[str, Any]:
    """COMPLIANT with one setting replaced; ``path`` is dotted, list indexes are numbers."""
    spec = copy.deepcopy(COMPLIANT)
    *parents, leaf = path.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[leaf] = value
    return spec


def test_a_compliant_pod_passes() -> None:
    assert podsecurity.check_restricted(COMPLIANT) == []


def test_container_level_settings_may_replace_pod_level_ones() -> None:
    spec = copy.deepcopy(COMPLIANT)
    del spec["securityContext"]
    spec["containers"][0]["securityContext"].update(
        {"runAsNonRoot": True, "seccompProfile": {"type": "Localhost", "localhostProfile": "p"}}
    )
    assert podsecurity.check_restricted(spec) == []


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("securityContext.runAsNonRoot", False, "runAsNonRoot"),
        ("securityContext.runAsUser", 0, "runAsUser"),
        ("securityContext.seccompProfile", {"type": "Unconfined"}, "seccompProfile"),
        ("securityContext.seccompProfile", None, "seccompProfile"),
        ("securityContext.sysctls", [{"name": "net.core.somaxconn", "value": "1"}], "sysctl"),
        ("securityContext.seLinuxOptions", {"type": "spc_t"}, "seLinuxOptions"),
        ("hostNetwork", True, "hostNetwork"),
        ("hostPID", True, "hostPID"),
        ("hostIPC", True, "hostIPC"),
        ("volumes", [{"name": "root", "hostPath": {"path": "/"}}], "hostPath"),
        ("volumes", [{"name": "nfs", "nfs": {"server": "x", "path": "/"}}], "nfs"),
        ("containers.0.securityContext.allowPrivilegeEscalation", True, "allowPrivilegeEscalation"),
        ("containers.0.securityContext.allowPrivilegeEscalation", None, "allowPrivilegeEscalation"),
        ("containers.0.securityContext.privileged", True, "privileged"),
        (
            "containers.0.securityContext.capabilities",
            {"drop": ["NET_RAW"]},
            "drop must include ALL",
        ),
        (
            "containers.0.securityContext.capabilities",
            {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
            "SYS_ADMIN",
        ),
        ("containers.0.securityContext.runAsUser", 0, "runAsUser"),
        ("containers.0.securityContext.procMount", "Unmasked", "procMount"),
        ("containers.0.securityContext.windowsOptions", {"hostProcess": True}, "hostProcess"),
        ("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}, "appArmor"),
        ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "hostPort"),
    ],
)
def test_each_violation_is_reported(path: str, value: Any, message: str) -> None:
    violations = podsecurity.check_restricted(mutated(path, value))
    # A pod-level breach may be reported for the pod and again for each container it covers.
    assert violations and all(message in violation for violation in violations), violations


@pytest.mark.parametrize("field", ["initContainers", "ephemeralContainers"])
def test_every_kind_of_container_is_checked(field: str) -> None:
    spec = copy.deepcopy(COMPLIANT)
    spec[field] = [{"name": "extra"}]
    violations = podsecurity.check_restricted(spec)
    assert violations and all(v.startswith("container extra:") for v in violations)


@pytest.mark.parametrize(
    ("manifest", "found"),
    [
        ({"kind": "Pod", "spec": COMPLIANT}, True),
        ({"kind": "StatefulSet", "spec": {"template": {"spec": COMPLIANT}}}, True),
        ({"kind": "Deployment", "spec": {"template": {"spec": COMPLIANT}}}, True),
        (
            {
                "kind": "CronJob",
                "spec": {"jobTemplate": {"spec": {"template": {"spec": COMPLIANT}}}},
            },
            True,
        ),
        ({"kind": "Service", "spec": {}}, False),
    ],
)
def test_pod_spec_of_finds_the_pod_inside_workloads(manifest: dict[str, Any], found: bool) -> None:
    assert (podsecurity.pod_spec_of(manifest) == COMPLIANT) is found


RUNNER_POOLS = [
    {"name": "nvidia", "accelerator": "nvidia"},
    {"name": "vllm", "accelerator": "nvidia", "vllm": True, "gpus": 2},
    {"name": "amd", "accelerator": "amd"},
    {"name": "cpu", "accelerator": "cpu", "replicas": 3},
]


def test_every_pod_the_chart_renders_is_restricted() -> None:
    objects = helm.render_chart(CHART, values={"runnerPools": RUNNER_POOLS, "replicaCount": 2})
    pod_specs = {
        f"{obj['kind']}/{obj['metadata']['name']}": spec
        for obj in objects
        if (spec := podsecurity.pod_spec_of(obj)) is not None
    }
    assert len(pod_specs) == 1 + len(RUNNER_POOLS)
    for name, spec in pod_specs.items():
        assert podsecurity.check_restricted(spec) == [], name


def test_a_loosened_pool_is_caught() -> None:
    pool = {"name": "loose", "securityContext": {"allowPrivilegeEscalation": True}}
    objects = helm.render_chart(CHART, values={"runnerPools": [pool]})
    (statefulset,) = [obj for obj in objects if obj["kind"] == "StatefulSet"]
    spec = podsecurity.pod_spec_of(statefulset)
    assert spec is not None
    assert podsecurity.check_restricted(spec) == [
        "container model-runner: allowPrivilegeEscalation must be false"
    ]
