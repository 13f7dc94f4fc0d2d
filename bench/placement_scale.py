"""Benchmark placement at scale: ``python bench/placement_scale.py [--namespaces 50] [--models
10000] [--pods 30] [--idle-minutes 3]``.

``--models`` DMRModels with ``placement.replicas: 1`` spread evenly over ``--namespaces``
namespaces, each namespace with its own pool of ``--pods`` CPU runner pods (runner pools are
namespaced: a DMRModel is placed on pods of its own namespace), on ``--nodes`` simulated nodes
(64 cores, so 8 runner slots per pod; each runner container limited to 24 GiB, the budget its
models are placed against). Every namespace asks for the same 200 catalogue models (0.4 to
2 GiB, contextSize 4096), as teams sharing a cluster do; 200 models on 30 pods of 8 slots fill
83% of the pool. The real control plane with an audit log (``bench/audit.py``), the operator as
its own process watching all namespaces, an emulator behind every runner pod.

Measured: time to all Ready (creates by a 4-thread client), Kubernetes API requests per DMRModel
(audit log, the operator's User-Agents, from the first create until it has been quiet 3 s) by
verb, ``_configure`` per placed (model, pod), runner slots and memory against each pod's budget,
the operator's peak RSS (VmHWM) and CPU, then an idle window: writes, reads, runner requests.

Prints a markdown table (pasted into BENCHMARKS.md by hand, with the date).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import audit, placement
from bench import run as bench_run
from dmr_operator import constants
from dmr_operator.reconcile import model_memory, model_routing
from dmr_operator.testing import cluster, controlplane, emulator_state, nodesim
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

GIB = 2**30
PLURAL = constants.DMRMODEL_PLURAL
CONFIGURE = "/engines/llama.cpp/_configure"
CATALOGUE_MODELS = 200
SIZES_GIB = (0.4, 0.8, 1.2, 1.6, 2.0, 0.6)
CONTEXT = 4096
POD_MEMORY = "24Gi"


def catalogue() -> list[emulator_state.CatalogueModel]:
    return [
        emulator_state.llama_like(
            f"scale-{i:03d}",
            size=int(SIZES_GIB[i % len(SIZES_GIB)] * GIB),
            layers=24,
            context=CONTEXT,
        )
        for i in range(CATALOGUE_MODELS)
    ]


def needs_bytes(model: emulator_state.CatalogueModel) -> int:
    """What placement counts for the model at the benchmark's context."""
    return model_memory.model_needs(
        weights_bytes=model.size, gguf=model.gguf, context_size=CONTEXT
    ).total_bytes


class MemrayOperatorProcess(OperatorProcess):
    """The operator under ``memray run --aggregate`` (``--memray FILE``): where the memory at
    its peak was allocated (``memray tree FILE``, ``memray stats FILE``). Slower; RSS figures
    of such a run are not the operator's own."""

    memray_output = ""

    def argv(self) -> list[str]:
        python, *rest = super().argv()
        memray = ["-m", "memray", "run", "--aggregate", "--trace-python-allocators", "--force"]
        memray += ["-o", self.memray_output]
        return [python, *memray, *rest]


class ScaleBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.models = catalogue()
        self.needs = {model.reference: needs_bytes(model) for model in self.models}
        binaries = controlplane.ensure_binaries(build=False)
        self.cp = audit.AuditedControlPlane(controllers=True, binaries=binaries)
        self.cp.start()
        self.api = self.cp.api_client()
        self.core: Any = kubernetes.client.CoreV1Api(self.api)
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)
        cluster.apply_crds(self.api)
        self.emulators = cluster.EmulatorFactory(catalogue=self.models, idle_check_interval=5.0)
        self.sim = nodesim.NodeSimulator(self.api, process_factory=self.emulators)
        self.sim.wait_synced()
        for index in range(args.nodes):
            self.sim.add_node(f"scale-{index:02d}", cpu="64", memory="2Ti", pods=250)
        self.namespaces = [f"team-{i:02d}" for i in range(args.namespaces)]
        for namespace in self.namespaces:
            self.core.create_namespace({"metadata": {"name": namespace}})
        for namespace in self.namespaces:
            wait_for(
                lambda namespace=namespace: self.core.read_namespaced_service_account(
                    "default", namespace
                ),
                timeout=60,
                message=f"the default ServiceAccount of {namespace}",
                ignore=(kubernetes.client.ApiException,),
            )
            cluster.create_runner_pool(
                self.api, namespace=namespace, replicas=args.pods, memory=POD_MEMORY
            )
        started = time.monotonic()
        for namespace in self.namespaces:
            cluster.wait_for_runner_pods(
                self.api, namespace, constants.DEFAULT_POOL, args.pods, timeout=600
            )
        print(
            f"    {len(self.namespaces) * args.pods} runner pods Ready in "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        operator = MemrayOperatorProcess if args.memray else OperatorProcess
        self.operator = operator(
            kubeconfig=self.cp.kubeconfig_path, verify_interval=args.verify_interval
        )
        if args.memray:
            self.operator.memray_output = args.memray
        self.operator.start()

    def close(self) -> None:
        self.operator.stop()
        self.sim.close()
        self.api.close()
        self.cp.stop()

    def dmrmodels(self) -> list[dict[str, Any]]:
        found = self.custom.list_cluster_custom_object(constants.GROUP, constants.VERSION, PLURAL)
        return list(found["items"])

    def serving(self) -> dict[tuple[str, str], set[str]]:
        """(namespace, model name) -> the pods carrying its placement label."""
        pods = self.core.list_pod_for_all_namespaces(label_selector=constants.POOL_LABEL).items
        held: dict[tuple[str, str], set[str]] = {}
        prefix = model_routing.PLACEMENT_LABEL_PREFIX
        for pod in pods:
            for label, value in (pod.metadata.labels or {}).items():
                if label.startswith(prefix) and value == "true":
                    key = (pod.metadata.namespace, label.removeprefix(prefix))
                    held.setdefault(key, set()).add(pod.metadata.name)
        return held

    def create(self, index: int) -> None:
        namespace = self.namespaces[index % len(self.namespaces)]
        model = index // len(self.namespaces)
        name = f"m-{model:03d}"
        body = cluster.dmrmodel(
            name,
            {
                "model": f"ai/scale-{model % CATALOGUE_MODELS:03d}",
                "contextSize": CONTEXT,
                "placement": {"replicas": 1},
            },
        )
        self.custom.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, PLURAL, body
        )

    def settle(self, since: float, quiet: float = 3.0, timeout: float = 300.0) -> float:
        """When the operator's last write is ``quiet`` seconds old (``audit.wait_quiet``)."""
        return audit.wait_quiet(self.cp.audit_log_path, since=since, quiet=quiet, timeout=timeout)

    def scale(self) -> list[tuple[str, str, str]]:
        count = self.args.models
        _, cpu_before = bench_run.proc_stats(self.operator.pid)
        started = time.time()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(self.create, range(count)))
        created = time.time()

        def all_ready() -> list[dict[str, Any]] | None:
            items = self.dmrmodels()
            phases = Counter((i.get("status") or {}).get("phase") for i in items)
            progress = f"{phases.get('Ready', 0)}/{count} Ready"
            if progress != getattr(all_ready, "shown", None):
                print(f"    {time.time() - started:5.0f} s: {progress}", flush=True)
                all_ready.shown = progress  # type: ignore[attr-defined]
            return items if len(items) == count and phases.get("Ready") == count else None

        # A list of every DMRModel is a load of its own (30 MB at 10,000): not too often.
        interval = max(2.0, count / 1000)
        items = wait_for(
            all_ready, timeout=max(600, count * 0.3), interval=interval, message="all Ready"
        )
        ready = time.time()
        settled = self.settle(ready)
        rss, cpu_after = bench_run.proc_stats(self.operator.pid)
        requests = audit.count(audit.read(self.cp.audit_log_path), since=started, until=settled)
        serving = self.serving()
        by_model = {
            (i["metadata"]["namespace"], i["metadata"]["name"]): i["spec"]["model"] for i in items
        }
        configures: Counter[tuple[str, str, str]] = Counter()
        slots: Counter[tuple[str, str]] = Counter()
        memory: Counter[tuple[str, str]] = Counter()
        for (namespace, pod), emulator in self.emulators.emulators.items():
            for call in emulator.calls("POST", CONFIGURE):
                configures[namespace, pod, str((call.body or {}).get("model"))] += 1
        placed = 0
        for (namespace, name), pods in serving.items():
            reference = f"docker.io/{by_model[namespace, name]}:latest"
            for pod in pods:
                placed += 1
                slots[namespace, pod] += 1
                memory[namespace, pod] += self.needs[reference]
        exactly_once = sum(1 for n in configures.values() if n == 1)
        budget = 24 * GIB
        pods_total = len(self.namespaces) * self.args.pods
        return [
            (
                "scale: DMRModels / namespaces / runner pods",
                f"{count} / {len(self.namespaces)} / {pods_total}",
                f"{self.args.pods} pods per namespace on {self.args.nodes} nodes",
            ),
            (
                "scale: all Ready after",
                f"{ready - started:.0f} s",
                f"creates took {created - started:.0f} s",
            ),
            (
                "scale: Kubernetes API requests per DMRModel (reads / writes)",
                f"{requests.reads / count:.2f} / {requests.writes / count:.2f}",
                ", ".join(f"{key}: {n}" for key, n in requests.by_verb.items()),
            ),
            (
                "scale: copies placed / _configure calls exactly once per (model, pod)",
                f"{placed} / {exactly_once} of {len(configures)}",
                "",
            ),
            (
                "scale: most runner slots / memory used on a pod",
                f"{max(slots.values())} of 8 / {max(memory.values()) / GIB:.1f} of 24 GiB",
                f"pods over: {sum(1 for k in slots if slots[k] > 8 or memory[k] > budget)}",
            ),
            ("scale: operator peak RSS (VmHWM)", f"{rss:.0f} MB", "goal < 400 MB"),
            ("scale: operator CPU", f"{cpu_after - cpu_before:.0f} s", ""),
        ]

    def idle(self) -> list[tuple[str, str, str]]:
        minutes = self.args.idle_minutes
        emulators = list(self.emulators.emulators.values())
        before = [len(e.requests) for e in emulators]
        _, cpu_before = bench_run.proc_stats(self.operator.pid)
        started = time.time()
        time.sleep(minutes * 60)
        ended = time.time()
        # Taken at the end of the window: reading the audit log takes seconds, and the runners'
        # requests meanwhile do not belong to it.
        after = [len(e.requests) for e in emulators]
        _, cpu_after = bench_run.proc_stats(self.operator.pid)
        new = [
            r
            for e, first, last in zip(emulators, before, after, strict=True)
            for r in e.requests[first:last]
        ]
        requests = audit.count(audit.read(self.cp.audit_log_path), since=started, until=ended)
        kinds = Counter(f"{r.method} {r.path}" for r in new)
        return [
            (
                f"idle {minutes:g} min: Kubernetes writes / reads",
                f"{requests.writes} / {requests.reads}",
                ", ".join(f"{key}: {n}" for key, n in requests.by_verb.items()) or "none",
            ),
            (
                f"idle: runner requests/s to {len(emulators)} runners",
                f"{len(new) / (ended - started):.1f}",
                ", ".join(f"{key}: {n}" for key, n in kinds.most_common())
                + f" (bound: pods / --verify-interval = "
                f"{len(emulators) / self.args.verify_interval:.1f})",
            ),
            ("idle: operator CPU", f"{cpu_after - cpu_before:.1f} s", ""),
            (
                "operator peak RSS (VmHWM) at the end",
                f"{bench_run.proc_stats(self.operator.pid)[0]:.0f} MB",
                "goal < 400 MB",
            ),
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--pods", type=int, default=30, help="runner pods per namespace")
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--idle-minutes", type=float, default=3.0)
    parser.add_argument("--verify-interval", type=float, default=60.0)
    parser.add_argument("--memray", default="", help="run the operator under memray, into FILE")
    args = parser.parse_args(argv)
    print("==> setup", flush=True)
    bench = ScaleBench(args)
    rows: list[tuple[str, str, str]] = []
    try:
        print("==> scale", flush=True)
        rows += bench.scale()
        print("==> idle", flush=True)
        rows += bench.idle()
    finally:
        bench.close()
    placement.print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
