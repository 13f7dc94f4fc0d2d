"""A node simulator that plays kubelet for the Node objects it creates on a (test) control plane.

Role: there is no kubelet in the local control plane (``controlplane``), so this module creates
Nodes with the capacity, labels and taints a test asks for (GPU nodes included) and, for every pod
the real scheduler binds to one of them, does what a kubelet would: give the pod its own loopback
address (127.N.0.1, 127.N.0.2, ...), start the process behind the pod on it, report the pod
Running/Ready (honouring readiness gates), restart it on :meth:`NodeSimulator.crash`, and finish
deletions: at once, or after the pod's preStop ``sleep`` (the kubelet's own action; the process
keeps serving meanwhile, within the grace period) so that a drained node
(:meth:`NodeSimulator.drain_node`: cordon, then the Eviction API) terminates pods gracefully.
GPUs come either as an extended resource (``nvidia.com/gpu``, a device plugin's way) or as devices
of a simulated DRA driver: a ResourceSlice per node that the real scheduler allocates
ResourceClaims from; the simulator then plays the driver's kubelet plugin for the claims of the
pods it runs (checks the allocation is for this node and pod, reports the devices in the claim's
status). The process behind a model-runner pod is the model-runner emulator, plugged in through a
``PodProcessFactory``; it runs on an asyncio loop in the simulator's own thread.

Neighbours: used by tests/integration fixtures and the sandbox; talks to the API server only through
the ``kubernetes`` client it is given; knows pods as plain dicts (the JSON the API server sends).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

import kubernetes

from dmr_operator import constants
from dmr_operator.reconcile import runners as runner_views
from dmr_operator.testing.controlplane import KUBERNETES_VERSION

logger = logging.getLogger(__name__)

T = TypeVar("T")

GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
SIMULATED_GPU_PRODUCT = "Simulated-GPU"
# Marks Nodes made here, so a person looking at the cluster knows nothing real runs there.
SIMULATED_NODE_LABEL = f"{constants.GROUP}/simulated-node"
# Taints the node lifecycle controller or admission put on nodes that are not (yet) ready.
NOT_READY_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})
DEFAULT_POD_PORT = 8080
PROCESS_TIMEOUT_SECONDS = 30.0
WATCH_TIMEOUT_SECONDS = 300
RETRY_DELAY_SECONDS = 0.5
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
# The simulated DRA driver goes by the name of NVIDIA's (k8s-dra-driver-gpu), with the attribute
# and capacity names it publishes, so DeviceClass and claim selectors written here read like the
# ones people write for real GPUs.
DRA_DRIVER = "gpu.nvidia.com"
DRA_GROUP, DRA_VERSION = "resource.k8s.io", "v1"


@dataclass(frozen=True)
class SimulatedGpu:
    """One GPU a node publishes through the simulated DRA driver."""

    memory: str = "80Gi"
    product: str = SIMULATED_GPU_PRODUCT
    architecture: str = "Simulated"


def resource_slice(node: str, gpus: Sequence[SimulatedGpu]) -> dict[str, Any]:
    """The ResourceSlice a DRA driver would publish for ``node``'s GPUs (one pool per node)."""
    return {
        "apiVersion": f"{DRA_GROUP}/{DRA_VERSION}",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{DRA_DRIVER}", "labels": {SIMULATED_NODE_LABEL: "true"}},
        "spec": {
            "driver": DRA_DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {
                    "name": f"gpu-{index}",
                    "attributes": {
                        "type": {"string": "gpu"},
                        "index": {"int": index},
                        "uuid": {"string": f"GPU-{node}-{index}"},
                        "productName": {"string": gpu.product},
                        "architecture": {"string": gpu.architecture},
                        "brand": {"string": "Nvidia"},
                    },
                    "capacity": {"memory": {"value": gpu.memory}},
                }
                for index, gpu in enumerate(gpus)
            ],
        },
    }


class PodProcess(Protocol):
    """What runs behind a simulated pod (e.g. a model-runner emulator).

    ``start`` after ``stop`` on the same object must work: that is a container restart.
    """

    async def start(self, host: str, port: int) -> None: ...

    async def stop(self) -> None: ...


# pod (the API server's JSON as a dict) -> the process behind it, or None for "nothing to run".
PodProcessFactory = Callable[[dict[str, Any]], PodProcess | None]


