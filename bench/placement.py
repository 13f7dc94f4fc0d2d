"""Benchmark model placement: ``python bench/placement.py [--models 60] [--moving 20]``.

On the local control plane (real kube-apiserver, controller-manager, scheduler), a pool of 8
runner pods on simulated nodes of two GPU sizes (4 x 24 GiB, 4 x 80 GiB; one GPU each, 8 runner
slots each), a model-runner emulator behind each pod whose registry serves models of mixed sizes
with GGUF metadata, and the operator as its own process. Two phases:

1. Pack: ``--models`` DMRModels with ``placement.replicas`` (1, every 15th 2). Measured: time to
   all settled (Ready, or Insufficient when the pool is full), the memory the placed copies need
   per pod against the pod's GPU (by the operator's own formula, ``reconcile.model_memory``),
   ``_configure`` calls per placed (model, pod), and what "every model on every pod" would need.
2. Pod loss, twice: ``--moving`` models with 2 replicas each, and the node of the pod holding
   most of them is drained (cordon, then the Eviction API: the pod serves through the chart's
   preStop sleep) or, the second time, gone at once (a crash). Meanwhile a client sends one chat
   completion per model every 0.1 s through its Service, as kube-proxy routes it: to its Ready
   endpoints in turn (the pods with its label, not terminating), else to terminating ones.
   Measured: time until every model is served from 2 pods again, requests failed meanwhile.

Prints a markdown table (pasted into BENCHMARKS.md by hand, with the date).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import kubernetes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as bench_run
from dmr_operator import constants
from dmr_operator.reconcile import model_memory, model_routing
from dmr_operator.testing import cluster, controlplane, emulator_state, nodesim
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

GIB = 2**30
PLURAL = constants.DMRMODEL_PLURAL
CONFIGURE = "/engines/llama.cpp/_configure"
# Weights of the catalogue's models, GiB, in turn: 0.5 B to 32 B parameters at 4-8 bits.
# Six of ten fit a 24 GiB GPU eight at a time, the others want the big GPUs: a workload the
# pool can hold (about 305 GiB of 416, 62 of 64 runner slots) if it is packed well.
SIZES_GIB = (0.4, 0.8, 4.0, 1.2, 6.0, 1.6, 9.0, 2.0, 14.0, 0.6)
CONTEXT = 8192
GPU_NODES = (("l4", 24576), ("h100", 81920))  # name, nvidia.com/gpu.memory (MiB)
PRE_STOP_SECONDS = 15  # the chart's runnerPoolDefaults.preStopSleepSeconds


def catalogue_model(name: str, size_gib: float) -> emulator_state.CatalogueModel:
    """A model of that size with a llama model's attention (more layers when bigger)."""
    layers = 24 if size_gib < 2 else 32 if size_gib < 6 else 48 if size_gib < 12 else 64
    return emulator_state.llama_like(name, size=int(size_gib * GIB), layers=layers, context=CONTEXT)


def needs_bytes(model: emulator_state.CatalogueModel) -> int:
    return model_memory.model_needs(
        weights_bytes=model.size, gguf=model.gguf, context_size=CONTEXT
    ).total_bytes


def print_table(rows: list[tuple[str, str, str]]) -> None:
    """The rows as the markdown table BENCHMARKS.md takes."""
    print("| what | figure | notes |\n|---|---|---|")
    for what, figure, notes in rows:
        print(f"| {what} | {figure} | {notes} |")


