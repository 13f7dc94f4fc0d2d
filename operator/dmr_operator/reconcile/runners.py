"""Runner pods and external runners as the reconciler sees them: identity, address, readiness.

Model-runner keeps configuration in process memory, so what matters about a pod is its
*incarnation*: the pod UID, its IP and the runner container's restart count. Any change means
the configuration is gone and must be applied again. This module turns Pod objects into that
view and finds the Service that publishes a pool; it does no I/O.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from dmr_operator import constants
from dmr_operator.reconcile import selectors

# model-runner's idle timeouts without keep_alive (real-peers.md M8), in its Go duration form.
DEFAULT_KEEP_ALIVE: Final = "5m0s"
CLOUD_GPU_KEEP_ALIVE: Final = "8h0m0s"


@dataclass(frozen=True)
class Runner:
    """One model-runner process the operator talks to: a pod, or an external URL."""

    key: str  # "<namespace>/<pod>" for pods, the normalised base URL for external runners
    namespace: str
    name: str
    base_url: str | None
    ready: bool
    incarnation: tuple[str, ...]
    node: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    readiness_gates: tuple[str, ...] = ()
    pod_conditions: Mapping[str, str] = field(default_factory=dict)
    external: bool = False
    image: str | None = None  # the model-runner container's image (decides its backends)
    gpus: int = 0  # GPUs its container asks for (any vendor's */gpu extended resource)
    memory_limit: str | None = None  # its container's limits.memory, a Kubernetes quantity
    claims: tuple[str, ...] = ()  # its ResourceClaims (DRA): where its GPUs' memory is read
    default_keep_alive: str = DEFAULT_KEEP_ALIVE
    """model-runner's idle timeout for models without keep_alive in this runner's pod."""
    unschedulable: str | None = None
    """The scheduler's words while the pod cannot be placed (no GPU, no matching device)."""

    @property
    def address(self) -> str | None:
        return urlsplit(self.base_url).netloc if self.base_url else None


def runner_from_pod(pod: Mapping[str, Any]) -> Runner:
    """The runner behind a model-runner pod (label ``dmr.dev/pool``)."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    container, port = _runner_container(spec)
    runner_container = next(
        (c for c in running_containers(spec) if c.get("name") == container), None
    )
    # A Sidecar-mode runner is a native sidecar: its status is among the init containers'.
    statuses = [
        *(status.get("containerStatuses") or ()),
        *(status.get("initContainerStatuses") or ()),
    ]
    container_status = next((s for s in statuses if s.get("name") == container), None)
    ip = status.get("podIP")
    terminating = metadata.get("deletionTimestamp") is not None
    if container_status is not None:
        container_ready = bool(container_status.get("ready"))
        restarts = int(container_status.get("restartCount") or 0)
    else:
        # No status for the container yet: fall back to the pod's Ready condition.
        container_ready = _condition_status(status, "Ready") == "True"
        restarts = 0
    return Runner(
        key=f"{metadata.get('namespace')}/{metadata.get('name')}",
        namespace=str(metadata.get("namespace")),
        name=str(metadata.get("name")),
        base_url=f"http://{_host(ip)}:{port}" if ip else None,
        ready=bool(ip) and container_ready and not terminating and status.get("phase") == "Running",
        incarnation=(str(metadata.get("uid")), str(ip), str(restarts)),
        node=spec.get("nodeName"),
        labels=dict(metadata.get("labels") or {}),
        readiness_gates=tuple(
            str(g.get("conditionType")) for g in spec.get("readinessGates") or ()
        ),
        pod_conditions={
            str(c.get("type")): str(c.get("status")) for c in status.get("conditions") or ()
        },
        image=str(runner_container.get("image")) if runner_container else None,
        gpus=_gpu_count(runner_container),
        memory_limit=_memory_limit(runner_container),
        claims=_claim_names(spec, status),
        default_keep_alive=_default_keep_alive(runner_container),
        unschedulable=unschedulable_message(pod),
    )


def unschedulable_message(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's message on a pod it cannot place (PodScheduled=False, Unschedulable),
    e.g. "0/3 nodes are available: 3 cannot allocate all claims"; None otherwise."""
    conditions = (pod.get("status") or {}).get("conditions") or ()
    scheduled: Mapping[str, Any] = next(
        (c for c in conditions if c.get("type") == "PodScheduled"), {}
    )
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return str(scheduled.get("message") or "unschedulable")
    return None