class _LoopbackAddresses:
    """Hands out 127.x.y.z addresses in order, never twice in this Python process.

    Shared by every simulator in the process, so two simulators never hand out the same address.
    """

    def __init__(self, first: str) -> None:
        self._next = itertools.count(int(ipaddress.IPv4Address(first)))
        self._lock = threading.Lock()

    def allocate(self) -> str:
        with self._lock:
            while True:
                address = ipaddress.IPv4Address(next(self._next))
                if address not in ipaddress.IPv4Network("127.0.0.0/8"):
                    raise RuntimeError("loopback addresses exhausted")
                if address.packed[-1] not in (0, 255):  # network/broadcast-looking: avoid
                    return str(address)


# Each Python process starts in its own 127.N.0.0/16 block (N from the process id), so test runs,
# benchmarks and a sandbox on the same machine do not hand out each other's addresses.
POD_ADDRESSES = _LoopbackAddresses(f"127.{1 + os.getpid() % 250}.0.1")
NODE_ADDRESSES = _LoopbackAddresses("127.254.0.1")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_port(pod: dict[str, Any]) -> int:
    """The port the process behind ``pod`` listens on.

    Model-runner pods (label ``dmr.dev/pool``): the container port named ``dmr``, else 12434;
    other pods: their first container port, else 8080.
    """
    ports = [
        port
        for container in runner_views.running_containers(pod.get("spec", {}))
        for port in container.get("ports") or []
    ]
    if constants.POOL_LABEL in (pod.get("metadata", {}).get("labels") or {}):
        named = [p["containerPort"] for p in ports if p.get("name") == constants.RUNNER_PORT_NAME]
        return int(named[0]) if named else constants.RUNNER_PORT
    return int(ports[0]["containerPort"]) if ports else DEFAULT_POD_PORT


@dataclass
class _SimulatedPod:
    """What the simulator knows about one pod it plays kubelet for."""

    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    port: int
    process: PodProcess | None
    started_at: str
    containers: list[str]
    running: bool = False
    restart_counts: dict[str, int] = field(default_factory=dict)
    devices: tuple[str, ...] = ()
    """DRA devices the pod's claims were allocated, as ``driver/pool/device``."""
    container_started_at: dict[str, str] = field(default_factory=dict)
    last_terminated: dict[str, dict[str, Any]] = field(default_factory=dict)
    terminating: threading.Timer | None = None  # deleted, running out its preStop sleep


