"""The Helm chart installed on the real control plane, RBAC on, and the operator running as its SA.

The chart is rendered with Helm's own code (``testing.helm``) and server-side applied in Helm's
install order, CRDs and runner pool included. Instead of the operator Deployment's pod (there is
no kubelet to run its image; the chart is installed with ``replicaCount: 0``), the operator runs
as a process with the chart's ServiceAccount token and exactly the arguments of the rendered
Deployment. Both RBAC modes: a ClusterRole for the whole cluster, and a Role in one watched
namespace (with leader election through the chart's Lease). In each, a DMRModel on the chart's
pool and an Agent reach Ready, the probe and metrics ports answer, the operator logs no 403, and
requests outside its rights are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import pytest

from dmr_operator import constants
from dmr_operator.testing import cluster, controlplane, helm, manifests
from dmr_operator.testing.operatorprocess import OperatorProcess

CHART = Path(__file__).parents[2] / "charts" / "dmr-operator"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
POOL_STORAGE = "1Gi"


@dataclasses.dataclass
class Installed:
    namespace: str
    objects: list[dict[str, Any]]
    service_account: str

    def one(self, kind: str) -> dict[str, Any]:
        (found,) = [obj for obj in self.objects if obj["kind"] == kind]
        return found


def chart_values(*, namespace: str, cluster_wide: bool) -> dict[str, Any]:
    """A GPU pool like a real install's, no operator pod; namespaced mode watches ``namespace``."""
    return {
        "replicaCount": 0,
        "watchNamespaces": [] if cluster_wide else [namespace],
        "rbac": {"clusterWide": cluster_wide},
        # Leader election in one mode: its Lease rights (a Role in the release namespace) too.
        "leaderElection": {"enabled": not cluster_wide},
        "runnerPools": [
            {
                "name": constants.DEFAULT_POOL,
                "accelerator": "nvidia",
                "gpus": 1,
                "storage": {"size": POOL_STORAGE},
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            }
        ],
    }


@pytest.fixture
def install(api_client: Any, namespace: str) -> Iterator[Any]:
    """Installs the chart as release ``namespace`` into ``namespace``; removes what it made."""
    applier = manifests.Applier(api_client, field_manager="helm")
    installed: list[Installed] = []
    volumes: list[dict[str, Any]] = []

    def run(values: dict[str, Any]) -> Installed:
        rendered = helm.render_chart(
            CHART, values=values, release=namespace, namespace=namespace, include_crds=True
        )
        objects = helm.sort_for_install(rendered)
        # No storage provisioner here: one volume for the pool replica's claim.
        volumes.append(manifests.placeholder_volume(f"{namespace}-models-0", size=POOL_STORAGE))
        applier.apply(volumes[-1])
        applier.apply_all(objects, namespace=namespace)
        account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
        installed.append(Installed(namespace, objects, account))
        return installed[-1]

    yield run
    for release in installed:
        for obj in release.objects:
            # CRDs stay (other tests' objects live in them), as crds.keep does on uninstall.
            if not obj["metadata"].get("namespace") and obj["kind"] != "CustomResourceDefinition":
                with contextlib.suppress(kubernetes.client.ApiException):
                    applier.delete(obj)
    for volume in volumes:
        with contextlib.suppress(kubernetes.client.ApiException):
            applier.delete(volume)


def operator_arguments(deployment: dict[str, Any]) -> tuple[list[str], dict[str, str], int, int]:
    """The operator container's args as the chart renders them, listening on free local ports.

    Only the probe and metrics listeners move (to 127.0.0.1 and a free port: tests share the
    machine). ``--flag=value`` is passed as ``--flag value``, which argparse reads the same.
    Returns (args, env, liveness port, metrics port).
    """
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["dmr-operator", "run"]
    liveness_port, metrics_port = controlplane.free_port(), controlplane.free_port()
    args: list[str] = []
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        if flag == "--liveness":
            assert value == "http://0.0.0.0:8080/healthz"
            value = f"http://127.0.0.1:{liveness_port}/healthz"
        elif flag == "--metrics-port":
            assert value == "9090"
            value = str(metrics_port)
        args += [flag, value] if value else [flag]
    # The fieldRef values a kubelet would fill in.
    env = {item["name"]: f"{deployment['metadata']['name']}-0" for item in container["env"]}
    env["POD_NAMESPACE"] = deployment["metadata"]["namespace"]
    return args, env, liveness_port, metrics_port


def status_of(error: Any) -> int:
    return int(error.value.status)


