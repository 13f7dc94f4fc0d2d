"""The DMRModel controller: keeps every runner's in-memory configuration equal to the DMRModels.

Model-runner keeps ``_configure`` state per process and forgets it on restart, so the unit of work
is a *runner*, not an object. ``DMRModelController`` holds the in-memory picture (DMRModels,
runner pods, Services, the models Sidecar-mode Agents need), decides which runners serve which
DMRModel, and keeps one ``runner_worker.RunnerWorker`` per runner process: it holds what it
applied to the runner's current incarnation (pod UID, IP, restart count). A new or changed
DMRModel, a new pod, a restart or a failed read-back wakes only the workers concerned; a worker
with nothing to do makes no calls except a slow periodic read-back (one GET per runner, whatever
the number of models). Results land in ``Placement``s; ``model_status.StatusWriter`` turns them
into DMRModel status through the pure ``reconcile.dmrmodel.model_status`` and writes only what
changed. Cleaning a deleted DMRModel off its runners (``finalize``) is the controller's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from dmr_operator import constants, metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.clients import modelrunner
from dmr_operator.controllers import model_placement, model_status, runner_worker
from dmr_operator.reconcile import dmrmodel, documents, model_routing, selectors
from dmr_operator.reconcile import runners as runner_views
from dmr_operator.reconcile.dmrmodel import ModelTarget, Placement

logger = logging.getLogger(__name__)

# While changes keep coming, reassignment takes at most this share of the event loop: after a
# pass that took t seconds the next waits t x (1/share - 1). A small namespace's pass takes
# microseconds (no wait: apply -> _configure latency is untouched); 200 placed models on 30
# pods, milliseconds, and a burst of events is then handled in a few passes, not one each.
REASSIGN_SHARE = 0.2


@dataclass(frozen=True)
class ControllerSettings:
    """Timings and limits; defaults suit production, tests shorten them."""

    verify_interval: float = 60.0
    """Seconds between read-backs of an idle runner (one GET per runner): the safety net."""
    allowed_runner_hosts: tuple[str, ...] = ()
    """Hosts an external ``runners.url`` may name (the SSRF boundary)."""
    parallel_per_runner: int = 8
    """Models configured concurrently on one runner."""
    pulls_per_runner: int = 2
    """Pulls in flight per runner: model-runner runs 2 at once and holds a third without
    response headers until a slot frees, so more would only wait there, unseen."""
    targeted_readback: int = 4
    """Up to this many models sent in one pass are read back one by one (``?model=``); more,
    and the whole listing is read once. The listing grows with the models on the runner."""
    busy_backoff: tuple[float, float] = (1.0, 30.0)
    """First and longest delay when a runner answers 409 busy."""
    unreachable_backoff: tuple[float, float] = (1.0, 30.0)
    unreachable_tolerance: int = 3
    """Attempts in a row a runner may fail to answer before its configured models say
    RunnerUnreachable (a readiness probe's failureThreshold): a blip is retried after 1 and 2 s
    without a status change. Models not configured there yet are told at the first failure."""
    failure_backoff: tuple[float, float] = (5.0, 300.0)
    """Pull failures and read-back mismatches: may be transient, never a hot loop."""
    delete_attempts: int = 3
    delete_timeout: float = 10.0
    status_interval: float = 0.2
    """Coalescing window of status writes."""


class DMRModelController:
    """In-memory picture of DMRModels and runners, and the workers that act on it."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        kube: kube_client.KubeClient,
        settings: ControllerSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.targets: dict[str, ModelTarget] = {}
        self.bodies: dict[str, Mapping[str, Any]] = {}
        self.pods: dict[str, runner_views.Runner] = {}
        self.services: dict[str, dict[str, Mapping[str, Any]]] = {}
        self.sidecar_models: dict[tuple[str, str], frozenset[str]] = {}
        self.placements: dict[tuple[str, str], Placement] = {}
        self.conflicts: dict[str, str] = {}
        self.workers: dict[str, runner_worker.RunnerWorker] = {}
        self.status = model_status.StatusWriter(self)
        self.placer = model_placement.PlacementKeeper(self)
        self._assignment: dict[str, list[runner_views.Runner]] = {}
        # Indexes that keep one event's work proportional to its namespace, not the cluster
        # (10,000 DMRModels over 50 namespaces: bench/placement_scale.py).
        self._keys_in: dict[str, set[str]] = {}  # namespace -> its DMRModel keys
        self._pods_in: dict[str, set[str]] = {}  # namespace -> its runner pod keys
        self._served_by: dict[str, set[str]] = {}  # runner key -> DMRModel keys assigned to it
        self._dirty_namespaces: set[str] = set()
        self._reassign_pending = False
        self._next_reassign = float("-inf")
        self._touched: set[str] = set()  # runners to look at again: pods changed, models gone
        self._orphan_cleanup: asyncio.Task[None] | None = None
        self._nodes: dict[str, asyncio.Future[Mapping[str, Any] | None]] = {}
        self.listeners: list[Callable[[str, str], None]] = []
        self._stopped = False

    # --- inputs from kopf handlers --------------------------------------------------------------

    def model_changed(self, body: Mapping[str, Any]) -> None:
        """A DMRModel was added or modified (any watch event, status-only ones included)."""
        metadata = body.get("metadata") or {}
        key = f"{metadata.get('namespace')}/{metadata.get('name')}"
        body = self.status.current(key, body)
        # Kept: what status patches and Events need; the spec lives on parsed in the target.
        self.bodies[key] = documents.lean(body, "status")
        if metadata.get("deletionTimestamp"):
            return
        previous = self.targets.get(key)
        if (
            previous is not None
            and previous.generation == int(metadata.get("generation") or 0)
            and previous.uid == metadata.get("uid")
        ):
            # Nothing the runners care about (our own status echo, labels, or somebody else
            # editing status): recompute status, which writes only if it differs.
            self.status.mark(key)
            return
        target = dmrmodel.target_from_object(
            body, allowed_runner_hosts=self.settings.allowed_runner_hosts
        )
        if previous is None or previous.uid != target.uid:
            self.placer.leaving.discard(key)  # a new object under the name of a deleted one
        self.targets[key] = target
        self._keys_in.setdefault(target.namespace, set()).add(key)
        self.namespace_changed(target.namespace)
        self.status.mark(key)

    def model_gone(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        self.targets.pop(key, None)
        self._keys_in.get(namespace, set()).discard(key)
        self._touched |= self._assign(key, [])
        self._assignment.pop(key, None)
        self.bodies.pop(key, None)
        self.status.forget(key)
        for placement_key in [k for k in self.placements if k[0] == key]:
            del self.placements[placement_key]
        self.namespace_changed(namespace)

    def pod_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        runner = runner_views.runner_from_pod(body)
        previous = self.pods.get(runner.key)
        if deleted:
            self.pods.pop(runner.key, None)
            self._pods_in.get(runner.namespace, set()).discard(runner.key)
        elif previous == runner:
            return
        else:
            self.pods[runner.key] = runner
            self._pods_in.setdefault(runner.namespace, set()).add(runner.key)
        self._touched.add(runner.key)
        if previous is not None and previous.labels != runner.labels:
            # Placement labels decide which pods serve a placed model: its status says so.
            changed = {
                label
                for label in previous.labels.keys() | runner.labels.keys()
                if previous.labels.get(label) != runner.labels.get(label)
            }
            for target in self.targets_in(runner.namespace):
                if model_placement.is_placed(target) and (
                    model_routing.placement_label(target.name) in changed
                ):
                    self.status.mark(target.key)
        if (previous.unschedulable if previous else None) != (
            None if deleted else runner.unschedulable
        ):
            # A pool pod the scheduler cannot place is never a runner, but its models say why.
            for target in self.targets_in(runner.namespace):
                if self.in_pool(target, runner):
                    self.status.mark(target.key)
        self.namespace_changed(runner.namespace)

    def service_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        metadata = body.get("metadata") or {}
        namespace = str(metadata.get("namespace"))
        by_name = self.services.setdefault(namespace, {})
        name = str(metadata.get("name"))
        if not deleted and not runner_views.may_front_a_pool(body):
            # A placed model's own Service (10,000 of them at 10,000 placed DMRModels): never a
            # pool's endpoint, not kept.
            if name not in by_name:
                return
            deleted = True
        previous = by_name.pop(name, None) if deleted else by_name.get(name)
        if not deleted:
            by_name[name] = documents.lean(body, "spec")
        if not deleted and runner_views.endpoint_facts(previous) == runner_views.endpoint_facts(
            body
        ):
            return
        # Only DMRModels whose pool this Service fronts (or fronted) can see their endpoint
        # change: an Agent's own Service must not recompute a thousand statuses.
        for target in self.targets_in(namespace):
            if any(
                runner_views.fronts_pool(service, target.pool_labels)
                for service in (previous, None if deleted else body)
            ):
                self.status.mark(target.key)

    def set_sidecar_models(self, namespace: str, pool: str, model_names: Iterable[str]) -> None:
        """The DMRModels an Agent in Sidecar mode needs on its own pods (pool label ``pool``)."""
        names = frozenset(model_names)
        key = (namespace, pool)
        if self.sidecar_models.get(key, frozenset()) == names:
            return
        if names:
            self.sidecar_models[key] = names
        else:
            self.sidecar_models.pop(key, None)
        self.namespace_changed(namespace)

    # --- derived state --------------------------------------------------------------------------

    async def node(self, name: str) -> Mapping[str, Any] | None:
        """The Node ``name``, read once for every runner on it and for placement (1,500 runner
        pods on 30 nodes: 30 reads, not 1,530); None when the apiserver refuses it (no right
        to read Nodes, a Node gone), which is kept. Any other failure raises ``KubeError``
        and is asked again at the next call: a Node taken as unknown for good would be
        budgeted by runner slots alone, its GPU memory unbounded."""
        future = self._nodes.get(name)
        if future is not None:
            return await asyncio.shield(future)
        future = asyncio.get_running_loop().create_future()
        self._nodes[name] = future
        node: Mapping[str, Any] | None
        try:
            found = await self.kube.get(api_version="v1", kind="Node", namespace="", name=name)
            node = found if isinstance(found, Mapping) else None
        except kube_client.KubeError as error:
            logger.info("node %s unreadable: %s", name, error)
            if not kube_client.refused_for_good(error):
                del self._nodes[name]
                future.set_exception(error)
                future.exception()  # retrieved: waiters get it; nobody else must
                raise
            node = None
        future.set_result(node)
        return node

    def targets_in(self, namespace: str) -> list[ModelTarget]:
        """The namespace's DMRModels, by key."""
        return [self.targets[key] for key in sorted(self._keys_in.get(namespace, ()))]

    def pods_in(self, namespace: str) -> list[runner_views.Runner]:
        """The namespace's runner pods, by key."""
        return [self.pods[key] for key in sorted(self._pods_in.get(namespace, ()))]

    def namespace_changed(self, namespace: str) -> None:
        """Something the namespace's assignment depends on changed. Inside the event loop the
        recompute runs at the next loop pass, for everything that changed meanwhile, and never
        takes more than ``REASSIGN_SHARE`` of the loop (each pass places every model of the
        namespaces concerned); outside a loop (tests), at once."""
        self._dirty_namespaces.add(namespace)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._reassign()
            return
        if not self._reassign_pending:
            self._reassign_pending = True
            delay = self._next_reassign - loop.time()
            if delay > 0:
                loop.call_later(delay, self._reassign)
            else:
                loop.call_soon(self._reassign)

    def _reassign(self) -> None:
        """Recompute which runners serve which DMRModel, then start/wake/stop workers."""
        self._reassign_pending = False
        started = time.monotonic()
        try:
            self._reassign_namespaces()
        finally:
            cost = time.monotonic() - started
            with contextlib.suppress(RuntimeError):
                loop_time = asyncio.get_running_loop().time()
                self._next_reassign = loop_time + cost * (1 / REASSIGN_SHARE - 1)

    def _reassign_namespaces(self) -> None:
        namespaces, self._dirty_namespaces = self._dirty_namespaces, set()
        if not namespaces:
            return
        for namespace in sorted(namespaces):
            self.placer.replan(namespace)
        # Only same-identity targets can conflict: grouping first keeps this linear in the number
        # of DMRModels (find_conflicts compares pairs), which matters at a thousand objects.
        claims: dict[
            tuple[str, tuple[str, str, str]], dict[str, tuple[ModelTarget, frozenset[str]]]
        ] = {}
        touched, self._touched = self._touched, set()  # runners whose workers must look again
        for namespace in sorted(namespaces):
            for target in self.targets_in(namespace):
                selected = self._select_runners(target)
                touched |= {r.key for r in selected} | self._assign(target.key, selected)
                group = claims.setdefault((target.namespace, target.identity), {})
                group[target.key] = (target, frozenset(r.key for r in selected))
        for group in claims.values():
            conflicts = dmrmodel.find_conflicts(group) if len(group) > 1 else {}
            for key in group:
                if self.conflicts.get(key) != conflicts.get(key):
                    self.status.mark(key)
                self.conflicts.pop(key, None)
            self.conflicts.update(conflicts)
        touched |= {key for namespace in namespaces for key in self._pods_in.get(namespace, ())}
        self._sync_workers(touched)

    def _assign(self, key: str, selected: list[runner_views.Runner]) -> set[str]:
        """Record ``selected`` as the runners of DMRModel ``key``; returns the runners it left."""
        previous = self._assignment.get(key)
        self._assignment[key] = selected
        if previous == selected:
            return set()
        old = {r.key for r in previous or ()}
        new = {r.key for r in selected}
        for stale in old - new:
            self.placements.pop((key, stale), None)
            served = self._served_by.get(stale)
            if served is not None:
                served.discard(key)
                if not served:
                    del self._served_by[stale]
        for runner_key in new - old:
            self._served_by.setdefault(runner_key, set()).add(key)
        # Status depends on the runners selected; unchanged ones need no recompute.
        self.status.mark(key)
        return old - new

    def _select_runners(self, target: ModelTarget) -> list[runner_views.Runner]:
        if not target.valid:
            return []
        if target.url:
            return [runner_views.external_runner(target.url, target.namespace)]
        if model_placement.is_placed(target):
            return self.placer.runners_for(target)
        return [
            runner
            for runner in self.pods_in(target.namespace)
            if runner.ready and self.in_pool(target, runner)
        ]

    def in_pool(self, target: ModelTarget, runner: runner_views.Runner) -> bool:
        """Whether the runner pod belongs to the target's runners (pool selector or the
        Sidecar Agents that need the model), whatever its readiness."""
        if target.url:
            return False
        pool = runner.labels.get(constants.POOL_LABEL, "")
        wanted_by_sidecar = target.name in self.sidecar_models.get(
            (runner.namespace, pool), frozenset()
        )
        return wanted_by_sidecar or selectors.matches(target.pool_selector, runner.labels)

    def unschedulable_for(self, target: ModelTarget) -> list[str]:
        """ "pod P cannot be scheduled: <the scheduler's words>" for the target's pods that wait."""
        return [
            f"pod {runner.name} cannot be scheduled: {runner.unschedulable}"
            for runner in self.pods_in(target.namespace)
            if runner.unschedulable and self.in_pool(target, runner)
        ]

    def runners_for(self, target_key: str) -> list[runner_views.Runner]:
        return self._assignment.get(target_key, [])

    def targets_for(self, runner_key: str) -> list[ModelTarget]:
        """Valid, non-conflicting DMRModels that must be configured on ``runner_key``."""
        return [
            self.targets[key]
            for key in sorted(self._served_by.get(runner_key, ()))
            if key in self.targets and key not in self.conflicts
        ]

    def _sync_workers(self, touched: Iterable[str]) -> None:
        """Start, update and wake the workers of the ``touched`` runners; stop those that
        serve nothing any more."""
        for key in sorted(touched):
            runner = self._assigned_runner(key)
            pod = self.pods.get(key)
            if runner is None and pod is not None:
                if runner_worker.READINESS_GATE in pod.readiness_gates:
                    runner = pod  # a gated runner must be told "nothing to configure" too
                elif pod.ready and self.placer.holds_left_copies(key):
                    runner = pod  # its read-backs tell when the copies left there are gone
            worker = self.workers.get(key)
            if runner is None:
                if worker is not None:
                    self.workers.pop(key).stop()
                continue
            if worker is None:
                if self._stopped:
                    continue
                worker = runner_worker.RunnerWorker(self, runner)
                self.workers[key] = worker
                worker.start()
            else:
                worker.update(runner)
            worker.wake()

    def _assigned_runner(self, runner_key: str) -> runner_views.Runner | None:
        for target_key in self._served_by.get(runner_key, ()):
            for runner in self._assignment.get(target_key, ()):
                if runner.key == runner_key:
                    return runner
        return None

    def placement(self, target: ModelTarget, runner: runner_views.Runner) -> Placement:
        key = (target.key, runner.key)
        placement = self.placements.get(key)
        if placement is None:
            placement = Placement(runner=runner)
            self.placements[key] = placement
        placement.runner = runner
        return placement

    def endpoint_for(self, target: ModelTarget) -> str | None:
        if model_placement.is_placed(target):
            return self.placer.view(target).endpoint
        if target.url:
            return f"{target.url.rstrip('/')}/v1"
        services = self.services.get(target.namespace, {}).values()
        return runner_views.pool_service_endpoint(services, target.pool_selector)

    def notify(self, target_key: str, event: str) -> None:
        for listener in self.listeners:
            listener(target_key, event)

    # --- deletion -------------------------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any]) -> list[str]:
        """Clean a deleted DMRModel off its runners per ``deletionPolicy``; never blocks forever.

        Returns the problems met (already reported as Events); the caller releases the finalizer.
        """
        metadata = body.get("metadata") or {}
        namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
        key = f"{namespace}/{name}"
        target = self.targets.get(key) or dmrmodel.target_from_object(
            body, allowed_runner_hosts=self.settings.allowed_runner_hosts
        )
        runners = list(self.runners_for(key))
        if model_placement.is_placed(target):
            # A pod the model is moving away from (or that serves it while a changed spec's
            # needs are read) is not among its runners, yet holds it: cleaned off too.
            assigned = {runner.key for runner in runners}
            runners += [
                runner
                for runner in self.pods_in(namespace)
                if runner.key not in assigned and self.placer.labelled(target, runner)
            ]
        applied = {
            runner.key: state.applied[key]
            for runner in runners
            if (worker := self.workers.get(runner.key)) is not None
            and (state := worker.state).applied.get(key) is not None
        }
        if model_placement.is_placed(target):
            await self.placer.forget_labels(target)
        self.model_gone(namespace, name)
        left: dict[str, str] = {}
        try:
            problems, kept = await self._clean_off_runners(body, target, runners, applied)
            left = {pod: applied[pod].digest for pod in kept if pod in applied}
            return problems
        finally:
            self.placer.unloaded(target, left)

    async def _clean_off_runners(
        self,
        body: Mapping[str, Any],
        target: ModelTarget,
        runners: list[runner_views.Runner],
        applied: Mapping[str, runner_worker.Applied],
    ) -> tuple[list[str], set[str]]:
        """Unload (or delete) the model on each runner; the problems met, and the runners
        whose copy stays (Retain, or the unload failed)."""
        spec = target.spec
        if spec is None or target.normalized is None:
            return [], set()
        if spec.deletion_policy == "Retain":
            return [], {runner.key for runner in runners}
        problems: list[str] = []
        kept: set[str] = set()

        async def clean(runner: runner_views.Runner) -> None:
            others = self._others_with_model(target, runner)
            was = applied.get(runner.key)
            backend = (was.backend if was else None) or spec.backend or "llama.cpp"
            if any((t.spec and t.spec.backend) in (None, backend) for t in others):
                return  # another DMRModel still serves this model here: leave it loaded
            if runner.base_url is None:
                return
            client = modelrunner.ModelRunnerClient(self.http, runner.base_url)
            if (worker := self.workers.get(runner.key)) is not None:
                worker.state.view_stale = True  # unload drops configs; delete drops the model
            for attempt in range(self.settings.delete_attempts):
                try:
                    async with asyncio.timeout(self.settings.delete_timeout):
                        await client.unload(backend=backend, models=[target.normalized or ""])
                        if spec.deletion_policy == "Delete" and not others:
                            with contextlib.suppress(modelrunner.NotFound):
                                await client.delete_model(target.normalized or "")
                    return
                except (modelrunner.RunnerError, TimeoutError) as error:
                    if attempt + 1 < self.settings.delete_attempts:
                        await asyncio.sleep(min(2.0**attempt, 5.0))
                        continue
                    problem = f"could not unload {target.normalized} from {runner.name}: {error}"
                    problems.append(problem)
                    kept.add(runner.key)

        await asyncio.gather(*(clean(runner) for runner in runners))
        for problem in problems:
            await self.status.event(body, "Warning", "CleanupFailed", problem + "; released anyway")
        return problems, kept

    def configured_as(self, target: ModelTarget, runner_key: str) -> bool:
        """Whether the runner's worker has applied the target's current spec there."""
        worker = self.workers.get(runner_key)
        applied = worker.state.applied.get(target.key) if worker is not None else None
        return applied is not None and applied.fingerprint == target.fingerprint

    def _others_with_model(
        self, target: ModelTarget, runner: runner_views.Runner
    ) -> list[ModelTarget]:
        """Other DMRModels of the same model on ``runner``: unloading it would take it from them."""
        return [
            other
            for other in self.targets_for(runner.key)
            if other.key != target.key and other.normalized == target.normalized
        ]

    async def release(self, target: ModelTarget, runner: runner_views.Runner) -> str | None:
        """Unload a placed model from a pod it moved away from (already out of its Service);
        the weights stay in the pod's store, a cache for the next placement there. Returns the
        model's digest when its copy may still be there (the unload failed), else None."""
        worker = self.workers.get(runner.key)
        applied = worker.state.applied.pop(target.key, None) if worker else None
        others = self._others_with_model(target, runner)
        if worker is not None:
            worker.state.view_stale = True
        self.namespace_changed(runner.namespace)
        if others or runner.base_url is None or target.normalized is None:
            return None
        backend = (applied.backend if applied else None) or (
            target.spec.backend if target.spec else None
        )
        client = modelrunner.ModelRunnerClient(self.http, runner.base_url)
        try:
            await client.unload(backend=backend or "llama.cpp", models=[target.normalized])
        except modelrunner.RunnerError as error:
            logger.info("unloading %s from %s: %s", target.normalized, runner.key, error)
            return applied.digest if applied is not None else None
        return None

    async def seed(self, namespaces: Iterable[str]) -> None:
        """Load runner pods and Services once before kopf's watches deliver them.

        Watches start in no particular order: without this, a restarted operator could compute a
        DMRModel's status before it knows the pool's pods (``NoRunners``) or Service (no endpoint)
        and write a wrong status for a moment.
        """
        scopes = [f"namespaces/{ns}/" for ns in namespaces] or [""]
        for scope in scopes:
            pods = await self.kube.request(
                "GET", f"/api/v1/{scope}pods", params={"labelSelector": constants.POOL_LABEL}
            )
            for pod in (pods or {}).get("items") or ():
                self.pod_changed(pod)
            services = await self.kube.request("GET", f"/api/v1/{scope}services")
            for service in (services or {}).get("items") or ():
                self.service_changed(service)
        self._orphan_cleanup = asyncio.get_running_loop().create_task(
            self._remove_orphan_labels(scopes)
        )

    async def _remove_orphan_labels(self, scopes: list[str], attempts: int = 6) -> None:
        """Placement labels of DMRModels deleted while no operator ran come off their pods
        (in the background: a CRD just installed answers 429 for a moment, and startup must
        not wait for that)."""
        models: list[Mapping[str, Any]] = []
        for attempt in range(attempts):
            try:
                for scope in scopes:
                    found = await self.kube.request(
                        "GET", f"/apis/{constants.API_VERSION}/{scope}{constants.DMRMODEL_PLURAL}"
                    )
                    models += (found or {}).get("items") or ()
                break
            except kube_client.KubeError as error:
                models = []
                if attempt + 1 == attempts:
                    logger.warning("placement labels of deleted DMRModels left: %s", error)
                    return
                await asyncio.sleep(min(2.0**attempt, 10.0))
        names: dict[str, list[str]] = {}
        for model in models:
            metadata = model.get("metadata") or {}
            names.setdefault(str(metadata.get("namespace")), []).append(str(metadata.get("name")))
        for target in self.targets.values():  # known from the watch since: alive too
            names.setdefault(target.namespace, []).append(target.name)
        for runner in list(self.pods.values()):
            orphans = model_routing.orphan_placement_labels(
                runner.labels, names.get(runner.namespace, ())
            )
            if not orphans:
                continue
            logger.info("pod %s: removing labels of deleted DMRModels %s", runner.key, orphans)
            with contextlib.suppress(kube_client.KubeError):
                await self.relabel(runner, dict.fromkeys(orphans))

    async def relabel(self, runner: runner_views.Runner, labels: Mapping[str, str | None]) -> None:
        """Set (None: remove) labels on a runner pod, and take the patched pod in at once, not
        when the watch brings it back: the status written next says who serves, and the echo
        then changes nothing (one status write, not two). A pod already gone is no error: so
        is its place in any Service."""
        try:
            pod = await self.kube.label_pod(
                namespace=runner.namespace, name=runner.name, labels=labels
            )
        except kube_client.NotFound:
            return
        logger.info("pod %s: labels %s", runner.key, dict(labels))
        if isinstance(pod, Mapping) and pod.get("metadata"):
            self.pod_changed(pod)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        metrics.MODELS.source = self.phase_counts
        metrics.PLACEMENT.pods = self.placer.rooms
        metrics.PLACEMENT.short = self.placer.short_models
        self.status.start()

    def phase_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for body in list(self.bodies.values()):
            phase = str((body.get("status") or {}).get("phase") or "Pending")
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    async def stop(self) -> None:
        self._stopped = True
        if self._orphan_cleanup is not None:
            self._orphan_cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._orphan_cleanup
        await self.placer.stop()
        for worker in self.workers.values():
            worker.stop()
        await asyncio.gather(*(w.join() for w in self.workers.values()), return_exceptions=True)
        self.workers.clear()
        await self.status.stop()