def termination_delay(pod: dict[str, Any]) -> float:
    """Seconds a kubelet keeps a deleted pod's containers running: the longest preStop
    ``sleep`` action of its containers, within its grace period (30 s unless set). An ``exec``
    or ``httpGet`` preStop hook is not simulated (0 s)."""
    spec = pod.get("spec") or {}
    grace = spec.get("terminationGracePeriodSeconds")
    deletion_grace = (pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
    limit = float(deletion_grace if deletion_grace is not None else 30 if grace is None else grace)
    sleeps = [
        float(((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0))
        for c in runner_views.running_containers(spec)
    ]
    return max(0.0, min(max(sleeps, default=0.0), limit))


class _WatchGone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def _condition(kind: str, ok: bool, existing: dict[str, dict[str, Any]]) -> dict[str, Any]:
    status = "True" if ok else "False"
    previous = existing.get(kind, {})
    # Keep the transition time when nothing changed: tools read it as "since when".
    since = previous.get("lastTransitionTime") if previous.get("status") == status else None
    return {"type": kind, "status": status, "lastTransitionTime": since or _now()}


def _container_status(
    simulated: _SimulatedPod, container: dict[str, Any], *, ready: bool
) -> dict[str, Any]:
    name = container["name"]
    restarts = simulated.restart_counts.get(name, 0)
    status: dict[str, Any] = {
        "name": name,
        "image": container.get("image", ""),
        "imageID": "",
        "containerID": f"simulated://{simulated.uid}/{name}/{restarts}",
        "ready": ready,
        "started": True,
        "restartCount": restarts,
        "state": {"running": {"startedAt": simulated.container_started_at[name]}},
    }
    if name in simulated.last_terminated:
        status["lastState"] = {"terminated": simulated.last_terminated[name]}
    return status


def _waiting_status(container: dict[str, Any], reason: str) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        "state": {"waiting": {"reason": reason}},
    }


def desired_pod_status(
    pod: dict[str, Any], simulated: _SimulatedPod, *, host_ip: str
) -> dict[str, Any]:
    """The status a kubelet would report for ``pod`` now; Ready waits for every readiness gate."""
    spec, status = pod.get("spec", {}), pod.get("status") or {}
    existing = {c["type"]: c for c in status.get("conditions") or []}
    gates = [gate["conditionType"] for gate in spec.get("readinessGates") or []]
    gates_pass = all(existing.get(gate, {}).get("status") == "True" for gate in gates)
    containers_ready = simulated.running
    has_sidecars = any(c.get("restartPolicy") == "Always" for c in spec.get("initContainers") or [])
    desired: dict[str, Any] = {
        "phase": "Running",
        "hostIP": host_ip,
        "podIP": simulated.ip,
        "podIPs": [{"ip": simulated.ip}],
        "startTime": simulated.started_at,
        "containerStatuses": [
            _container_status(simulated, container, ready=containers_ready)
            if simulated.running or not has_sidecars
            # The kubelet starts app containers only after the native sidecars have started.
            else _waiting_status(container, "PodInitializing")
            for container in spec.get("containers", [])
        ],
        "conditions": [
            _condition("Initialized", True, existing),
            _condition("PodScheduled", True, existing),
            _condition("ContainersReady", containers_ready, existing),
            _condition("Ready", containers_ready and gates_pass, existing),
        ],
    }
    if spec.get("initContainers"):
        # Native sidecars run (and count for readiness) like app containers; the others ran
        # to completion before anything else started.
        desired["initContainerStatuses"] = [
            _container_status(simulated, init, ready=containers_ready)
            if init.get("restartPolicy") == "Always"
            else {
                "name": init["name"],
                "image": init.get("image", ""),
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
            }
            for init in spec["initContainers"]
        ]
    return desired


def _status_summary(status: dict[str, Any]) -> tuple[Any, ...]:
    """The parts of a pod status the simulator owns, without timestamps (which always differ)."""
    return (
        status.get("phase"),
        status.get("podIP"),
        status.get("hostIP"),
        tuple(
            (c.get("name"), c.get("ready"), c.get("restartCount"))
            for c in [
                *(status.get("containerStatuses") or []),
                *(status.get("initContainerStatuses") or []),
            ]
        ),
        tuple(
            sorted(
                (c["type"], c["status"])
                for c in status.get("conditions") or []
                if c["type"] in ("Initialized", "PodScheduled", "ContainersReady", "Ready")
            )
        ),
    )


class NodeSimulator:
    """Creates simulated Nodes and plays kubelet for the pods bound to them.

    Starts watching at construction; :meth:`close` (or leaving the ``with`` block) stops the
    watch, stops every process, and removes the simulator's Nodes and their pods. Public methods
    are thread-safe and meant to be called from the test's thread.
    """

    def __init__(
        self, api_client: Any, *, process_factory: PodProcessFactory | None = None
    ) -> None:
        # Any: the simulator sends and reads plain JSON dicts, not the client's typed models.
        self._core: Any = kubernetes.client.CoreV1Api(api_client)
        self._custom: Any = kubernetes.client.CustomObjectsApi(api_client)
        self._process_factory = process_factory
        self._lock = threading.RLock()
        self._nodes: dict[str, str] = {}  # name -> InternalIP
        self._pods: dict[tuple[str, str], _SimulatedPod] = {}
        self._stopping = threading.Event()
        self._watch_response: Any = None
        self._synced = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="nodesim-processes", daemon=True
        )
        self._loop_thread.start()
        self._watch_thread = threading.Thread(
            target=self._watch_pods, name="nodesim-watch", daemon=True
        )
        self._watch_thread.start()

    # -- nodes ------------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        gpus: int = 0,
        gpu_resource: str = "nvidia.com/gpu",
        cpu: str = "8",
        memory: str = "32Gi",
        pods: int = 110,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, Any]] | None = None,
        dra_gpus: Sequence[SimulatedGpu] = (),
    ) -> dict[str, Any]:
        """Create a Ready Node; ``taints`` are Kubernetes taint dicts ({key, value, effect}).

        ``gpus`` are advertised as the extended resource ``gpu_resource``; ``dra_gpus`` are
        published as a ResourceSlice of the simulated DRA driver instead (claims, no resource).
        """
        address = NODE_ADDRESSES.allocate()
        node_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            SIMULATED_NODE_LABEL: "true",
        }
        if gpus or dra_gpus:
            node_labels |= {
                GPU_PRESENT_LABEL: "true",
                GPU_COUNT_LABEL: str(gpus or len(dra_gpus)),
                GPU_PRODUCT_LABEL: dra_gpus[0].product if dra_gpus else SIMULATED_GPU_PRODUCT,
            }
        node_labels |= labels or {}
        resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "100Gi"}
        if gpus:
            resources[gpu_resource] = str(gpus)
        with self._lock:
            self._core.create_node(
                {
                    "metadata": {"name": name, "labels": node_labels},
                    "spec": {"taints": taints or []},
                }
            )
            self._nodes[name] = address
        now = _now()
        self._core.patch_node_status(
            name,
            {
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "addresses": [
                        {"type": "InternalIP", "address": address},
                        {"type": "Hostname", "address": name},
                    ],
                    "conditions": [
                        {
                            "type": kind,
                            "status": "True" if kind == "Ready" else "False",
                            "reason": "Simulated",
                            "lastHeartbeatTime": now,
                            "lastTransitionTime": now,
                        }
                        for kind in ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")
                    ],
                    "nodeInfo": {
                        # The kubelet a node of this control plane's release would run.
                        "kubeletVersion": f"v{KUBERNETES_VERSION}-simulated",
                        "containerRuntimeVersion": "simulated://1",
                        "operatingSystem": "linux",
                        "architecture": "amd64",
                        "osImage": "dmr-operator node simulator",
                        "kernelVersion": "",
                        "machineID": name,
                        "systemUUID": name,
                        "bootID": name,
                    },
                }
            },
            _content_type=STRATEGIC_MERGE,
        )
        # Admission taints every new node not-ready; with no node-lifecycle controller running,
        # only this simulator can lift it.
        current = self._read_node(name)
        remaining = [
            taint
            for taint in current.get("spec", {}).get("taints") or []
            if taint["key"] not in NOT_READY_TAINTS
        ]
        patched = self._core.patch_node(
            name,
            {"spec": {"taints": remaining}},
            _content_type=STRATEGIC_MERGE,
            _preload_content=False,
        )
        node: dict[str, Any] = json.loads(patched.data)
        if dra_gpus:
            self._custom.create_cluster_custom_object(
                DRA_GROUP, DRA_VERSION, "resourceslices", resource_slice(name, dra_gpus)
            )
        return node

    def remove_node(self, name: str) -> None:
        """Delete the Node, stop the processes of its pods and delete those pods."""
        with self._lock:
            self._nodes.pop(name, None)
            for simulated in [pod for pod in self._pods.values() if pod.node == name]:
                self._forget(simulated)
            bound = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}")
            for pod in bound.items:
                self._force_delete(pod.metadata.namespace, pod.metadata.name)
            self._ignore_missing(lambda: self._core.delete_node(name))
            self._ignore_missing(
                lambda: self._custom.delete_cluster_custom_object(
                    DRA_GROUP, DRA_VERSION, "resourceslices", f"{name}-{DRA_DRIVER}"
                )
            )

    def drain_node(self, name: str) -> list[str]:
        """``kubectl drain``: cordon the Node, then evict each of its pods through the Eviction
        API (each gets its grace period; controllers recreate them elsewhere). Returns the
        evicted pods as ``namespace/name``."""
        self._core.patch_node(name, {"spec": {"unschedulable": True}})
        bound = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}")
        evicted = []
        for pod in bound.items:
            self._evict(pod.metadata.namespace, pod.metadata.name)
            evicted.append(f"{pod.metadata.namespace}/{pod.metadata.name}")
        return evicted

    def _evict(self, namespace: str, name: str) -> None:
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        self._ignore_missing(
            lambda: self._core.create_namespaced_pod_eviction(name, namespace, eviction)
        )

    @property
    def nodes(self) -> list[str]:
        with self._lock:
            return list(self._nodes)

    # -- pods -------------------------------------------------------------------------------

    def process_for(self, namespace: str, name: str) -> PodProcess | None:
        """The process behind a pod (None if the factory gave none or the pod is not ours)."""
        with self._lock:
            simulated = self._pods.get((namespace, name))
            return simulated.process if simulated else None

    def address_of(self, namespace: str, name: str) -> str | None:
        with self._lock:
            simulated = self._pods.get((namespace, name))
            return simulated.ip if simulated else None

    def devices_of(self, namespace: str, name: str) -> tuple[str, ...]:
        """The DRA devices (``driver/pool/device``) prepared for a running pod's claims."""
        with self._lock:
            simulated = self._pods.get((namespace, name))
            return simulated.devices if simulated else ()

    def crash(self, namespace: str, name: str, container: str | None = None) -> int:
        """Crash and restart a container: the process restarts on the same address.

        ``container`` defaults to the pod's first container; returns its new restartCount.
        """
        with self._lock:
            simulated = self._pods.get((namespace, name))
            if simulated is None:
                raise LookupError(f"pod {namespace}/{name} is not running on a simulated node")
            crashed = container or simulated.containers[0]
            if crashed not in simulated.containers:
                raise LookupError(f"pod {namespace}/{name} has no container {crashed!r}")
            finished = _now()
            self._stop_process(simulated)
            simulated.last_terminated[crashed] = {
                "exitCode": 1,
                "reason": "Error",
                "startedAt": simulated.container_started_at[crashed],
                "finishedAt": finished,
                "containerID": f"simulated://{simulated.uid}/{crashed}/"
                f"{simulated.restart_counts.get(crashed, 0)}",
            }
            simulated.restart_counts[crashed] = simulated.restart_counts.get(crashed, 0) + 1
            simulated.container_started_at[crashed] = _now()
            self._start_process(simulated)
            pod = self._read_pod(namespace, name)
            if pod is not None:
                self._report_status(pod, simulated)
            return simulated.restart_counts[crashed]

    def run(self, coroutine: Coroutine[Any, Any, T], *, timeout: float = 30.0) -> T:
        """Run ``coroutine`` on the simulator's loop, where the processes live (e.g. to inspect
        an emulator's state from a test thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def wait_synced(self, timeout: float = 30.0) -> bool:
        """True once the first pod listing has been handled."""
        return self._synced.wait(timeout)

    # -- lifecycle --------------------------------------------------------------------------

    def close(self, *, remove_nodes: bool = True) -> None:
        """Stop watching, stop every process, and (by default) remove the simulator's Nodes."""
        self._stopping.set()
        with self._lock:
            response = self._watch_response
        if response is not None:
            try:
                response.shutdown()  # wakes the watch thread blocked in a read
            except Exception:  # already closed is as good as shut down
                logger.debug("watch response already closed", exc_info=True)
        self._watch_thread.join(timeout=10)
        with self._lock:
            if remove_nodes:
                for name in list(self._nodes):
                    self.remove_node(name)
            for simulated in list(self._pods.values()):
                self._forget(simulated)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> NodeSimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- watch ------------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                    self._synced.set()
                resource_version = self._watch_from(resource_version)
            except _WatchGone:
                resource_version = None
            except Exception:  # e.g. the API server restarting: retry
                if self._stopping.is_set():
                    break
                logger.info("node simulator watch interrupted; retrying", exc_info=True)
                self._stopping.wait(RETRY_DELAY_SECONDS)

    def _relist(self) -> str:
        response = self._core.list_pod_for_all_namespaces(_preload_content=False)
        listing = json.loads(response.data)
        seen: set[tuple[str, str]] = set()
        for pod in listing.get("items", []):
            seen.add((pod["metadata"]["namespace"], pod["metadata"]["name"]))
            self._on_pod_event("ADDED", pod)
        with self._lock:
            for key in [key for key in self._pods if key not in seen]:
                self._forget(self._pods[key])
        return str(listing["metadata"]["resourceVersion"])

    def _watch_from(self, resource_version: str) -> str:
        response = self._core.list_pod_for_all_namespaces(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_SECONDS,
            _preload_content=False,
        )
        with self._lock:
            self._watch_response = response
        try:
            if self._stopping.is_set():
                return resource_version
            for line in _response_lines(response):
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchGone()
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if event.get("type") != "BOOKMARK":
                    self._on_pod_event(str(event.get("type")), obj)
            return resource_version
        finally:
            with self._lock:
                self._watch_response = None
            response.release_conn()

    # -- playing kubelet --------------------------------------------------------------------

    def _on_pod_event(self, event_type: str, pod: dict[str, Any]) -> None:
        metadata = pod["metadata"]
        key = (metadata["namespace"], metadata["name"])
        with self._lock:
            simulated = self._pods.get(key)
            if simulated is not None and simulated.uid != metadata["uid"]:
                self._forget(simulated)  # the name now belongs to a new pod (e.g. StatefulSet)
                simulated = None
            if event_type == "DELETED":
                if simulated is not None:
                    self._forget(simulated)
                return
            node = pod.get("spec", {}).get("nodeName")
            if node not in self._nodes:
                return
            if metadata.get("deletionTimestamp"):
                delay = termination_delay(pod)
                if simulated is not None and simulated.terminating is not None:
                    return  # already running out its preStop sleep
                if simulated is not None and delay > 0:
                    # The preStop sleep: still serving (Ready as probed; endpoints drop it as
                    # terminating) until the timer stops it.
                    simulated.terminating = threading.Timer(
                        delay, self._finish_termination, args=(simulated,)
                    )
                    simulated.terminating.daemon = True
                    simulated.terminating.start()
                    return
                if simulated is not None:
                    self._forget(simulated)
                # No kubelet will confirm the containers stopped: finish the deletion ourselves.
                self._force_delete(*key)
                return
            if simulated is None:
                devices = self._prepare_claims(pod, node=str(node))
                if devices is None:
                    return  # as a kubelet: containers wait until every claim is prepared
                simulated = self._admit(pod, node=str(node), devices=devices)
            self._report_status(pod, simulated)

    def _prepare_claims(self, pod: dict[str, Any], *, node: str) -> tuple[str, ...] | None:
        """The kubelet plugin's NodePrepareResources for the pod's claims: the devices, or
        None while a claim is not (yet) allocated on this node and reserved for this pod."""
        claims = _claim_names(pod)
        if not claims:
            return ()
        namespace, uid = pod["metadata"]["namespace"], pod["metadata"]["uid"]
        devices: list[str] = []
        for claim_name in claims:
            if claim_name is None:
                return None  # the resourceclaim controller has not made the claim yet
            try:
                claim = self._custom.get_namespaced_custom_object(
                    DRA_GROUP, DRA_VERSION, namespace, "resourceclaims", claim_name
                )
            except kubernetes.client.ApiException as error:
                if error.status == 404:
                    return None
                raise
            status = claim.get("status") or {}
            allocation = status.get("allocation") or {}
            reserved = {entry.get("uid") for entry in status.get("reservedFor") or ()}
            if uid not in reserved or node not in _allocated_nodes(allocation):
                return None
            results = (allocation.get("devices") or {}).get("results") or ()
            devices += [f"{r['driver']}/{r['pool']}/{r['device']}" for r in results]
            self._report_claim_devices(namespace, claim_name, results)
        return tuple(devices)

    def _report_claim_devices(
        self, namespace: str, claim: str, results: Sequence[dict[str, Any]]
    ) -> None:
        """Write the prepared devices into the claim's status, as a DRA driver does."""
        now = _now()
        devices = [
            {
                "driver": result["driver"],
                "pool": result["pool"],
                "device": result["device"],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Prepared",
                        "message": "prepared by the node simulator",
                        "lastTransitionTime": now,
                    }
                ],
            }
            for result in results
        ]
        self._ignore_missing(
            lambda: self._custom.patch_namespaced_custom_object_status(
                DRA_GROUP,
                DRA_VERSION,
                namespace,
                "resourceclaims",
                claim,
                {"status": {"devices": devices}},
            )
        )

    def _admit(
        self, pod: dict[str, Any], *, node: str, devices: tuple[str, ...] = ()
    ) -> _SimulatedPod:
        metadata = pod["metadata"]
        now = _now()
        containers = [c["name"] for c in runner_views.running_containers(pod.get("spec", {}))]
        simulated = _SimulatedPod(
            namespace=metadata["namespace"],
            name=metadata["name"],
            uid=metadata["uid"],
            node=node,
            ip=POD_ADDRESSES.allocate(),
            port=pod_port(pod),
            process=self._process_factory(pod) if self._process_factory else None,
            started_at=now,
            containers=containers,
            devices=devices,
            container_started_at=dict.fromkeys(containers, now),
        )
        self._pods[(simulated.namespace, simulated.name)] = simulated
        self._start_process(simulated)
        return simulated

    def _report_status(self, pod: dict[str, Any], simulated: _SimulatedPod) -> None:
        desired = desired_pod_status(pod, simulated, host_ip=self._nodes.get(simulated.node, ""))
        if _status_summary(pod.get("status") or {}) == _status_summary(desired):
            return  # our own previous patch coming back through the watch
        self._ignore_missing(
            lambda: self._core.patch_namespaced_pod_status(
                simulated.name,
                simulated.namespace,
                {"metadata": {"uid": simulated.uid}, "status": desired},
                _content_type=STRATEGIC_MERGE,
                _preload_content=False,
            )
        )

    def _forget(self, simulated: _SimulatedPod) -> None:
        if simulated.terminating is not None:
            simulated.terminating.cancel()
        if self._pods.get((simulated.namespace, simulated.name)) is simulated:
            del self._pods[(simulated.namespace, simulated.name)]
        self._stop_process(simulated)

    def _finish_termination(self, simulated: _SimulatedPod) -> None:
        """The preStop sleep is over: the containers stop, the pod goes."""
        if self._stopping.is_set():
            return
        with self._lock:
            self._forget(simulated)
            self._force_delete(simulated.namespace, simulated.name, simulated.uid)

    def _start_process(self, simulated: _SimulatedPod) -> None:
        if simulated.process is None:
            simulated.running = True
            return
        try:
            self.run(
                simulated.process.start(simulated.ip, simulated.port),
                timeout=PROCESS_TIMEOUT_SECONDS,
            )
        except Exception:
            # A process that cannot start is a container that is not ready, as on a real node.
            logger.exception("process for pod %s/%s failed", simulated.namespace, simulated.name)
            simulated.running = False
        else:
            simulated.running = True

    def _stop_process(self, simulated: _SimulatedPod) -> None:
        if simulated.process is None or not simulated.running:
            simulated.running = False
            return
        simulated.running = False
        try:
            self.run(simulated.process.stop(), timeout=PROCESS_TIMEOUT_SECONDS)
        except Exception:
            logger.exception("stopping pod %s/%s failed", simulated.namespace, simulated.name)

    # -- API helpers ------------------------------------------------------------------------

    def _force_delete(self, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete the pod now (``uid``: only that incarnation of the name)."""
        # Options in the body: the apiserver reads the query's grace period only without one.
        body = {"gracePeriodSeconds": 0, **({"preconditions": {"uid": uid}} if uid else {})}
        self._ignore_missing(
            lambda: self._core.delete_namespaced_pod(
                name, namespace, body=body, _preload_content=False
            )
        )

    def _read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: list[dict[str, Any]] = []
        self._ignore_missing(
            lambda: found.append(
                json.loads(
                    self._core.read_namespaced_pod(name, namespace, _preload_content=False).data
                )
            )
        )
        return found[0] if found else None

    def _read_node(self, name: str) -> dict[str, Any]:
        node: dict[str, Any] = json.loads(self._core.read_node(name, _preload_content=False).data)
        return node

    @staticmethod
    def _ignore_missing(call: Callable[[], object]) -> None:
        """Run an API call for which 404 (already gone) and 409 (uid changed) are fine."""
        try:
            call()
        except kubernetes.client.ApiException as error:
            if error.status not in (404, 409):
                raise


def _claim_names(pod: dict[str, Any]) -> list[str | None]:
    """The ResourceClaim behind each of the pod's claims (None: not generated yet)."""
    generated = {
        entry.get("name"): entry.get("resourceClaimName")
        for entry in (pod.get("status") or {}).get("resourceClaimStatuses") or ()
    }
    return [
        claim.get("resourceClaimName") or generated.get(claim.get("name"))
        for claim in (pod.get("spec") or {}).get("resourceClaims") or ()
    ]


def _allocated_nodes(allocation: dict[str, Any]) -> set[str]:
    """Node names an allocation's node selector names (the scheduler's ``metadata.name In``)."""
    terms = (allocation.get("nodeSelector") or {}).get("nodeSelectorTerms") or ()
    return {
        value
        for term in terms
        for field_ in term.get("matchFields") or ()
        if field_.get("key") == "metadata.name"
        for value in field_.get("values") or ()
    }


def _response_lines(response: Any) -> Iterator[str]:
    """The lines of a streaming watch response (one JSON event each)."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.decode()