@pytest.mark.parametrize("cluster_wide", [True, False], ids=["cluster-role", "namespaced-role"])
def test_operator_with_the_charts_rbac_reconciles_and_is_refused_outside_its_rights(
    cluster_wide: bool,
    api_client: Any,
    control_plane: controlplane.ControlPlane,
    namespace: str,
    node_simulator: Any,
    objects: cluster.CustomObjects,
    install: Any,
    tmp_path: Path,
) -> None:
    node_simulator.add_node(f"{namespace}-gpu-0", gpus=1, taints=[GPU_TAINT])
    node_simulator.add_node(f"{namespace}-cpu-0")
    release = install(chart_values(namespace=namespace, cluster_wide=cluster_wide))
    deployment = release.one("Deployment")
    assert deployment["spec"]["replicas"] == 0
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == release.service_account

    token = cluster.service_account_token(api_client, namespace, release.service_account)
    user = f"system:serviceaccount:{namespace}:{release.service_account}"
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig", user=user)
    args, env, liveness_port, metrics_port = operator_arguments(deployment)
    assert ("--all-namespaces" in args) == cluster_wide
    assert ("--leader-elect" in args) == (not cluster_wide)

    operator = OperatorProcess(kubeconfig=kubeconfig, extra_args=args, env=env, verify_interval=5)
    operator.start()
    try:
        objects.create(
            constants.DMRMODEL_PLURAL,
            cluster.dmrmodel("qwen", {"model": "ai/qwen3:0.6B", "contextSize": 4096}),
        )
        objects.create(
            constants.AGENT_PLURAL,
            {
                "apiVersion": constants.API_VERSION,
                "kind": constants.AGENT_KIND,
                "metadata": {"name": "helper"},
                "spec": {
                    "config": {
                        "agents": {"root": {"model": "main", "instruction": "You help."}},
                        "models": {"main": {"dmrModel": "qwen"}},
                    }
                },
            },
        )
        ready = objects.wait_phase(constants.DMRMODEL_PLURAL, "qwen", "Ready", timeout=60)
        pool_service = f"{namespace}-pool-{constants.DEFAULT_POOL}"
        assert ready["status"]["endpoint"] == f"http://{pool_service}.{namespace}.svc:80/v1"
        assert ready["status"]["runnersSummary"] == "1/1"
        (runner,) = ready["status"]["runners"]
        assert runner["pod"] == f"{pool_service}-0" and runner["node"] == f"{namespace}-gpu-0"
        objects.wait_phase(constants.AGENT_PLURAL, "helper", "Ready", timeout=60)

        # The chart's probe and metrics ports, as the kubelet and Prometheus would see them.
        assert httpx.get(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5).is_success
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert metrics.is_success and "dmr_operator_models" in metrics.text
        assert "dmr_operator_leader 1.0" in metrics.text  # elected, or running alone

        refused_outside_its_rights(kubeconfig, namespace=namespace, cluster_wide=cluster_wide)
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log_tail(40)}")
    # Messages only: a timestamp such as 12:00:13.984039 contains "403" too.
    messages = [
        str(json.loads(line).get("message", "")) if line.startswith("{") else line
        for line in operator.log().splitlines()
    ]
    # RBAC denials only: NamespaceLifecycle also answers 403 to writes into a namespace that an
    # earlier test is deleting, which a cluster-wide operator may still be reconciling.
    forbidden = [
        m
        for m in messages
        if (re.search(r"\b403\b", m) or "orbidden" in m) and "being terminated" not in m
    ]
    assert forbidden == [], "\n".join(forbidden[:10])


def refused_outside_its_rights(kubeconfig: Path, *, namespace: str, cluster_wide: bool) -> None:
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        core: Any = kubernetes.client.CoreV1Api(client)
        rbac: Any = kubernetes.client.RbacAuthorizationV1Api(client)
        # What it may do, it can: the probe below is not refused for a broken token.
        assert core.list_namespaced_pod(namespace).items is not None
        with pytest.raises(kubernetes.client.ApiException) as secrets:
            core.list_namespaced_secret(namespace)
        assert status_of(secrets) == 403
        with pytest.raises(kubernetes.client.ApiException) as escalation:
            rbac.create_cluster_role({"metadata": {"name": f"{namespace}-escalate"}, "rules": []})
        assert status_of(escalation) == 403
        with pytest.raises(kubernetes.client.ApiException) as pods_delete:
            core.delete_collection_namespaced_pod(namespace)
        assert status_of(pods_delete) == 403
        if not cluster_wide:
            # A Role grants nothing beyond its namespace.
            with pytest.raises(kubernetes.client.ApiException) as elsewhere:
                core.list_namespaced_pod("default")
            assert status_of(elsewhere) == 403
    finally:
        client.close()


def test_rendered_arguments_are_the_operators_own_flags() -> None:
    """Every flag the chart passes is one ``dmr-operator run`` accepts (no cluster needed)."""
    from dmr_operator import cli

    values = chart_values(namespace="ns", cluster_wide=False) | {"allowedRunnerHosts": ["a:1"]}
    objects = helm.render_chart(CHART, values=values, release="r", namespace="ns")
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    args, _, _, _ = operator_arguments(deployment)
    parsed = cli.build_parser().parse_args(["run", *args])
    assert parsed.namespace == ["ns"] and parsed.leader_elect
    assert (parsed.leader_election_id, parsed.leader_election_namespace) == ("r-dmr-operator", "ns")
    assert parsed.allowed_runner_hosts == "a:1" and parsed.log_format == "json"
    assert parsed.liveness.startswith("http://127.0.0.1:")