def external_runner(url: str, namespace: str) -> Runner:
    base = url.rstrip("/")
    return Runner(
        key=base,
        namespace=namespace,
        name=urlsplit(base).netloc,
        base_url=base,
        ready=True,
        incarnation=(base,),
        external=True,
    )


def _runner_container(spec: Mapping[str, Any]) -> tuple[str | None, int]:
    """The model-runner container and its port: the port named ``dmr``, else 12434."""
    containers = running_containers(spec)
    for container in containers:
        for port in container.get("ports") or ():
            if port.get("name") == constants.RUNNER_PORT_NAME:
                return container.get("name"), int(port["containerPort"])
    by_name = next((c for c in containers if c.get("name") == constants.RUNNER_CONTAINER), None)
    chosen = by_name or (containers[0] if containers else None)
    return (chosen.get("name") if chosen else None), constants.RUNNER_PORT


def running_containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The pod's containers and its native sidecars (init containers that keep running)."""
    sidecars = [c for c in spec.get("initContainers") or () if c.get("restartPolicy") == "Always"]
    return [*(spec.get("containers") or ()), *sidecars]


def _default_keep_alive(container: Mapping[str, Any] | None) -> str:
    """model-runner keeps idle models 5 minutes, 8 hours when MODEL_RUNNER_ENVIRONMENT=cloud and
    NVIDIA GPUs are visible (the NVIDIA runtime sets NVIDIA_VISIBLE_DEVICES for a GPU request)."""
    env = {str(e.get("name")): e.get("value") for e in (container or {}).get("env") or ()}
    limits = ((container or {}).get("resources") or {}).get("limits") or {}
    nvidia = str(limits.get("nvidia.com/gpu", "0")) not in ("", "0") or bool(
        env.get("NVIDIA_VISIBLE_DEVICES")
    )
    return (
        CLOUD_GPU_KEEP_ALIVE
        if env.get("MODEL_RUNNER_ENVIRONMENT") == "cloud" and nvidia
        else (DEFAULT_KEEP_ALIVE)
    )


def _gpu_count(container: Mapping[str, Any] | None) -> int:
    limits = ((container or {}).get("resources") or {}).get("limits") or {}
    counts = [str(v) for k, v in limits.items() if str(k).endswith("/gpu")]
    return sum(int(v) for v in counts if v.isdigit())


