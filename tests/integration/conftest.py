"""Fixtures for integration tests on a real local control plane (etcd + kube-apiserver +
controller-manager + scheduler, see dmr_operator.testing.controlplane) with simulated nodes.

``control_plane`` is one per test session; ``namespace`` and ``node_simulator`` are per test.
When the binaries cannot be had, tests skip with the reason, or fail with it when ``CI=true``.
Override ``pod_process_factory`` in a test module to choose what runs behind simulated pods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import kubernetes
import pytest

from dmr_operator.testing import cluster, controlplane, nodesim
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for


@pytest.fixture(scope="session")
def control_plane(
    live_progress: Callable[[str], None], piece_unavailable: Callable[[str], NoReturn]
) -> Iterator[controlplane.ControlPlane]:
    def progress(message: str) -> None:
        live_progress(f"[controlplane] {message}")

    try:
        binaries = controlplane.ensure_binaries(progress=progress)
    except controlplane.ControlPlaneUnavailable as error:
        piece_unavailable(f"control plane unavailable: {error}")
    with controlplane.ControlPlane(controllers=True, binaries=binaries, progress=progress) as cp:
        yield cp


@pytest.fixture(scope="session")
def api_client(control_plane: controlplane.ControlPlane) -> Iterator[Any]:
    client = control_plane.api_client()
    yield client
    client.close()


@pytest.fixture
def namespace(api_client: Any) -> Iterator[str]:
    """A fresh namespace enforcing Pod Security "restricted", ready for pods (its default
    ServiceAccount exists)."""
    core = kubernetes.client.CoreV1Api(api_client)
    name = f"t-{secrets.token_hex(4)}"
    labels = dict(cluster.RESTRICTED_NAMESPACE_LABELS)
    core.create_namespace({"metadata": {"name": name, "labels": labels}})
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=30,
        message=f"ServiceAccount default in namespace {name}",
        ignore=(kubernetes.client.ApiException,),
    )
    yield name
    # Terminating first (no new pods can appear), then drop pods at once: a Pending pod left
    # behind could otherwise be bound to the next test's simulated node.
    core.delete_namespace(name)
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)


@pytest.fixture
def emulators() -> cluster.EmulatorFactory:
    """One model-runner emulator per simulated runner pod, kept by (namespace, pod)."""
    return cluster.EmulatorFactory()


@pytest.fixture
def pod_process_factory(emulators: cluster.EmulatorFactory) -> nodesim.PodProcessFactory | None:
    """What runs behind simulated pods: an emulator for runner pods (label dmr.dev/pool),
    nothing for the others (they still become Running/Ready)."""
    return emulators


@pytest.fixture(scope="session")
def crds(api_client: Any) -> None:
    """The generated DMRModel and Agent CRDs, installed once per session."""
    cluster.apply_crds(api_client)


CHART = Path(__file__).parents[2] / "charts" / "dmr-operator"
RBAC_NAMESPACE = "dmr-rbac"
LEASE = "dmr-dmr-operator"  # the chart's leader-election Lease for release "dmr"


@pytest.fixture(scope="session")
def operator_kubeconfig(
    control_plane: controlplane.ControlPlane, api_client: Any, crds: None
) -> Path:
    """A kubeconfig with exactly the chart's rights: its ServiceAccount, ClusterRole and binding.

    Every operator the integration tests start uses it, so the whole suite proves the chart's
    least-privilege RBAC is enough (kube-apiserver runs with the RBAC authorizer).
    """
    from dmr_operator.testing import helm, manifests

    rendered = helm.render_chart(
        CHART,
        values={"replicaCount": 0, "crds": {"install": False}},
        release="dmr",
        namespace=RBAC_NAMESPACE,
    )
    # Role and RoleBinding: the chart's rights on its leader-election Lease (release namespace).
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    objects = [o for o in helm.sort_for_install(rendered) if o["kind"] in rbac_kinds]
    core: Any = kubernetes.client.CoreV1Api(api_client)
    with contextlib.suppress(kubernetes.client.ApiException):
        core.create_namespace({"metadata": {"name": RBAC_NAMESPACE}})
    manifests.Applier(api_client, field_manager="helm").apply_all(objects, namespace=RBAC_NAMESPACE)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]

    token = cluster.service_account_token(api_client, RBAC_NAMESPACE, account)
    return control_plane.kubeconfig_for_token(
        token, control_plane.work_dir / "operator-kubeconfig", user=account
    )


@pytest.fixture
def operator(
    operator_kubeconfig: Path, namespace: str, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """The operator as its own process, watching only this test's namespace.

    Verify interval 2 s so periodic read-backs happen within a test; the log tail is printed at
    teardown (pytest shows it for failed tests).
    """
    process = OperatorProcess(
        kubeconfig=operator_kubeconfig, namespaces=[namespace], verify_interval=2
    )
    process.start()
    yield process
    process.stop()
    print(f"--- operator log (tail) ---\n{process.log_tail(40)}")
    # A restarted kube-apiserver answers 403 until its RBAC caches are warm: tests that restart
    # it say so with the marker; everywhere else a 403 means the chart lacks a right.
    if request.node.get_closest_marker("apiserver_restart") is None:
        assert "Forbidden" not in process.log(), "the operator needed a right the chart lacks"


@dataclasses.dataclass(frozen=True)
class LeaderElection:
    """The chart's leader-election Lease and the ``dmr-operator run`` flags that use it."""

    name: str
    namespace: str
    args: list[str]


@pytest.fixture
def leader_election(api_client: Any, operator_kubeconfig: Path) -> Iterator[LeaderElection]:
    """Replicas elect through the chart's Lease with a 6 s lease (renew deadline 4 s, retry
    0.8 s) so takeovers fit in a test. The Lease is removed before and after, so no test waits
    out another's leader."""
    coordination: Any = kubernetes.client.CoordinationV1Api(api_client)

    def remove() -> None:
        with contextlib.suppress(kubernetes.client.ApiException):
            coordination.delete_namespaced_lease(LEASE, RBAC_NAMESPACE)

    remove()
    yield LeaderElection(
        name=LEASE,
        namespace=RBAC_NAMESPACE,
        args=[
            "--leader-elect",
            f"--leader-election-id={LEASE}",
            f"--leader-election-namespace={RBAC_NAMESPACE}",
            "--lease-duration=6",
        ],
    )
    remove()


@pytest.fixture
def objects(api_client: Any, namespace: str) -> cluster.CustomObjects:
    return cluster.CustomObjects(api_client, namespace)


@pytest.fixture
def node_simulator(
    api_client: Any, pod_process_factory: nodesim.PodProcessFactory | None
) -> Iterator[nodesim.NodeSimulator]:
    simulator = nodesim.NodeSimulator(api_client, process_factory=pod_process_factory)
    simulator.wait_synced()
    yield simulator
    simulator.close()
