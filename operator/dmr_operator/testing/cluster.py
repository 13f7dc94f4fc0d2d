"""Cluster-side helpers shared by integration tests, benchmarks and the sandbox.

Installing the generated CRDs, creating runner pools (a StatefulSet of model-runner pods plus the
Service in front, like the chart's), reading and writing DMRModels, and the pod-process factory
that puts a model-runner emulator behind every simulated runner pod. All calls go through the
official ``kubernetes`` client with plain dicts, so they work against any cluster.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from dmr_operator import constants
from dmr_operator.api import crdgen
from dmr_operator.reconcile import agent_workload
from dmr_operator.testing import emulator_state
from dmr_operator.testing.emulator import ModelRunnerEmulator
from dmr_operator.testing.waiting import wait_for

MERGE_PATCH = "application/merge-patch+json"
# Test namespaces enforce Pod Security "restricted": the real admission plugin is the evidence
# that every pod the operator, the chart and the harness create would be admitted on a hardened
# cluster.
RESTRICTED_NAMESPACE_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
# The pod's part of "restricted" for pods the harness makes; no UID: which user the image runs
# as is the image's to say.
RESTRICTED_POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RUNNER_IMAGE = "docker/model-runner:latest"


def apply_crds(api_client: Any) -> None:
    """Create or replace the generated CRDs and wait until they are served."""
    extensions: Any = kubernetes.client.ApiextensionsV1Api(api_client)
    for model in crdgen.served_kinds():
        crd = crdgen.build_crd(model)
        name = crd["metadata"]["name"]
        try:
            current = extensions.read_custom_resource_definition(name)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
            extensions.create_custom_resource_definition(crd)
        else:
            crd["metadata"]["resourceVersion"] = current.metadata.resource_version
            extensions.replace_custom_resource_definition(name, crd)

        def established(crd_name: str = name) -> bool:
            status = extensions.read_custom_resource_definition(crd_name).status
            return any(
                c.type == "Established" and c.status == "True" for c in status.conditions or ()
            )

        wait_for(established, timeout=30, message=f"CRD {name} established")


def load_manifests(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


class EmulatorFactory:
    """Node-simulator process factory: an emulator behind every pod labelled ``dmr.dev/pool``.

    Emulators are kept by (namespace, pod name) so tests can turn their knobs and read their
    request logs; a pod re-created under the same name gets a fresh emulator (a new store).
    """

    def __init__(
        self,
        *,
        preload: Iterable[str] = (),
        default_registry: str | None = None,
        catalogue: Iterable[emulator_state.CatalogueModel] = (),
        idle_check_interval: float | None = None,
    ) -> None:
        self.preload = tuple(preload)
        # How often each emulator looks for idle runners to expire: at 1,500 pods the default
        # 50 ms is 30,000 wake-ups a second in the test process (bench/placement_scale.py).
        self.idle_check_interval = idle_check_interval
        # Models every runner's registry serves besides the emulator's own catalogue.
        self.catalogue = tuple(catalogue)
        # Runners started with DEFAULT_REGISTRY (a mirror): their store tags carry its host.
        self.default_registry = default_registry
        self.emulators: dict[tuple[str, str], ModelRunnerEmulator] = {}
        self._uids: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def __call__(self, pod: dict[str, Any]) -> ModelRunnerEmulator | None:
        metadata = pod.get("metadata") or {}
        if constants.POOL_LABEL not in (metadata.get("labels") or {}):
            return None
        key = (str(metadata.get("namespace")), str(metadata.get("name")))
        with self._lock:
            if self._uids.get(key) != metadata.get("uid") or key not in self.emulators:
                emulator = ModelRunnerEmulator()
                if self.idle_check_interval is not None:
                    emulator.idle_check_interval = self.idle_check_interval
                if self.default_registry:
                    emulator.store.default_registry = self.default_registry
                for model in self.catalogue:
                    emulator.catalogue.setdefault(model.reference, model)
                if self.preload:
                    emulator.preload_store(*self.preload)
                self.emulators[key] = emulator
                self._uids[key] = str(metadata.get("uid"))
            return self.emulators[key]

    def of(self, namespace: str, pod: str) -> ModelRunnerEmulator:
        return self.emulators[(namespace, pod)]

    def in_namespace(self, namespace: str) -> dict[str, ModelRunnerEmulator]:
        return {pod: e for (ns, pod), e in sorted(self.emulators.items()) if ns == namespace}


def runner_pool_manifests(
    *,
    namespace: str,
    name: str = constants.DEFAULT_POOL,
    replicas: int = 1,
    gpus: int = 0,
    gpu_resource: str = "nvidia.com/gpu",
    memory: str | None = None,
    pre_stop_sleep: int = 0,
) -> list[dict[str, Any]]:
    """A StatefulSet of model-runner pods labelled for pool ``name`` and its Service;
    ``memory``: the runner container's memory request and limit; ``pre_stop_sleep``: seconds
    a deleted pod keeps serving (the chart's ``preStopSleepSeconds``)."""
    labels = {constants.POOL_LABEL: name}
    limits = {gpu_resource: str(gpus)} if gpus else {}
    if memory:
        limits["memory"] = memory
    resources = {"limits": limits, "requests": dict(limits)} if limits else {}
    workload_name = f"pool-{name}"
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": workload_name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "serviceName": workload_name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": dict(RESTRICTED_POD_SECURITY),
                    "containers": [
                        {
                            "name": constants.RUNNER_CONTAINER,
                            "image": RUNNER_IMAGE,
                            "securityContext": agent_workload.container_security(
                                read_only_root=False
                            ),
                            "ports": [
                                {
                                    "name": constants.RUNNER_PORT_NAME,
                                    "containerPort": constants.RUNNER_PORT,
                                }
                            ],
                            "env": [{"name": "DO_NOT_TRACK", "value": "1"}],
                            "resources": resources,
                            **(
                                {"lifecycle": {"preStop": {"sleep": {"seconds": pre_stop_sleep}}}}
                                if pre_stop_sleep
                                else {}
                            ),
                        }
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": workload_name, "namespace": namespace, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [
                {"name": "http", "port": 80, "targetPort": constants.RUNNER_PORT_NAME},
            ],
        },
    }
    return [statefulset, service]