def _claim_names(spec: Mapping[str, Any], status: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's ResourceClaims: made from templates (named in its status) or named directly."""
    generated = [s.get("resourceClaimName") for s in status.get("resourceClaimStatuses") or ()]
    direct = [c.get("resourceClaimName") for c in spec.get("resourceClaims") or ()]
    return tuple(sorted({str(name) for name in (*generated, *direct) if name}))


def _memory_limit(container: Mapping[str, Any] | None) -> str | None:
    limits = ((container or {}).get("resources") or {}).get("limits") or {}
    return str(limits["memory"]) if limits.get("memory") else None


def _condition_status(status: Mapping[str, Any], type_: str) -> str | None:
    for condition in status.get("conditions") or ():
        if condition.get("type") == type_:
            return str(condition.get("status"))
    return None


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def pool_service_endpoint(
    services: Iterable[Mapping[str, Any]], selector: Mapping[str, Any]
) -> str | None:
    """OpenAI base URL of the Service that fronts the pool ``selector`` selects, if any.

    The URL ends in the ``/v1`` alias on purpose: docker-agent derives its own ``_configure``
    call from ``base_url`` minus ``/v1``, which there is ``/_configure``, a path model-runner
    does not route, so agents can never replace the operator's configuration.
    """
    pool_labels = selectors.implied_labels(selector)
    candidates = [service for service in services if fronts_pool(service, pool_labels)]
    if not candidates:
        return None
    service = min(candidates, key=lambda s: str(s["metadata"]["name"]))
    port = _service_port(service)
    if port is None:
        return None
    meta = service["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{port}/v1"


def fronts_pool(service: Mapping[str, Any] | None, pool_labels: Mapping[str, str]) -> bool:
    """Does ``service`` send traffic to every pod carrying ``pool_labels`` (a pool's labels)?"""
    service_selector = ((service or {}).get("spec") or {}).get("selector") or {}
    return bool(service_selector) and all(
        pool_labels.get(k) == v for k, v in service_selector.items()
    )


def may_front_a_pool(service: Mapping[str, Any]) -> bool:
    """Whether the Service could be a pool's endpoint: it selects pods, and not by a
    placement label (those select a placed model's holders, never a whole pool)."""
    service_selector = (service.get("spec") or {}).get("selector") or {}
    return bool(service_selector) and not any(
        str(key).startswith(constants.PLACEMENT_LABEL_PREFIX) for key in service_selector
    )


def endpoint_facts(service: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    """What of a Service an endpoint depends on: another watch event with the same facts
    (a resourceVersion bump, an annotation) changes no DMRModel's endpoint."""
    if service is None:
        return None
    spec = service.get("spec") or {}
    return (spec.get("selector"), spec.get("ports"))


def _service_port(service: Mapping[str, Any]) -> int | None:
    ports = list((service.get("spec") or {}).get("ports") or ())
    for port in ports:
        if port.get("targetPort") in (constants.RUNNER_PORT, constants.RUNNER_PORT_NAME):
            return int(port["port"])
    return int(ports[0]["port"]) if ports else None


# Hosts an external runner URL may never name, whatever the allow-list says: cloud metadata
# services and link-local ranges are the classic SSRF targets.
_ALWAYS_REFUSED_HOSTS = frozenset(
    {"metadata.google.internal", "metadata", "169.254.169.254", "fd00:ec2::254", "100.100.100.200"}
)


def external_url_problem(url: str, allowed_hosts: Iterable[str]) -> str | None:
    """Why ``url`` may not be called, or None when it is allowed.

    The operator POSTs to URLs users write, so this is a security boundary: only hosts the
    operator's administrator listed, never link-local or metadata addresses (in any spelling:
    IPv4-mapped IPv6, hex, decimal or octal forms), no credentials in the URL.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return f"runners.url {url!r} is not a valid URL: {error}"
    if parts.scheme not in ("http", "https"):
        return f"runners.url {url!r}: only http and https are allowed"
    if parts.username or parts.password:
        return f"runners.url {url!r}: credentials in the URL are not allowed"
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        return f"runners.url {url!r}: no host"
    if host in _ALWAYS_REFUSED_HOSTS:
        return f"runners.url host {host!r} is a metadata address and is always refused"
    address = literal_address(host)
    if address is not None and refused_address(address):
        return (
            f"runners.url host {host!r} is a link-local, metadata, multicast or unspecified "
            "address and is refused"
        )
    allowed = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
    host_port = f"{host}:{port}" if port else host
    if host not in allowed and host_port not in allowed:
        return (
            f"runners.url host {host!r} is not on the operator's allowed runner hosts "
            "(--allowed-runner-hosts); ask the cluster administrator to add it"
        )
    return None


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP a host string denotes by itself, in every spelling a resolver accepts."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # inet_aton reads what getaddrinfo would: 0xa9fea9fe, 2852039166, 0251.0376.0251.0376.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):  # not an address; ValueError: NUL bytes and the like
        return None


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses the operator never calls, whatever name led to them."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or str(address) in _ALWAYS_REFUSED_HOSTS
    )