class PlacementBench:
    def __init__(self, namespace: str = "bench-placement") -> None:
        self.namespace = namespace
        self.cp = controlplane.ControlPlane(controllers=True)
        self.cp.start()
        self.api = self.cp.api_client()
        self.core: Any = kubernetes.client.CoreV1Api(self.api)
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)
        cluster.apply_crds(self.api)
        self.emulators = cluster.EmulatorFactory()
        self.sim = nodesim.NodeSimulator(self.api, process_factory=self.emulators)
        self.sim.wait_synced()
        self.capacity: dict[str, int] = {}  # node -> GPU bytes
        for kind, mib in GPU_NODES:
            for index in range(4):
                node = f"bench-{kind}-{index}"
                self.sim.add_node(node, gpus=1, labels={"nvidia.com/gpu.memory": str(mib)})
                self.capacity[node] = mib * 2**20
        self.core.create_namespace({"metadata": {"name": namespace}})
        wait_for(
            lambda: self.core.read_namespaced_service_account("default", namespace),
            timeout=30,
            message="the default ServiceAccount",
            ignore=(kubernetes.client.ApiException,),
        )
        cluster.create_runner_pool(
            self.api, namespace=namespace, replicas=8, gpus=1, pre_stop_sleep=PRE_STOP_SECONDS
        )
        self.pods = cluster.wait_for_runner_pods(self.api, namespace, "default", 8)
        self.node_of = {
            pod: self.core.read_namespaced_pod(pod, namespace).spec.node_name for pod in self.pods
        }
        self.operator = OperatorProcess(
            kubeconfig=self.cp.kubeconfig_path, namespaces=[namespace], verify_interval=30
        )
        self.operator.start()

    def close(self) -> None:
        self.operator.stop()
        self.sim.close()
        self.api.close()
        self.cp.stop()

    def publish(self, models: list[emulator_state.CatalogueModel]) -> None:
        """Every runner's registry serves ``models`` (those running now and those to come)."""
        self.emulators.catalogue += tuple(models)
        for emulator in self.emulators.in_namespace(self.namespace).values():
            for model in models:
                emulator.catalogue[model.reference] = model

    def create(self, name: str, replicas: int) -> None:
        body = cluster.dmrmodel(
            name,
            {"model": f"ai/{name}", "contextSize": CONTEXT, "placement": {"replicas": replicas}},
        )
        self.custom.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, self.namespace, PLURAL, body
        )

    def statuses(self) -> dict[str, dict[str, Any]]:
        found = self.custom.list_namespaced_custom_object(
            constants.GROUP, constants.VERSION, self.namespace, PLURAL
        )
        return {i["metadata"]["name"]: i.get("status") or {} for i in found["items"]}

    def serving(self) -> dict[str, set[str]]:
        """Model name -> pods its Service selects now (placement label, not terminating)."""
        pods = self.core.list_namespaced_pod(self.namespace).items
        held: dict[str, set[str]] = {}
        prefix = model_routing.PLACEMENT_LABEL_PREFIX
        for pod in pods:
            if pod.metadata.deletion_timestamp is not None:
                continue
            for label, value in (pod.metadata.labels or {}).items():
                if label.startswith(prefix) and value == "true":
                    held.setdefault(label.removeprefix(prefix), set()).add(pod.metadata.name)
        return held

    def delete_all(self) -> None:
        for name in self.statuses():
            self.custom.delete_namespaced_custom_object(
                constants.GROUP, constants.VERSION, self.namespace, PLURAL, name
            )
        wait_for(lambda: not self.statuses(), timeout=120, message="DMRModels deleted")
        wait_for(lambda: not self.serving(), timeout=60, message="placement labels gone")

    # --- phase 1 ------------------------------------------------------------------------------

    def pack(self, count: int) -> list[tuple[str, str, str]]:
        models = [
            catalogue_model(f"pack-{i:03d}", SIZES_GIB[i % len(SIZES_GIB)]) for i in range(count)
        ]
        self.publish(models)
        wanted = {f"pack-{i:03d}": 2 if i % 30 == 29 else 1 for i in range(count)}
        started = time.monotonic()
        for name, replicas in wanted.items():
            self.create(name, replicas)

        def settled() -> dict[str, dict[str, Any]] | None:
            statuses = self.statuses()
            reasons = [
                next((c["reason"] for c in s.get("conditions") or () if c["type"] == "Ready"), "")
                for s in statuses.values()
            ]
            done = len(statuses) == count and all(
                s.get("phase") == "Ready" or r == "Insufficient"
                for s, r in zip(statuses.values(), reasons, strict=True)
            )
            return statuses if done else None

        statuses = wait_for(settled, timeout=600, interval=0.5, message="every model settled")
        elapsed = time.monotonic() - started
        serving = self.serving()
        by_ref = {m.reference.split("/")[-1].split(":")[0]: m for m in models}
        used: Counter[str] = Counter()
        copies = 0
        for name, pods in serving.items():
            for pod in pods:
                used[pod] += needs_bytes(by_ref[name])
                copies += 1
        configure_counts = Counter()
        for pod in self.pods:
            emulator = self.emulators.of(self.namespace, pod)
            for call in emulator.calls("POST", CONFIGURE):
                configure_counts[(call.body or {}).get("model"), pod] += 1
        placed_pairs = {(f"ai/{n}:latest", p) for n, pods in serving.items() for p in pods}
        exact = sum(1 for pair in placed_pairs if configure_counts[pair] == 1)
        ready = sum(1 for s in statuses.values() if s.get("phase") == "Ready")
        insufficient = count - ready
        rows = [
            ("pack: models / placements wanted", f"{count} / {sum(wanted.values())}", ""),
            (
                "pack: time to all settled",
                f"{elapsed:.1f} s",
                f"{ready} Ready, {insufficient} Insufficient",
            ),
            ("pack: copies placed", str(copies), f"everything everywhere: {count * 8}"),
            (
                "pack: _configure per placed (model, pod)",
                f"{exact}/{len(placed_pairs)} exactly 1",
                "",
            ),
        ]
        overcommitted = 0
        for pod in sorted(self.pods):
            node = self.node_of[pod]
            capacity = self.capacity[node]
            overcommitted += used[pod] > capacity
            rows.append(
                (
                    f"pack: GPU memory on {pod} ({node})",
                    f"{used[pod] / GIB:.1f} / {capacity / GIB:.0f} GiB",
                    f"{sum(1 for pods in serving.values() if pod in pods)} models",
                )
            )
        everywhere = sum(needs_bytes(m) for m in models)
        rows.append(
            (
                "pack: pods over their GPU memory",
                str(overcommitted),
                f"everything everywhere would need {everywhere / GIB:.0f} GiB on every pod "
                f"(largest GPU 80 GiB) and {count} slots (8)",
            )
        )
        if insufficient:
            sample = next(
                c["message"]
                for s in statuses.values()
                for c in s.get("conditions") or ()
                if c["type"] == "Ready" and c["reason"] == "Insufficient"
            )
            rows.append(("pack: an Insufficient message", "", sample))
        return rows

    # --- phase 2 ------------------------------------------------------------------------------

    def endpoints(self) -> dict[str, tuple[list[str], list[str]]]:
        """Model name -> the pods its Service sends to, as kube-proxy picks them: the Ready
        ones that are not terminating; if none, the terminating ones still Ready (serving)."""
        pods = self.core.list_namespaced_pod(self.namespace).items
        prefix = model_routing.PLACEMENT_LABEL_PREFIX
        found: dict[str, tuple[list[str], list[str]]] = {}
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            ready = any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ()
            )
            for label, value in (pod.metadata.labels or {}).items():
                if ready and label.startswith(prefix) and value == "true":
                    ready_pods, terminating = found.setdefault(label.removeprefix(prefix), ([], []))
                    leaving = pod.metadata.deletion_timestamp is not None
                    (terminating if leaving else ready_pods).append(pod.metadata.name)
        return found

    def pod_loss(self, count: int, how: str) -> list[tuple[str, str, str]]:
        """``how``: ``drain`` (cordon and evict: the pod gets its grace period and serves
        through its preStop sleep) or ``crash`` (the node is gone at once, as on a power loss)."""
        small = [size for size in SIZES_GIB if size <= 2]
        models = [catalogue_model(f"move-{i:03d}", small[i % len(small)]) for i in range(count)]
        self.publish(models)
        names = [f"move-{i:03d}" for i in range(count)]
        for name in names:
            self.create(name, 2)
        wait_for(
            lambda: (
                all(
                    s.get("placedSummary") == "2/2" and s.get("phase") == "Ready"
                    for s in self.statuses().values()
                )
                and len(self.statuses()) == count
            ),
            timeout=300,
            interval=0.5,
            message="every moving model on 2 pods",
        )
        serving = self.serving()
        per_pod = Counter(pod for pods in serving.values() for pod in pods)
        victim = max(per_pod, key=lambda pod: (per_pod[pod], pod))
        outcome = Counter[str]()
        stop = threading.Event()

        def client() -> None:
            """One chat completion per model every 0.1 s through its Service: to the next of
            its endpoints in turn, as kube-proxy spreads connections."""
            turn = Counter[str]()
            with httpx.Client(timeout=5.0) as http:
                while not stop.is_set():
                    for name, (ready, terminating) in self.endpoints().items():
                        pods = ready or terminating
                        pod = pods[turn[name] % len(pods)]
                        turn[name] += 1
                        where = "lost pod" if pod == victim else "other pods"
                        address = self.sim.address_of(self.namespace, pod)
                        if address is None:
                            outcome[f"{where}: no address"] += 1
                            continue
                        try:
                            response = http.post(
                                f"http://{address}:{constants.RUNNER_PORT}/engines/v1/chat/completions",
                                json={
                                    "model": f"ai/{name}",
                                    "messages": [{"role": "user", "content": "hi"}],
                                },
                            )
                            ok = response.status_code == 200
                            outcome[
                                f"{where}: ok" if ok else f"{where}: HTTP {response.status_code}"
                            ] += 1
                        except httpx.HTTPError as error:
                            outcome[f"{where}: {type(error).__name__}"] += 1
                    stop.wait(0.1)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        time.sleep(1.0)  # a baseline of requests before the loss
        started = time.monotonic()
        node = self.node_of[victim]
        if how == "drain":
            self.sim.drain_node(node)
        else:
            self.sim.remove_node(node)

        def recovered() -> bool:
            now = self.endpoints()
            statuses = self.statuses()
            return all(
                len(set(now.get(name, ([], []))[0]) - {victim}) == 2
                and statuses[name].get("placedSummary") == "2/2"
                for name in names
            )

        wait_for(recovered, timeout=300, interval=0.2, message="every model on 2 pods again")
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # requests after the move too
        stop.set()
        thread.join(timeout=10)
        total = sum(outcome.values())
        failed = {k: v for k, v in outcome.items() if not k.endswith(": ok")}
        return [
            (
                f"pod loss ({how}): models (2 replicas) / on the lost pod",
                f"{count} / {per_pod[victim]}",
                f"{victim} on {node}",
            ),
            (f"pod loss ({how}): time until all served from 2 pods", f"{elapsed:.1f} s", ""),
            (
                f"pod loss ({how}): requests failed",
                f"{sum(failed.values())} of {total}",
                ", ".join(f"{k}: {v}" for k, v in sorted(outcome.items())),
            ),
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=60)
    parser.add_argument("--moving", type=int, default=20)
    args = parser.parse_args(argv)
    bench = PlacementBench()
    rows: list[tuple[str, str, str]] = []
    try:
        print("==> pack", flush=True)
        rows += bench.pack(args.models)
        bench.delete_all()
        print("==> pod loss: node drain", flush=True)
        rows += bench.pod_loss(args.moving, "drain")
        bench.delete_all()
        print("==> pod loss: node crash", flush=True)
        rows += bench.pod_loss(args.moving, "crash")
        rss, cpu = bench_run.proc_stats(bench.operator.pid)
        rows.append(("operator peak RSS / CPU", f"{rss:.0f} MB / {cpu:.0f} s", ""))
    finally:
        bench.close()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
