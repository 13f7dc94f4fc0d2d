"""``dmr-operator sandbox``: the whole system on one machine, with no cluster and no GPU.

Brings up the local control plane (``testing.controlplane``; built and cached on first use),
simulated GPU nodes whose model-runner pods are served by emulators (``testing.nodesim`` and
``testing.cluster.EmulatorFactory``), the CRDs, a namespace with the default runner pool of
``examples/00-pool.yaml``, the operator as its own process (``testing.operatorprocess``) and the
rest of ``examples/``; then shows a ``kubectl get dmrmodels,agents``-style table until everything
is Ready and keeps running until Ctrl-C. Stopping (Ctrl-C, SIGTERM, ``--exit-when-ready``, a
timeout or an error) tears everything down in reverse order: no process is left behind.
Registered in ``cli.py``; uses no test-only dependency (no Helm).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import kubernetes

from dmr_operator import constants
from dmr_operator.testing import cluster, controlplane, manifests, nodesim
from dmr_operator.testing.operatorprocess import OperatorProcess

DEFAULT_NAMESPACE = "demo"
DEFAULT_TIMEOUT_SECONDS = 300.0
POOL_FILE = "00-pool.yaml"
GPU_NODES = 2
GPUS_PER_NODE = 2
# Like kind-config.yaml's GPU worker: only pods that tolerate it land on a GPU node.
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
REFRESH_SECONDS = 0.5
VERIFY_INTERVAL_SECONDS = 10.0
FIELD_MANAGER = "dmr-sandbox"
READY = "Ready"
STATEFULSETS = "statefulsets"


def _status(obj: Mapping[str, Any]) -> dict[str, Any]:
    return dict(obj.get("status") or {})


def _pool_pods(statefulset: Mapping[str, Any]) -> str:
    wanted = (statefulset.get("spec") or {}).get("replicas", 1)
    return f"{_status(statefulset).get('readyReplicas') or 0}/{wanted}"


# (header, how to read it from an object) per table; kubectl's printer columns for these kinds.
Column = tuple[str, Callable[[Mapping[str, Any]], Any]]
DMRMODEL_COLUMNS: tuple[Column, ...] = (
    ("MODEL", lambda o: o["spec"].get("model")),
    ("BACKEND", lambda o: _status(o).get("backend")),
    ("RUNNERS", lambda o: _status(o).get("runnersSummary")),
    ("PHASE", lambda o: _status(o).get("phase")),
)
POOL_COLUMNS: tuple[Column, ...] = (
    ("POOL", lambda o: o["metadata"].get("labels", {}).get(constants.POOL_LABEL)),
    ("READY", _pool_pods),
)
AGENT_COLUMNS: tuple[Column, ...] = (
    ("MODELS", lambda o: _status(o).get("readyModels")),
    ("REPLICAS", lambda o: _status(o).get("readyOfDesired")),
    ("PHASE", lambda o: _status(o).get("phase")),
)


def default_examples_dir() -> Path:
    """examples/ of the source tree this package runs from (an editable install or a checkout)."""
    return Path(__file__).resolve().parents[2] / "examples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n",
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help=f"namespace for the pool and the examples (default: {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=default_examples_dir(),
        help="directory of manifests to apply (default: the repository's examples/)",
    )
    parser.add_argument(
        "--no-examples",
        action="store_true",
        help=f"only the runner pool ({POOL_FILE}), no DMRModels or Agents",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="seconds for everything to become Ready; exit 1 if it does not "
        f"(default: {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    parser.add_argument(
        "--exit-when-ready",
        action="store_true",
        help="stop and exit 0 as soon as everything is Ready (for tests and CI)",
    )


class _Stop(Exception):
    """SIGINT or SIGTERM: leave whatever is running and tear down."""


def sandbox_command(args: argparse.Namespace) -> int:
    out = sys.stdout
    examples_dir: Path = args.examples
    if not (examples_dir / POOL_FILE).is_file():
        print(f"no {POOL_FILE} in {examples_dir}: pass --examples DIR", file=sys.stderr)
        return 2
    with _signals_raise_stop():
        try:
            binaries = controlplane.ensure_binaries(progress=_progress)
            with _Sandbox(namespace=args.namespace, binaries=binaries, out=out) as sandbox:
                sandbox.install(pool=manifests.load_file(examples_dir / POOL_FILE))
                if not args.no_examples:
                    sandbox.apply_examples(
                        manifests.load_directory(examples_dir, exclude=[POOL_FILE])
                    )
                if not sandbox.watch_until_ready(timeout=args.timeout):
                    return 1
                sandbox.print_hints(exit_when_ready=args.exit_when_ready)
                if not args.exit_when_ready:
                    sandbox.watch_forever()
        except _Stop:
            print("\nstopping ...", file=out, flush=True)
        except controlplane.ControlPlaneUnavailable as error:
            print(f"control plane unavailable: {error}", file=sys.stderr)
            return 2
    print("stopped; nothing left running.", file=out, flush=True)
    return 0


def _progress(message: str) -> None:
    print(f"[sandbox] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals_raise_stop() -> Iterator[None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Sandbox:
    """The running pieces, started in order and stopped in reverse by ``__exit__``."""

    def __init__(self, *, namespace: str, binaries: controlplane.Binaries, out: TextIO) -> None:
        self.namespace = namespace
        self.out = out
        self.kubectl = binaries.kubectl
        self._stack = contextlib.ExitStack()
        self.started = time.monotonic()
        self.control_plane = controlplane.ControlPlane(
            controllers=True, binaries=binaries, progress=_progress
        )
        self.operator: OperatorProcess | None = None
        self.api_client: Any = None
        self.simulator: nodesim.NodeSimulator | None = None
        self.applier: manifests.Applier | None = None
        self._table = _LiveTable(out)

    def __enter__(self) -> _Sandbox:
        try:
            _progress("starting the control plane (etcd, kube-apiserver, controllers) ...")
            self._stack.enter_context(self.control_plane)
            self.api_client = self.control_plane.api_client()
            self._stack.callback(self.api_client.close)
            self.applier = manifests.Applier(self.api_client, field_manager=FIELD_MANAGER)
            self.simulator = nodesim.NodeSimulator(
                self.api_client, process_factory=cluster.EmulatorFactory()
            )
            self._stack.callback(self.simulator.close)
            self.simulator.wait_synced()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        _progress("shutting down ...")
        self._stack.close()

    def install(self, *, pool: Sequence[dict[str, Any]]) -> None:
        """Nodes, CRDs, namespace, runner pool, operator."""
        assert self.simulator is not None and self.applier is not None
        for index in range(GPU_NODES):
            self.simulator.add_node(f"sim-gpu-{index}", gpus=GPUS_PER_NODE, taints=[GPU_TAINT])
        self.simulator.add_node("sim-cpu-0")
        _progress(f"{GPU_NODES} simulated GPU nodes ({GPUS_PER_NODE} GPUs each) and 1 CPU node")
        cluster.apply_crds(self.api_client)
        _progress("CRDs installed: dmrmodels.dmr.dev, agents.dmr.dev")
        self.applier.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}
        )
        self.applier.apply_all(pool, namespace=self.namespace)
        _progress(f"namespace {self.namespace} with the default runner pool ({POOL_FILE})")
        self.operator = OperatorProcess(
            kubeconfig=self.control_plane.kubeconfig_path,
            namespaces=[self.namespace],
            verify_interval=VERIFY_INTERVAL_SECONDS,
            log_path=self.control_plane.work_dir / "operator.log",
        )
        self._stack.callback(self.operator.stop)
        self.operator.start()
        _progress(f"operator running (log: {self.operator.log_path})")

    def apply_examples(self, documents: Sequence[dict[str, Any]]) -> None:
        assert self.applier is not None
        volumes = [
            manifests.placeholder_volume(f"sandbox-store-{index}", size=size)
            for index, size in enumerate(_sidecar_store_sizes(documents))
        ]
        self.applier.apply_all(volumes)
        for document in documents:
            self.applier.apply(document, namespace=self.namespace)
            kind, name = document["kind"], document["metadata"]["name"]
            _progress(f"applied {kind.lower()}/{name}")

    # -- watching ---------------------------------------------------------------------------

    def _objects(self) -> list[tuple[str, Mapping[str, Any]]]:
        """The runner pools' StatefulSets, DMRModels and Agents of the namespace, as dicts."""
        apps: Any = kubernetes.client.AppsV1Api(self.api_client)
        custom: Any = kubernetes.client.CustomObjectsApi(self.api_client)
        pools = apps.list_namespaced_stateful_set(
            self.namespace, label_selector=constants.POOL_LABEL
        )
        found: list[tuple[str, Mapping[str, Any]]] = [
            (STATEFULSETS, self.api_client.sanitize_for_serialization(item)) for item in pools.items
        ]
        for plural in (constants.DMRMODEL_PLURAL, constants.AGENT_PLURAL):
            listing = custom.list_namespaced_custom_object(
                constants.GROUP, constants.VERSION, self.namespace, plural
            )
            found += [(plural, item) for item in listing.get("items", [])]
        return found

    def watch_until_ready(self, *, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            objects = self._objects()
            self._table.show(render_table(objects))
            if all(is_ready(plural, obj) for plural, obj in objects):
                elapsed = time.monotonic() - self.started
                print(f"\neverything is Ready ({elapsed:.0f}s).", file=self.out, flush=True)
                return True
            if time.monotonic() >= deadline:
                print(
                    f"\nnot Ready after {timeout:g}s; operator log tail:\n"
                    f"{self.operator.log_tail(20) if self.operator else ''}",
                    file=self.out,
                    flush=True,
                )
                return False
            time.sleep(REFRESH_SECONDS)

    def watch_forever(self) -> None:
        while True:  # until SIGINT/SIGTERM raise _Stop
            self._table.show(render_table(self._objects()))
            time.sleep(REFRESH_SECONDS)

    def print_hints(self, *, exit_when_ready: bool) -> None:
        kubeconfig = self.control_plane.kubeconfig_path
        lines = [
            f"kubeconfig: {kubeconfig}",
            f"  export KUBECONFIG={kubeconfig}",
            f"  kubectl get dmrm,agents -n {self.namespace}",
            f"  kubectl describe dmrm -n {self.namespace}",
            # Debian's kubectl is 1.20: far outside the supported skew of this cluster.
            f"kubectl at the cluster's version: {self.kubectl or '(not built)'}",
            f"operator log: {self.operator.log_path if self.operator else '-'}",
        ]
        if not exit_when_ready:
            lines.append("Ctrl-C stops everything.")
        print("\n".join(lines), file=self.out, flush=True)
        self._table.reset()


def is_ready(plural: str, obj: Mapping[str, Any]) -> bool:
    if plural == STATEFULSETS:
        ready, wanted = _pool_pods(obj).split("/")
        return ready == wanted
    return _status(obj).get("phase") == READY


def _sidecar_store_sizes(documents: Sequence[Mapping[str, Any]]) -> list[str]:
    sizes = []
    for document in documents:
        if document.get("kind") != constants.AGENT_KIND:
            continue
        storage = ((document.get("spec") or {}).get("runner") or {}).get("storage") or {}
        if storage.get("size"):
            sizes.append(str(storage["size"]))
    return sizes


def render_table(objects: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """``kubectl get statefulsets,dmrmodels,agents`` output: a block per kind, columns aligned."""
    lines: list[str] = []
    for plural, kind, columns in (
        (STATEFULSETS, "statefulset.apps", POOL_COLUMNS),
        (constants.DMRMODEL_PLURAL, f"dmrmodel.{constants.GROUP}", DMRMODEL_COLUMNS),
        (constants.AGENT_PLURAL, f"agent.{constants.GROUP}", AGENT_COLUMNS),
    ):
        rows = [
            [f"{kind}/{obj['metadata']['name']}"] + [_cell(read(obj)) for _, read in columns]
            for item_plural, obj in objects
            if item_plural == plural
        ]
        if not rows:
            continue
        table = [["NAME", *(header for header, _ in columns)], *rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        if lines:
            lines.append("")
        lines += [
            "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in table
        ]
    return lines or ["(no dmrmodels or agents yet)"]


def _cell(value: Any) -> str:
    return "<none>" if value is None or value == "" else str(value)


class _LiveTable:
    """Redraws the table in place on a terminal; elsewhere prints it again when it changes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.interactive = out.isatty()
        self._shown: list[str] = []
        self._redrawable = False

    def show(self, lines: list[str]) -> None:
        if lines == self._shown:
            return
        if self.interactive and self._redrawable:
            # Cursor up over the previous table, then clear to the end of the screen.
            self.out.write(f"\x1b[{len(self._shown)}F\x1b[J")
        elif self._shown:
            self.out.write("\n")
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._shown = lines
        self._redrawable = True

    def reset(self) -> None:
        """Text was printed below the table: never move the cursor back over it."""
        self._redrawable = False
