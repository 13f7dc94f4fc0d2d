"""Benchmark dmr-operator on the local control plane: ``python bench/run.py [--quick]``.

Starts its own control plane (kube-apiserver with an audit log, see ``bench/audit.py``),
simulated GPU nodes with an in-process model-runner emulator behind every runner pod, the operator
as a real process (so RSS and CPU are its own) and the floor operator (``bench/floor_operator.py``),
then measures, in order: apply -> configured latency against the floor, scale to many DMRModels,
then many Agents on some of those (now Ready) models, recovery after a runner crash, and an idle
window. Prints the table and writes it into
BENCHMARKS.md between the ``bench:results`` markers (``bench/report.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import audit, report
from dmr_operator import constants
from dmr_operator.dmr import references
from dmr_operator.testing import cluster, controlplane, emulator_state, nodesim
from dmr_operator.testing.emulator import ModelRunnerEmulator
from dmr_operator.testing.operatorprocess import OperatorProcess
from dmr_operator.testing.waiting import wait_for

PLURAL = constants.DMRMODEL_PLURAL
AGENTS = constants.AGENT_PLURAL
# How many of the scale phase's DMRModels the Agents share (round-robin): several Agents per model,
# as on a real shared pool.
AGENT_MODELS = 10
CONFIGURE = "/engines/llama.cpp/_configure"
FLOOR_OPERATOR = Path(__file__).resolve().parent / "floor_operator.py"
BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def model_ref(prefix: str, index: int) -> str:
    return f"ai/{prefix}-{index:04d}:latest"


def spec_for(prefix: str, index: int) -> dict[str, Any]:
    return {"model": model_ref(prefix, index), "contextSize": 4096}


def add_to_catalogue(emulator: ModelRunnerEmulator, refs: Iterable[str]) -> None:
    """Bench models exist in the emulated registry and are already in the runner's store
    (pre-pulled), so the operator and the floor do the same work: one ``_configure``."""
    refs = list(refs)
    for ref in refs:
        emulator.catalogue[references.qualified_tag(ref)] = emulator_state.CatalogueModel(
            reference=ref, digest=emulator_state.fake_digest(ref), size=16 * 2**20
        )
    emulator.preload_store(*refs)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p99 is a value that happened)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-int(fraction * 1000) * len(ordered) // 1000))
    return ordered[min(rank, len(ordered)) - 1]


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB from VmHWM, CPU seconds user+system) of a live process. VmHWM is in
    KiB; MB here are 10**6 bytes, the unit the goals are written in (before 2026-12-05 this
    returned MiB, so figures recorded earlier read about 5 % low)."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm_kb * 1024 / 1e6, (int(fields[11]) + int(fields[12])) / ticks


def configures_since(emulator: ModelRunnerEmulator, since: float) -> list[Any]:
    return [r for r in emulator.calls("POST", CONFIGURE) if r.time >= since and r.status == 202]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[report.Row] = []
        self.details: list[str] = []
        binaries = controlplane.ensure_binaries(build=False)
        self.cp = audit.AuditedControlPlane(controllers=True, binaries=binaries)
        self.cp.start()
        self.api = self.cp.api_client()
        self.cluster = report.cluster_facts(
            kubernetes.client.VersionApi(self.api).get_code().git_version, binaries.etcd
        )
        self.custom: Any = kubernetes.client.CustomObjectsApi(self.api)
        self.core: Any = kubernetes.client.CoreV1Api(self.api)
        cluster.apply_crds(self.api)
        self.emulators = cluster.EmulatorFactory()
        self.sim = nodesim.NodeSimulator(self.api, process_factory=self.emulators)
        self.sim.wait_synced()
        for index in range(6):
            self.sim.add_node(f"bench-gpu-{index}", gpus=1)
        # Agent pods (Pool mode) ask for no GPU; CPU-only nodes like a real cluster has for them.
        for index in range(2):
            self.sim.add_node(f"bench-cpu-{index}")
        self.operator: OperatorProcess | None = None
        self.floor: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        if self.floor is not None and self.floor.poll() is None:
            self.floor.terminate()
            self.floor.wait(timeout=20)
        if self.operator is not None:
            self.operator.stop()
        self.sim.close()
        self.api.close()
        self.cp.stop()

    # --- setup --------------------------------------------------------------------------------

    def namespace_with_pool(self, name: str, replicas: int, refs: list[str]) -> list[str]:
        self.core.create_namespace({"metadata": {"name": name}})
        wait_for(
            lambda: self.core.read_namespaced_service_account("default", name),
            timeout=30,
            message=f"ServiceAccount in {name}",
            ignore=(kubernetes.client.ApiException,),
        )
        cluster.create_runner_pool(self.api, namespace=name, replicas=replicas, gpus=1)
        pods = cluster.wait_for_runner_pods(self.api, name, "default", replicas)
        for pod in pods:
            add_to_catalogue(self.emulators.of(name, pod), refs)
        return pods

    def create(self, namespace: str, prefix: str, index: int) -> None:
        body = cluster.dmrmodel(f"{prefix}-{index:04d}", spec_for(prefix, index))
        self.custom.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, PLURAL, body
        )

    def create_agent(self, namespace: str, index: int, dmrmodel: str) -> None:
        """A one-agent docker-agent team on ``dmrmodel`` (Pool mode, one replica: the defaults)."""
        body = {
            "apiVersion": constants.API_VERSION,
            "kind": constants.AGENT_KIND,
            "metadata": {"name": f"agent-{index:04d}"},
            "spec": {
                "config": {
                    "agents": {"root": {"model": "main", "instruction": "You help."}},
                    "models": {"main": {"dmrModel": dmrmodel}},
                }
            },
        }
        self.custom.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, AGENTS, body
        )

    def phases(self, namespace: str, plural: str = PLURAL) -> Counter[str]:
        found = self.custom.list_namespaced_custom_object(
            constants.GROUP, constants.VERSION, namespace, plural
        )
        return Counter((item.get("status") or {}).get("phase", "None") for item in found["items"])

    def wait_all_ready(
        self, namespace: str, count: int, timeout: float, plural: str = PLURAL
    ) -> float:
        try:
            wait_for(
                lambda: self.phases(namespace, plural).get("Ready", 0) == count,
                timeout=timeout,
                interval=0.5,
                message=f"{count} Ready {plural} in {namespace}",
            )
        except AssertionError as error:
            raise AssertionError(
                f"{error}; phases now: {dict(self.phases(namespace, plural))}"
            ) from None
        return time.time()

    def wait_configured(self, emulator: ModelRunnerEmulator, model: str, since: float) -> float:
        """Time the runner received a ``_configure`` for ``model`` (polled from its log)."""

        def received() -> float | None:
            for request in reversed(emulator.requests):
                if request.time < since:
                    return None
                if request.path == CONFIGURE and (request.body or {}).get("model") == model:
                    return request.time
            return None

        found = wait_for(received, timeout=30, interval=0.002, message=f"_configure of {model}")
        assert found is not None
        return found

    def start_operator(self, namespaces: list[str]) -> None:
        self.operator = OperatorProcess(
            kubeconfig=self.cp.kubeconfig_path,
            namespaces=namespaces,
            verify_interval=self.args.verify_interval,
        )
        self.operator.start()

    def start_floor(self, namespace: str, runner_url: str) -> None:
        log = Path(tempfile.mkstemp(prefix="floor-operator-", suffix=".log")[1])
        env = {**os.environ, "KUBECONFIG": str(self.cp.kubeconfig_path)}
        env["FLOOR_RUNNER_URL"] = runner_url
        argv = [sys.executable, "-m", "kopf", "run", str(FLOOR_OPERATOR), "--standalone"]
        argv += ["--namespace", namespace, "--quiet"]
        with log.open("ab") as out:
            self.floor = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    # --- 1. apply -> configured latency ---------------------------------------------------------

    def latency(self, operator_ns: str, floor_ns: str) -> None:
        count = self.args.latency_models
        operator_runner = self.emulators.in_namespace(operator_ns)
        floor_runner = self.emulators.in_namespace(floor_ns)
        (operator_emulator,) = operator_runner.values()
        (floor_emulator,) = floor_runner.values()
        # Warm both up (first watch events, first connections) outside the measurement.
        for namespace, emulator in ((operator_ns, operator_emulator), (floor_ns, floor_emulator)):
            started = time.time()
            self.create(namespace, "lat", count)
            self.wait_configured(emulator, model_ref("lat", count), started)
        results: dict[str, list[float]] = {"operator": [], "floor": []}
        for index in range(count):
            # Interleaved, so both sides see the same machine load over the run.
            for side, namespace, emulator in (
                ("operator", operator_ns, operator_emulator),
                ("floor", floor_ns, floor_emulator),
            ):
                started = time.time()
                self.create(namespace, "lat", index)
                received = self.wait_configured(emulator, model_ref("lat", index), started)
                results[side].append(received - started)
        op_p50, fl_p50 = percentile(results["operator"], 0.5), percentile(results["floor"], 0.5)
        ratio = op_p50 / fl_p50
        self.rows += [
            report.Row(
                "1. apply -> _configure p50 / p99 (operator)",
                f"{op_p50 * 1000:.0f} / {percentile(results['operator'], 0.99) * 1000:.0f} ms",
                "",
            ),
            report.Row(
                "1. apply -> _configure p50 / p99 (floor: bare kopf + POST)",
                f"{fl_p50 * 1000:.0f} / {percentile(results['floor'], 0.99) * 1000:.0f} ms",
                "",
            ),
            report.Row(
                f"1. operator p50 / floor p50 ({count} objects each)",
                f"{ratio:.2f}x",
                "<= 1.5x",
                ratio <= 1.5,
            ),
        ]

    # --- 2. scale ------------------------------------------------------------------------------

    def scale(self, namespace: str, pods: list[str]) -> None:
        assert self.operator is not None
        count = self.args.scale_models
        _, cpu_before = proc_stats(self.operator.pid)
        started = time.time()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: self.create(namespace, "scale", i), range(count)))
        created = time.time()
        ready = self.wait_all_ready(namespace, count, timeout=max(120, count * 0.5))
        settled = self.settle(ready)
        rss, cpu_after = proc_stats(self.operator.pid)
        requests = audit.count(audit.read(self.cp.audit_log_path), since=started, until=settled)
        per_pod = []
        for pod in pods:
            calls = Counter(
                r.body["model"]
                for r in configures_since(self.emulators.of(namespace, pod), started)
            )
            per_pod.append(calls)
        per_model = [calls.get(model_ref("scale", i), 0) for calls in per_pod for i in range(count)]
        configured = max(
            r.time
            for pod in pods
            for r in configures_since(self.emulators.of(namespace, pod), started)
        )
        self.rows += [
            report.Row(
                f"2. {count} DMRModels x {len(pods)} pods: all Ready after",
                f"{ready - started:.1f} s (creates took {created - started:.1f} s; last "
                f"_configure at {configured - started:.1f} s)",
                "",
            ),
            report.Row(
                "2. Kubernetes API requests per object (reads / writes)",
                f"{requests.reads / count:.2f} / {requests.writes / count:.2f}",
                "",
            ),
            report.Row(
                "2. _configure calls per (model, pod): min / max",
                f"{min(per_model)} / {max(per_model)}",
                "exactly 1",
                min(per_model) == max(per_model) == 1,
            ),
            report.Row("2. operator peak RSS (VmHWM)", f"{rss:.0f} MB", "< 200 MB", rss < 200),
            report.Row(
                "2. operator CPU during the scale phase", f"{cpu_after - cpu_before:.1f} s", ""
            ),
        ]
        self.details.append(
            "Scale phase, operator API requests by verb: "
            + ", ".join(f"{key}: {n}" for key, n in requests.by_verb.items())
        )

    def settle(self, since: float, quiet: float = 3.0, timeout: float = 60.0) -> float:
        """When the operator's last write is ``quiet`` seconds old (``audit.wait_quiet``)."""
        return audit.wait_quiet(self.cp.audit_log_path, since=since, quiet=quiet, timeout=timeout)

    # --- 3. recovery ---------------------------------------------------------------------------

    def recovery(self, namespace: str, pod: str) -> None:
        count = int(self.args.recovery_models)
        emulator = self.emulators.of(namespace, pod)
        for index in range(count):
            self.create(namespace, "rec", index)
        self.wait_all_ready(namespace, count, timeout=120)
        self.settle(time.time() - 5)
        requests_before = len(emulator.requests)
        crashed = time.time()
        self.sim.crash(namespace, pod)

        def all_reconfigured() -> bool:
            models = {str(r.body["model"]) for r in configures_since(emulator, crashed)}
            return len(models) >= count

        wait_for(all_reconfigured, timeout=120, interval=0.05, message="all re-configured")
        first: dict[str, float] = {}
        for request in configures_since(emulator, crashed):
            first.setdefault(request.body["model"], request.time - crashed)
        times = list(first.values())
        self.wait_all_ready(namespace, count, timeout=60)
        time.sleep(2)
        after = Counter(f"{r.method} {r.path}" for r in emulator.requests[requests_before:])
        p99 = percentile(times, 0.99)
        self.rows += [
            report.Row(
                f"3. runner crash with {count} models: re-configured p50 / p99",
                f"{percentile(times, 0.5):.2f} / {p99:.2f} s",
                "p99 < 5 s",
                p99 < 5,
            ),
            report.Row(
                "3. runner calls after the crash",
                ", ".join(f"{n} {key}" for key, n in after.most_common()),
                f"{count} _configure",
                after.get(f"POST {CONFIGURE}", 0) == count,
            ),
        ]

    # --- 4. idle -------------------------------------------------------------------------------

    def idle(self, namespaces: list[str], objects: int) -> None:
        minutes = self.args.idle_minutes
        runners = [
            emulator
            for namespace in namespaces
            for emulator in self.emulators.in_namespace(namespace).values()
        ]
        self.settle(time.time() - 5, quiet=5)
        before = [len(e.requests) for e in runners]
        started = time.time()
        time.sleep(minutes * 60)
        ended = time.time()
        requests = audit.count(audit.read(self.cp.audit_log_path), since=started, until=ended)
        new = [r for e, n in zip(runners, before, strict=True) for r in e.requests[n:]]
        configures = sum(1 for r in new if r.path.endswith("/_configure") and r.method == "POST")
        per_second = len(new) / (ended - started)
        bound = len(runners) / self.args.verify_interval
        self.details.append(
            "Idle phase, operator API requests by verb: "
            + (", ".join(f"{key}: {n}" for key, n in requests.by_verb.items()) or "none")
        )
        self.rows += [
            report.Row(
                f"4. idle {minutes:g} min at {objects} objects: Kubernetes writes / reads",
                f"{requests.writes} / {requests.reads}",
                "0 writes",
                requests.writes == 0,
            ),
            report.Row("4. idle: _configure calls", str(configures), "0", configures == 0),
            report.Row(
                f"4. idle: requests/s to {len(runners)} runners",
                f"{per_second:.3f} ({', '.join(sorted({f'{r.method} {r.path}' for r in new}))})",
                f"<= pods/verify-interval = {bound:.3f}",
                per_second <= bound * 1.1,
            ),
        ]

    # --- 2b. agents ----------------------------------------------------------------------------

    def agents(self, namespace: str) -> None:
        """Agents on DMRModels the scale phase left Ready, same operator process, right after."""
        assert self.operator is not None
        count = self.args.agents
        served = [f"scale-{i:04d}" for i in range(min(AGENT_MODELS, self.args.scale_models))]
        _, cpu_before = proc_stats(self.operator.pid)
        started = time.time()
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda i: self.create_agent(namespace, i, served[i % len(served)]),
                    range(count),
                )
            )
        created = time.time()
        ready = self.wait_all_ready(namespace, count, timeout=max(120, count * 2), plural=AGENTS)
        settled = self.settle(ready)
        rss, cpu_after = proc_stats(self.operator.pid)
        log = audit.read(self.cp.audit_log_path)
        requests = audit.count(log, since=started, until=settled)
        after_ready = audit.count(log, since=ready, until=settled)
        # Where the time went: the operator's last child write, then its last status write.
        deployed = audit.last(log, verb="patch", resource="deployments", since=started)
        reported = audit.last(log, verb="patch", resource="agents/status", since=started)
        self.rows += [
            report.Row(
                f"2b. {count} Agents on {len(served)} Ready DMRModels: all Ready after",
                f"{ready - started:.1f} s (creates took {created - started:.1f} s; last "
                f"Deployment applied at {(deployed or started) - started:.1f} s, last status "
                f"write at {(reported or started) - started:.1f} s)",
                "",
            ),
            report.Row(
                "2b. Kubernetes API requests per Agent (reads / writes)",
                f"{requests.reads / count:.2f} / {requests.writes / count:.2f}",
                "",
            ),
            report.Row(
                "2b. operator peak RSS (VmHWM) after the Agent phase",
                f"{rss:.0f} MB",
                "< 200 MB",
                rss < 200,
            ),
            report.Row(
                "2b. operator CPU during the Agent phase", f"{cpu_after - cpu_before:.1f} s", ""
            ),
        ]
        self.details.append(
            "Agent phase, operator API requests by verb: "
            + ", ".join(f"{key}: {n}" for key, n in requests.by_verb.items())
            + f" (of which after all Ready: {after_ready.writes} writes, "
            + f"{after_ready.reads} reads)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts, 1 idle minute")
    parser.add_argument("--latency-models", type=int, default=None)
    parser.add_argument("--scale-models", type=int, default=None)
    parser.add_argument("--agents", type=int, default=None, help="Agents after the scale phase")
    parser.add_argument("--recovery-models", type=int, default=100)
    parser.add_argument("--idle-minutes", type=float, default=None)
    parser.add_argument(
        "--verify-interval", type=float, default=30.0, help="operator --verify-interval"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    defaults = (20, 100, 1.0, 10) if args.quick else (200, 1000, 10.0, 100)
    if args.latency_models is None:
        args.latency_models = defaults[0]
    if args.scale_models is None:
        args.scale_models = defaults[1]
    if args.idle_minutes is None:
        args.idle_minutes = defaults[2]
    if args.agents is None:
        args.agents = defaults[3]
    return args


def run(args: argparse.Namespace) -> tuple[list[report.Row], str]:
    """The table's rows, and the cluster they were measured on (``report.cluster_facts``)."""
    bench = Bench(args)
    try:
        latency_refs = [model_ref("lat", i) for i in range(args.latency_models + 1)]
        bench.namespace_with_pool("bench-latency", 1, latency_refs)
        (floor_pod,) = bench.namespace_with_pool("bench-floor", 1, latency_refs)
        scale_pods = bench.namespace_with_pool(
            "bench-scale", 3, [model_ref("scale", i) for i in range(args.scale_models)]
        )
        (recovery_pod,) = bench.namespace_with_pool(
            "bench-recovery", 1, [model_ref("rec", i) for i in range(args.recovery_models)]
        )
        operator_namespaces = ["bench-latency", "bench-scale", "bench-recovery"]
        bench.start_operator(operator_namespaces)
        bench.start_floor("bench-floor", bench.emulators.of("bench-floor", floor_pod).url)
        step("1. apply -> configured latency", bench.latency, "bench-latency", "bench-floor")
        assert bench.floor is not None
        bench.floor.terminate()
        bench.floor.wait(timeout=20)
        step("2. scale", bench.scale, "bench-scale", scale_pods)
        step("2b. agents", bench.agents, "bench-scale")
        step("3. recovery", bench.recovery, "bench-recovery", recovery_pod)
        objects = args.latency_models + 1 + args.scale_models + args.agents + args.recovery_models
        step("4. idle", bench.idle, operator_namespaces, objects)
    finally:
        bench.close()
    rows = bench.rows + [report.Row(detail, "", "") for detail in bench.details]
    return rows, bench.cluster


def step(title: str, action: Callable[..., None], *args: Any) -> None:
    started = time.monotonic()
    print(f"==> {title}", flush=True)
    action(*args)
    print(f"    done in {time.monotonic() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, cluster_facts = run(args)
    table = report.render(rows, args=args, cluster=cluster_facts)
    print(table)
    if not args.no_write:
        report.write_into(BENCHMARKS_MD, table)
        print(f"written into {BENCHMARKS_MD}")
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