def create_runner_pool(api_client: Any, **kwargs: Any) -> str:
    """Create a pool (see ``runner_pool_manifests``); returns the StatefulSet name."""
    apps: Any = kubernetes.client.AppsV1Api(api_client)
    core: Any = kubernetes.client.CoreV1Api(api_client)
    statefulset, service = runner_pool_manifests(**kwargs)
    namespace = statefulset["metadata"]["namespace"]
    apps.create_namespaced_stateful_set(namespace, statefulset)
    core.create_namespaced_service(namespace, service)
    return str(statefulset["metadata"]["name"])


def gpu_runner_pool(
    api_client: Any, node_simulator: Any, namespace: str, replicas: int
) -> list[str]:
    """``replicas`` single-GPU simulated nodes and a default pool asking one GPU per pod, one
    pod per node; returns the Ready runner pod names."""
    for index in range(replicas):
        node_simulator.add_node(f"{namespace}-gpu-{index}", gpus=1)
    create_runner_pool(api_client, namespace=namespace, replicas=replicas, gpus=1)
    return wait_for_runner_pods(api_client, namespace, constants.DEFAULT_POOL, replicas)


def scale_runner_pool(api_client: Any, namespace: str, name: str, replicas: int) -> None:
    apps: Any = kubernetes.client.AppsV1Api(api_client)
    apps.patch_namespaced_stateful_set(
        f"pool-{name}", namespace, {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH
    )


def ready_runner_pods(api_client: Any, namespace: str, pool: str) -> list[str]:
    core: Any = kubernetes.client.CoreV1Api(api_client)
    pods = core.list_namespaced_pod(namespace, label_selector=f"{constants.POOL_LABEL}={pool}")
    ready = []
    for pod in pods.items:
        statuses = pod.status.container_statuses or []
        if pod.status.pod_ip and statuses and all(s.ready for s in statuses):
            ready.append(pod.metadata.name)
    return sorted(ready)


def wait_for_runner_pods(
    api_client: Any, namespace: str, pool: str, count: int, *, timeout: float = 60
) -> list[str]:
    def ready() -> list[str] | None:
        pods = ready_runner_pods(api_client, namespace, pool)
        return pods if len(pods) == count else None

    found = wait_for(ready, timeout=timeout, message=f"{count} ready runner pod(s) in pool {pool}")
    assert found is not None
    return found


def dmrmodel(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.DMRMODEL_KIND,
        "metadata": {"name": name},
        "spec": dict(spec),
    }


class CustomObjects:
    """DMRModels and Agents through the custom-objects API, as plain dicts."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api: Any = kubernetes.client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def create(self, plural: str, body: Mapping[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.api.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, self.namespace, plural, dict(body)
        )
        return created

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.api.get_namespaced_custom_object(
                constants.GROUP, constants.VERSION, self.namespace, plural, name
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def patch_spec(self, plural: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self.api.patch_namespaced_custom_object(
            constants.GROUP,
            constants.VERSION,
            self.namespace,
            plural,
            name,
            {"spec": dict(spec)},
            _content_type=MERGE_PATCH,
        )
        return patched

    def delete(self, plural: str, name: str) -> None:
        with contextlib.suppress(kubernetes.client.ApiException):
            self.api.delete_namespaced_custom_object(
                constants.GROUP, constants.VERSION, self.namespace, plural, name
            )

    def status(self, plural: str, name: str) -> dict[str, Any]:
        found = self.get(plural, name) or {}
        return dict(found.get("status") or {})

    def wait_phase(
        self, plural: str, name: str, phase: str, *, timeout: float = 30
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            found = self.get(plural, name)
            return found if found and (found.get("status") or {}).get("phase") == phase else None

        try:
            found = wait_for(reached, timeout=timeout, message=f"{plural}/{name} phase {phase}")
        except AssertionError as error:
            raise AssertionError(f"{error}; status now: {self.status(plural, name)}") from None
        assert found is not None
        return found


def events_for(api_client: Any, namespace: str, name: str) -> list[Any]:
    """Events about object ``name`` recorded by the operator, oldest first."""
    core: Any = kubernetes.client.CoreV1Api(api_client)
    events = core.list_namespaced_event(namespace)
    found = [
        e
        for e in events.items
        if e.involved_object.name == name and (e.source.component or "") == "dmr-operator"
    ]
    return sorted(found, key=lambda e: e.first_timestamp or e.metadata.creation_timestamp)


# A day: longer than any test session or benchmark run, short enough not to outlive the cluster.
SERVICE_ACCOUNT_TOKEN_SECONDS = 24 * 3600


def service_account_token(api_client: Any, namespace: str, name: str) -> str:
    """A bound token for ServiceAccount ``name`` through the TokenRequest API.

    Since Kubernetes 1.24 no token Secret is generated for a ServiceAccount; a pod gets a bound
    token the same way (projected volume), so this is also what the operator has in a cluster.
    """
    core: Any = kubernetes.client.CoreV1Api(api_client)
    request = {"spec": {"expirationSeconds": SERVICE_ACCOUNT_TOKEN_SECONDS}}
    token: str = core.create_namespaced_service_account_token(name, namespace, request).status.token
    return token


def service_backend_url(api_client: Any, namespace: str, service: str, port: int = 80) -> str:
    """``http://<pod ip>:<target port>`` of a ready pod behind ``service:port``: the endpoint
    kube-proxy would pick, for a test bed without kube-proxy.

    The endpoint-slice controller's own selection (selector, Ready, named target port), done
    here because EndpointSlices cannot hold the simulated pods' loopback addresses (the API
    refuses 127.0.0.0/8 in endpoints, so the real controller writes slices without them).
    """
    core: Any = kubernetes.client.CoreV1Api(api_client)
    spec = core.read_namespaced_service(service, namespace).spec
    target = next(p.target_port for p in spec.ports if p.port == port)
    selector = ",".join(f"{key}={value}" for key, value in sorted(spec.selector.items()))

    def ready_backend() -> str | None:
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            conditions = {c.type: c.status for c in pod.status.conditions or []}
            if conditions.get("Ready") != "True" or not pod.status.pod_ip:
                continue
            if isinstance(target, int):
                return f"http://{pod.status.pod_ip}:{target}"
            for container in pod.spec.containers:
                for container_port in container.ports or []:
                    if container_port.name == target:
                        return f"http://{pod.status.pod_ip}:{container_port.container_port}"
        return None

    found = wait_for(ready_backend, timeout=30, message=f"a ready pod behind {service}:{port}")
    assert found is not None
    return found
