"""The DMRModel controller: keeps every runner's in-memory configuration equal to the DMRModels.

Model-runner keeps ``_configure`` state per process and forgets it on restart, so the unit of work
is a *runner*, not an object. One ``RunnerWorker`` per runner process holds what it applied to the
runner's current incarnation (pod UID, IP, restart count). A new or changed DMRModel, a new pod, a
restart or a failed read-back wakes only the workers concerned; a worker with nothing to do makes
no calls except a slow periodic read-back (one GET per runner, whatever the number of models).
Results land in ``Placement``s; ``StatusWriter`` turns them into DMRModel status through the pure
``reconcile.dmrmodel.model_status`` and writes only what changed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from dmr_operator import constants, metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.clients import modelrunner
from dmr_operator.dmr import references, wire
from dmr_operator.reconcile import backends, capacity, dmrmodel, documents, selectors
from dmr_operator.reconcile import runners as runner_views
from dmr_operator.reconcile.dmrmodel import ModelTarget, Placement, Reason

logger = logging.getLogger(__name__)

READINESS_GATE = f"{constants.GROUP}/models-configured"


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
    failure_backoff: tuple[float, float] = (5.0, 300.0)
    """Pull failures and read-back mismatches: may be transient, never a hot loop."""
    delete_attempts: int = 3
    delete_timeout: float = 10.0
    status_interval: float = 0.2
    """Coalescing window of status writes."""


@dataclass
class Applied:
    """What a worker applied and verified on the current incarnation of its runner."""

    fingerprint: str
    backend: str
    digest: str
    request: dict[str, Any]
    rejected: bool = False
    warmed: bool = False
    """spec.warmup: loaded and listed by /engines/ps after this configuration."""


@dataclass
class Backoff:
    attempts: int = 0
    retry_at: float = 0.0

    def failed(self, bounds: tuple[float, float], now: float) -> float:
        first, longest = bounds
        delay = min(longest, first * (1 << min(self.attempts, 20)))
        self.attempts += 1
        self.retry_at = now + delay
        return delay


@dataclass
class _RunnerState:
    runner: runner_views.Runner
    applied: dict[str, Applied] = field(default_factory=dict)
    store: dict[str, wire.StoreModel] | None = None
    backoff: dict[str, Backoff] = field(default_factory=dict)
    runner_backoff: Backoff = field(default_factory=Backoff)
    known_incarnation: tuple[str, ...] | None = None
    entries: list[wire.ModelConfigEntry] | None = None
    """The runner's configs as this process last read them (after its own sends, and at every
    verification). Only this operator configures runners (one leader), so a new model needs no
    fresh read before its ``_configure``; None = read first."""
    view_stale: bool = False
    """Set when this process changed the runner other than by ``_configure`` (unload, delete):
    the next pass forgets ``entries`` and ``store`` and reads them again."""
    next_verify: float = 0.0
    ever_configured: set[str] = field(default_factory=set)
    restarted: bool = False
    """The operator saw this runner restart (so recorded times from before are stale)."""
    pull_slots: asyncio.Semaphore | None = None
    """The runner's pull slots as this process uses them (created on the worker's loop)."""
    backend_status: dict[str, str] | None = None
    """``GET /engines/status`` of the current incarnation (the image decides; asked once)."""
    capacity: capacity.RunnerCapacity | None = None
    capacity_read: bool = False
    """The runner's node was read for this incarnation (``capacity`` None: not knowable)."""


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
        self.workers: dict[str, RunnerWorker] = {}
        self.status = StatusWriter(self)
        self._assignment: dict[str, list[runner_views.Runner]] = {}
        self._dirty_namespaces: set[str] = set()
        self.listeners: list[Callable[[str, str], None]] = []
        self._stopped = False

    # --- inputs from kopf handlers --------------------------------------------------------------

    def model_changed(self, body: Mapping[str, Any]) -> None:
        """A DMRModel was added or modified (any watch event, status-only ones included)."""
        metadata = body.get("metadata") or {}
        key = f"{metadata.get('namespace')}/{metadata.get('name')}"
        body = self.status.current(key, documents.without_managed_fields(body))
        self.bodies[key] = body
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
        self.targets[key] = target
        self._namespace_changed(target.namespace)
        self.status.mark(key)

    def model_gone(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        self.targets.pop(key, None)
        self.bodies.pop(key, None)
        self.status.forget(key)
        for placement_key in [k for k in self.placements if k[0] == key]:
            del self.placements[placement_key]
        self._namespace_changed(namespace)

    def pod_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        runner = runner_views.runner_from_pod(body)
        previous = self.pods.get(runner.key)
        if deleted:
            self.pods.pop(runner.key, None)
        elif previous == runner:
            return
        else:
            self.pods[runner.key] = runner
        self._namespace_changed(runner.namespace)

    def service_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        metadata = body.get("metadata") or {}
        namespace = str(metadata.get("namespace"))
        by_name = self.services.setdefault(namespace, {})
        name = str(metadata.get("name"))
        previous = by_name.pop(name, None) if deleted else by_name.get(name)
        if not deleted:
            by_name[name] = body
        if not deleted and runner_views.endpoint_facts(previous) == runner_views.endpoint_facts(
            body
        ):
            return
        # Only DMRModels whose pool this Service fronts (or fronted) can see their endpoint
        # change: an Agent's own Service must not recompute a thousand statuses.
        for key, target in self.targets.items():
            if target.namespace == namespace and any(
                runner_views.fronts_pool(service, target.pool_labels)
                for service in (previous, None if deleted else body)
            ):
                self.status.mark(key)

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
        self._namespace_changed(namespace)

    # --- derived state --------------------------------------------------------------------------

    def _namespace_changed(self, namespace: str) -> None:
        self._dirty_namespaces.add(namespace)
        self._reassign()

    def _reassign(self) -> None:
        """Recompute which runners serve which DMRModel, then start/wake/stop workers."""
        namespaces, self._dirty_namespaces = self._dirty_namespaces, set()
        if not namespaces:
            return
        # Only same-identity targets can conflict: grouping first keeps this linear in the number
        # of DMRModels (find_conflicts compares pairs), which matters at a thousand objects.
        claims: dict[
            tuple[str, tuple[str, str, str]], dict[str, tuple[ModelTarget, frozenset[str]]]
        ] = {}
        for key, target in self.targets.items():
            if target.namespace not in namespaces:
                continue
            selected = self._select_runners(target)
            previous = self._assignment.get(key)
            self._assignment[key] = selected
            group = claims.setdefault((target.namespace, target.identity), {})
            group[key] = (target, frozenset(r.key for r in selected))
            if previous != selected:
                old = {r.key for r in previous or ()}
                for stale in old - {r.key for r in selected}:
                    self.placements.pop((key, stale), None)
                # Status depends on the runners selected; unchanged ones need no recompute.
                self.status.mark(key)
        for key in [k for k in self._assignment if k not in self.targets]:
            del self._assignment[key]
        for group in claims.values():
            conflicts = dmrmodel.find_conflicts(group) if len(group) > 1 else {}
            for key in group:
                if self.conflicts.get(key) != conflicts.get(key):
                    self.status.mark(key)
                self.conflicts.pop(key, None)
            self.conflicts.update(conflicts)
        self._sync_workers()

    def _select_runners(self, target: ModelTarget) -> list[runner_views.Runner]:
        if not target.valid:
            return []
        if target.url:
            return [runner_views.external_runner(target.url, target.namespace)]
        selector = target.pool_selector
        chosen = []
        for runner in self.pods.values():
            if runner.namespace != target.namespace or not runner.ready:
                continue
            pool = runner.labels.get(constants.POOL_LABEL, "")
            wanted_by_sidecar = target.name in self.sidecar_models.get(
                (runner.namespace, pool), frozenset()
            )
            if wanted_by_sidecar or selectors.matches(selector, runner.labels):
                chosen.append(runner)
        return sorted(chosen, key=lambda r: r.key)

    def runners_for(self, target_key: str) -> list[runner_views.Runner]:
        return self._assignment.get(target_key, [])

    def targets_for(self, runner_key: str) -> list[ModelTarget]:
        """Valid, non-conflicting DMRModels that must be configured on ``runner_key``."""
        return [
            self.targets[key]
            for key, selected in self._assignment.items()
            if key in self.targets
            and key not in self.conflicts
            and any(r.key == runner_key for r in selected)
        ]

    def _sync_workers(self) -> None:
        wanted: dict[str, runner_views.Runner] = {}
        for selected in self._assignment.values():
            for runner in selected:
                wanted[runner.key] = runner
        # Runners with a readiness gate must be told "nothing to configure" too.
        for runner in self.pods.values():
            if READINESS_GATE in runner.readiness_gates:
                wanted.setdefault(runner.key, runner)
        for key in list(self.workers):
            if key not in wanted:
                self.workers.pop(key).stop()
        for key, runner in wanted.items():
            worker = self.workers.get(key)
            if worker is None:
                if self._stopped:
                    continue
                worker = RunnerWorker(self, runner)
                self.workers[key] = worker
                worker.start()
            else:
                worker.update(runner)
            worker.wake()

    def placement(self, target: ModelTarget, runner: runner_views.Runner) -> Placement:
        key = (target.key, runner.key)
        placement = self.placements.get(key)
        if placement is None:
            placement = Placement(runner=runner)
            self.placements[key] = placement
        placement.runner = runner
        return placement

    def endpoint_for(self, target: ModelTarget) -> str | None:
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
        applied_backends = {
            runner.key: state.applied[key].backend
            for runner in runners
            if (worker := self.workers.get(runner.key)) is not None
            and (state := worker.state).applied.get(key) is not None
        }
        self.model_gone(namespace, name)
        spec = target.spec
        if spec is None or target.normalized is None or spec.deletion_policy == "Retain":
            return []
        problems: list[str] = []

        async def clean(runner: runner_views.Runner) -> None:
            others = [t for t in self.targets_for(runner.key) if t.normalized == target.normalized]
            backend = applied_backends.get(runner.key) or spec.backend or "llama.cpp"
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

        await asyncio.gather(*(clean(runner) for runner in runners))
        for problem in problems:
            await self.status.event(body, "Warning", "CleanupFailed", problem + "; released anyway")
        return problems

    async def seed(self, namespaces: Iterable[str]) -> None:
        """Load runner pods and Services once before kopf's watches deliver them.

        Watches start in no particular order: without this, a restarted operator could compute a
        DMRModel's status before it knows the pool's pods (``NoRunners``) or Service (no endpoint)
        and write a wrong status for a moment.
        """
        scopes = [f"/api/v1/namespaces/{ns}" for ns in namespaces] or ["/api/v1"]
        for scope in scopes:
            pods = await self.kube.request(
                "GET", f"{scope}/pods", params={"labelSelector": constants.POOL_LABEL}
            )
            for pod in (pods or {}).get("items") or ():
                self.pod_changed(pod)
            services = await self.kube.request("GET", f"{scope}/services")
            for service in (services or {}).get("items") or ():
                self.service_changed(service)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        metrics.MODELS.source = self.phase_counts
        self.status.start()

    def phase_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for body in list(self.bodies.values()):
            phase = str((body.get("status") or {}).get("phase") or "Pending")
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    async def stop(self) -> None:
        self._stopped = True
        for worker in self.workers.values():
            worker.stop()
        await asyncio.gather(*(w.join() for w in self.workers.values()), return_exceptions=True)
        self.workers.clear()
        await self.status.stop()


class RunnerWorker:
    """Keeps one runner's configuration equal to its desired DMRModels."""

    def __init__(self, controller: DMRModelController, runner: runner_views.Runner) -> None:
        self.controller = controller
        self.state = _RunnerState(runner=runner)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def runner(self) -> runner_views.Runner:
        return self.state.runner

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"runner-worker:{self.runner.key}"
        )

    def update(self, runner: runner_views.Runner) -> None:
        self.state.runner = runner

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def join(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self._stopping:
            timeout = max(0.0, self._next_deadline() - self.controller.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            try:
                with metrics.RECONCILE_SECONDS.time():
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker; it is logged and retried
                logger.exception("runner worker %s failed", self.runner.key)
                self.state.runner_backoff.failed(
                    self.controller.settings.unreachable_backoff, self.controller.clock()
                )

    def _next_deadline(self) -> float:
        state = self.state
        deadlines = [state.next_verify, state.runner_backoff.retry_at or float("inf")]
        deadlines += [b.retry_at for b in state.backoff.values() if b.retry_at]
        return float(min(deadlines))

    # --- one pass ----------------------------------------------------------------------------

    async def sync(self) -> None:
        controller = self.controller
        settings = controller.settings
        state = self.state
        runner = state.runner
        now = controller.clock()
        targets = controller.targets_for(runner.key)
        if runner.base_url is None or not runner.ready:
            return
        if state.known_incarnation != runner.incarnation:
            # A new process: whatever was applied before is gone from its memory.
            restarted = state.known_incarnation is not None
            state.applied.clear()
            state.store = None
            state.entries = None
            state.backend_status = None
            state.capacity, state.capacity_read = None, False
            state.backoff.clear()
            state.known_incarnation = runner.incarnation
            state.next_verify = 0.0
            if restarted:
                logger.info("runner %s restarted: configuration will be re-applied", runner.key)
                state.restarted = True
                for target in targets:
                    placement = controller.placement(target, runner)
                    placement.state, placement.reason = "Configuring", Reason.CONFIGURING
                    placement.configured_at = None
                    controller.status.mark(target.key)
        if state.view_stale:
            state.view_stale, state.entries, state.store = False, None, None
        if state.runner_backoff.retry_at > now:
            # Backing off an unreachable runner: a model newly assigned to it learns why now.
            for target in targets:
                if not controller.placement(target, runner).visited:
                    self._fail(target, Reason.RUNNER_UNREACHABLE, "runner unreachable; retrying")
            self._mark_visited(targets)
            return
        wanted = {t.key for t in targets}
        for key in [k for k in state.applied if k not in wanted]:
            del state.applied[key]
        work = [t for t in targets if self._needs_work(t, now)]
        verify = now >= state.next_verify
        if not work and not verify:
            await self._update_capacity(targets)
            self._mark_visited(targets)
            await self._update_readiness_gate(targets)
            return
        if runner.external and (problem := await _resolved_address_problem(runner.base_url)):
            for target in targets:
                self._fail(target, Reason.INVALID_SPEC, problem)
            state.runner_backoff.failed(settings.failure_backoff, controller.clock())
            return
        client = modelrunner.ModelRunnerClient(controller.http, runner.base_url)
        try:
            cached = state.entries
            entries = cached if cached is not None and not verify else await client.read_configs()
            if verify:
                self._verify(targets, entries)
                work = [t for t in targets if self._needs_work(t, now)]
            if work:
                if state.store is None:
                    state.store = _index_store(await client.list_models())
                semaphore = asyncio.Semaphore(settings.parallel_per_runner)

                async def apply(target: ModelTarget) -> bool:
                    async with semaphore:
                        return await self._apply(client, target, entries)

                sent = await asyncio.gather(*(apply(t) for t in work))
                sent_targets = [t for t, was_sent in zip(work, sent, strict=True) if was_sent]
                if sent_targets:
                    entries = await self._read_back(client, entries, sent_targets)
                for target in work:
                    self._check(target, entries)
                await self._warm(client, work)
            state.entries = entries
            state.runner_backoff = Backoff()
            state.next_verify = controller.clock() + settings.verify_interval
        except modelrunner.RunnerUnreachable as error:
            state.entries = None
            delay = state.runner_backoff.failed(settings.unreachable_backoff, controller.clock())
            for target in targets:
                self._fail(target, Reason.RUNNER_UNREACHABLE, f"{error} (retry in {delay:.0f}s)")
        await self._update_capacity(targets)
        self._mark_visited(targets)
        await self._update_readiness_gate(targets)

    async def _read_back(
        self,
        client: modelrunner.ModelRunnerClient,
        entries: list[wire.ModelConfigEntry],
        sent: list[ModelTarget],
    ) -> list[wire.ModelConfigEntry]:
        """The runner's configs after sending ``sent``: the whole listing, or for a few models
        their own entries merged into the listing already known (by model digest)."""
        if len(sent) > self.controller.settings.targeted_readback:
            return await client.read_configs()
        digests = {a.digest for t in sent if (a := self.state.applied.get(t.key)) is not None}
        models = dict.fromkeys(t.normalized for t in sent if t.normalized)
        fresh = [e for model in models for e in await client.read_configs(model)]
        return [e for e in entries if e.model_id not in digests] + fresh

    def _mark_visited(self, targets: list[ModelTarget]) -> None:
        for target in targets:
            placement = self.controller.placement(target, self.runner)
            if not placement.visited:
                placement.visited = True
                self.controller.status.mark(target.key)

    def _needs_work(self, target: ModelTarget, now: float) -> bool:
        applied = self.state.applied.get(target.key)
        if applied is not None and applied.fingerprint == target.fingerprint:
            return False
        backoff = self.state.backoff.get(target.key)
        return backoff is None or backoff.retry_at <= now

    def _verify(self, targets: list[ModelTarget], entries: list[wire.ModelConfigEntry]) -> None:
        """Periodic/first read-back: anything applied but no longer on the runner is redone."""
        for target in targets:
            applied = self.state.applied.get(target.key)
            if applied is None or applied.rejected:
                continue
            if not _matching(entries, applied):
                changed = _overwritten(entries, applied)
                if changed:
                    # Someone else configured the model (an Ollama client's num_ctx, keep_alive
                    # or think replaces the whole stored configuration): say what, then restore.
                    self.controller.status.event_soon(
                        target.key,
                        "Warning",
                        "ConfigOverwritten",
                        f"another client replaced the configuration on {self.runner.name} "
                        f"({'; '.join(changed)}): restoring it",
                    )
                logger.info("runner %s lost %s: re-applying", self.runner.key, target.key)
                del self.state.applied[target.key]
                self.controller.placement(target, self.runner).state = "Configuring"

    async def _apply(
        self,
        client: modelrunner.ModelRunnerClient,
        target: ModelTarget,
        entries: list[wire.ModelConfigEntry],
    ) -> bool:
        """Pull if needed, then configure unless the runner already has it. True = POST sent."""
        controller = self.controller
        spec = target.spec
        assert spec is not None and target.normalized is not None
        placement = controller.placement(target, self.runner)
        try:
            stored = await self._ensure_pulled(client, target, target.normalized, placement)
            if target.draft:
                await self._ensure_pulled(client, target, target.draft, placement)
            if stored is None:
                return False
            placement.pulled, placement.pulled_percent = True, 100
            backend = dmrmodel.resolve_backend(spec, stored.config.format)
            if not await self._backend_ready(client, target, backend):
                return False
            request_body = dmrmodel.configure_request(target, backend)
            request = wire.ConfigureRequest.model_validate(request_body)
            applied = Applied(
                fingerprint=target.fingerprint,
                backend=backend,
                digest=wire.digest_of(stored),
                request=request_body,
            )
            placement.digest, placement.backend = applied.digest, backend
            placement.config_hash = dmrmodel.config_hash(backend, request_body)
            self.state.applied[target.key] = applied
            if _matching(entries, applied):
                return False  # already there (operator restart): verify only, send nothing
            placement.state, placement.reason = "Configuring", Reason.CONFIGURING
            controller.status.mark(target.key)
            if controller.targets.get(target.key) is not target:
                return False  # deleted or changed while we pulled
            await self._configure(client, request, backend, spec.busy_policy, target.normalized)
            return True
        except modelrunner.RunnerBusy as error:
            self.state.applied.pop(target.key, None)
            delay = self._backoff(target).failed(
                controller.settings.busy_backoff, controller.clock()
            )
            self._fail(target, Reason.RUNNER_BUSY, f"{error} (retry in {delay:.0f}s)", "Busy")
        except modelrunner.ConfigRejected as error:
            # Deterministic: the same request would be rejected again. Wait for a spec change.
            self.state.applied[target.key] = Applied(
                fingerprint=target.fingerprint, backend="", digest="", request={}, rejected=True
            )
            self._fail(target, Reason.CONFIG_REJECTED, str(error))
        except modelrunner.PullFailed as error:
            delay = self._backoff(target).failed(
                controller.settings.failure_backoff, controller.clock()
            )
            self._fail(target, Reason.PULL_FAILED, f"{error} (retry in {delay:.0f}s)")
        except modelrunner.RunnerUnreachable:
            raise
        except modelrunner.RunnerError as error:
            delay = self._backoff(target).failed(
                controller.settings.failure_backoff, controller.clock()
            )
            self._fail(target, Reason.CONFIG_REJECTED, f"{error} (retry in {delay:.0f}s)")
        return False

    async def _pull_token(self, target: ModelTarget) -> str | None:
        """The bearer token ``spec.pullTokenSecret`` names, read now (a rotated token is used
        at the next pull); PullFailed naming the Secret when it cannot be had."""
        assert target.spec is not None
        ref = target.spec.pull_token_secret
        if ref is None:
            return None
        where = f"spec.pullTokenSecret: Secret {target.namespace}/{ref.name}"
        try:
            secret = await self.controller.kube.get(
                api_version="v1", kind="Secret", namespace=target.namespace, name=ref.name
            )
        except kube_client.KubeError as error:
            raise modelrunner.PullFailed(f"{where} cannot be read: {error}") from None
        encoded = ((secret or {}).get("data") or {}).get(ref.key)
        if secret is None or not encoded:
            missing = "does not exist" if secret is None else f"has no key {ref.key!r}"
            raise modelrunner.PullFailed(f"{where} {missing}")
        try:
            return base64.b64decode(encoded).decode().strip()
        except (ValueError, UnicodeDecodeError):
            raise modelrunner.PullFailed(f"{where}: key {ref.key!r} is not text") from None

    async def _update_capacity(self, targets: list[ModelTarget]) -> None:
        """Say on each model of this runner whether the runner can hold them all (its node is
        read once per incarnation; sizes come from the runner's own store)."""
        state, runner, controller = self.state, self.runner, self.controller
        if runner.external or runner.node is None:
            return
        if not state.capacity_read:
            state.capacity_read = True
            try:
                node = await controller.kube.get(
                    api_version="v1", kind="Node", namespace="", name=runner.node
                )
            except kube_client.KubeError as error:  # e.g. RBAC without nodes: nothing to say
                logger.info("capacity of %s unknown: %s", runner.key, error)
                node = None
            if node is not None:
                state.capacity = capacity.capacity_of(node, pod_gpus=runner.gpus)
        if state.capacity is None:
            return
        sizes = []
        for target in targets:
            stored = (state.store or {}).get(references.qualified_tag(target.normalized or ""))
            sizes.append(capacity.size_in_bytes(stored.config.size) if stored else None)
        warning = capacity.over_capacity(state.capacity, runner=runner.name, model_sizes=sizes)
        for target in targets:
            placement = controller.placement(target, runner)
            if placement.capacity_checked and placement.over_capacity == warning:
                continue
            placement.capacity_checked, placement.over_capacity = True, warning
            controller.status.mark(target.key)
            if warning:
                controller.status.event_soon(target.key, "Warning", Reason.OVER_CAPACITY, warning)

    async def _backend_ready(
        self, client: modelrunner.ModelRunnerClient, target: ModelTarget, backend: str
    ) -> bool:
        """Whether the runner's image can run ``backend``; otherwise the placement says why and
        the model is retried later (a configuration the runner cannot load is never sent)."""
        state, controller = self.state, self.controller
        if state.backend_status is None:
            state.backend_status = await client.status()
        check = backends.check_backend(backend, state.backend_status)
        if check.available:
            return True
        state.backend_status = None  # asked again at the retry
        placement = controller.placement(target, self.runner)
        if check.verdict == "starting":
            delay = self._backoff(target).failed(
                controller.settings.busy_backoff, controller.clock()
            )
            placement.state, placement.reason = "Configuring", Reason.CONFIGURING
            placement.message = f"the runner is still checking its backends (retry in {delay:.0f}s)"
            controller.status.mark(target.key)
            return False
        delay = self._backoff(target).failed(
            controller.settings.failure_backoff, controller.clock()
        )
        message = backends.unavailable_message(
            backend, check, runner=self.runner.name, image=self.runner.image
        )
        self._fail(target, Reason.BACKEND_UNAVAILABLE, f"{message} (retry in {delay:.0f}s)")
        return False

    async def _ensure_pulled(
        self,
        client: modelrunner.ModelRunnerClient,
        target: ModelTarget,
        reference: str,
        placement: Placement,
    ) -> wire.StoreModel | None:
        spec = target.spec
        assert spec is not None and self.state.store is not None
        stored = self.state.store.get(references.qualified_tag(reference))
        if stored is None and spec.pull_policy != "Always":
            # A runner with DEFAULT_REGISTRY set (a mirror) tags what it pulled with that
            # registry's host, which no reference names: only the runner can resolve the name.
            stored = await client.get_model(reference)
            if stored is not None:
                self.state.store[references.qualified_tag(reference)] = stored
        if stored is not None and spec.pull_policy != "Always":
            return stored
        if stored is None and spec.pull_policy == "Never":
            delay = self._backoff(target).failed(
                self.controller.settings.failure_backoff, self.controller.clock()
            )
            self._fail(
                target,
                Reason.PULL_FAILED,
                f"{reference} is not in the runner's store and pullPolicy is Never "
                f"(retry in {delay:.0f}s)",
            )
            return None
        slots = self._pull_slots()
        if slots.locked():
            placement.state, placement.reason = "Queued", Reason.PULL_QUEUED
            placement.message = (
                f"waiting for one of the runner's {self.controller.settings.pulls_per_runner} "
                "pull slots"
            )
            placement.visited = True
            self.controller.status.mark(target.key)
        async with slots:
            return await self._pull(client, target, reference, placement)

    def _pull_slots(self) -> asyncio.Semaphore:
        if self.state.pull_slots is None:
            self.state.pull_slots = asyncio.Semaphore(self.controller.settings.pulls_per_runner)
        return self.state.pull_slots

    async def _pull(
        self,
        client: modelrunner.ModelRunnerClient,
        target: ModelTarget,
        reference: str,
        placement: Placement,
    ) -> wire.StoreModel:
        placement.state, placement.reason = "Pulling", Reason.PULLING
        placement.message = None
        placement.visited = True  # long work in progress is news: show it while it lasts
        placement.pulled_percent = 0
        self.controller.status.mark(target.key)
        tracker = wire.PullProgressTracker()

        def progress(line: wire.PullProgress) -> None:
            percent = tracker.update(line)
            if percent is None:
                return
            rounded = int(percent)
            # Status is written for every 5 %, not for every NDJSON line.
            if placement.pulled_percent is None or rounded - placement.pulled_percent >= 5:
                placement.pulled_percent = rounded
                self.controller.status.mark(target.key)

        token = await self._pull_token(target)
        result = await client.pull(reference, on_progress=progress, bearer_token=token)
        stored = await client.get_model(reference)
        if stored is None:
            raise modelrunner.PullFailed(f"{reference} is not in the store after a pull")
        if self.state.store is not None:  # None: forgotten meanwhile (restart), read again
            self.state.store[references.qualified_tag(reference)] = stored
        message = f"pulled {reference} on {self.runner.name} ({wire.digest_of(stored)[:19]})"
        if not getattr(result, "cached", False):
            await self.controller.status.event_for(target.key, "Normal", "Pulled", message)
        return stored

    async def _configure(
        self,
        client: modelrunner.ModelRunnerClient,
        request: wire.ConfigureRequest,
        backend: str,
        busy_policy: str,
        model: str,
    ) -> None:
        try:
            await client.configure(backend, request)
        except modelrunner.RunnerBusy:
            if busy_policy != "Unload":
                raise
            await client.unload(backend=backend, models=[model])
            await client.configure(backend, request)

    async def _warm(self, client: modelrunner.ModelRunnerClient, work: list[ModelTarget]) -> None:
        """spec.warmup: load each newly configured model (``X-Preload-Only``, as the first
        request would) and confirm the runner lists it loaded, before it counts as Ready."""
        controller = self.controller
        pending: list[tuple[ModelTarget, Applied, Placement]] = []
        for target in work:
            applied = self.state.applied.get(target.key)
            placement = controller.placement(target, self.runner)
            spec = target.spec
            if (
                spec is not None
                and spec.warmup
                and applied is not None
                and not applied.warmed
                and placement.state == "Configured"
            ):
                # All of them at once, before the first await: none may look Ready meanwhile.
                placement.state, placement.reason = "Loading", Reason.LOADING
                placement.loaded = False
                controller.status.mark(target.key)
                pending.append((target, applied, placement))
        for target, applied, placement in pending:
            mode = wire.ConfigureRequest.model_validate(applied.request).effective_mode()
            assert target.normalized is not None
            try:
                await client.preload(target.normalized, applied.backend, mode=mode)
                running = await client.ps()
            except modelrunner.RunnerError as error:
                # The runner's log says what the engine did (GET /logs): its last complaint.
                complaints = [
                    line
                    for line in await client.log_tail(lines=20)
                    if "level=WARN" in line or "level=ERROR" in line
                ]
                logged = f"; runner log: {complaints[-1]}" if complaints else ""
                self._load_failed(target, f"warm-up load failed: {error}{logged}")
                continue
            loaded = any(
                entry.backend_name == applied.backend
                and entry.mode == mode
                and not entry.loading
                and references.normalize_reference(entry.model_name) == target.normalized
                for entry in running
            )
            if not loaded:
                self._load_failed(
                    target, f"loaded, but /engines/ps does not list it ({mode}, {applied.backend})"
                )
                continue
            applied.warmed = True
            placement.state, placement.reason, placement.loaded = (
                "Configured",
                Reason.CONFIGURED,
                True,
            )
            controller.status.mark(target.key)

    def _load_failed(self, target: ModelTarget, message: str) -> None:
        """The warm-up failed: configured again, then warmed again, after a backoff."""
        self.state.applied.pop(target.key, None)
        delay = self._backoff(target).failed(
            self.controller.settings.failure_backoff, self.controller.clock()
        )
        self._fail(target, Reason.LOAD_FAILED, f"{message} (retry in {delay:.0f}s)")

    def _check(self, target: ModelTarget, entries: list[wire.ModelConfigEntry]) -> None:
        """Compare the read-back with what was sent; only a match counts as configured."""
        applied = self.state.applied.get(target.key)
        placement = self.controller.placement(target, self.runner)
        if applied is None or applied.rejected:
            return
        entry = _matching(entries, applied)
        request = wire.ConfigureRequest.model_validate(applied.request)
        differences = (
            wire.config_differences(request, entry, backend=applied.backend)
            if entry is not None
            else ["the runner does not report this configuration"]
        )
        if differences:
            del self.state.applied[target.key]
            delay = self._backoff(target).failed(
                self.controller.settings.failure_backoff, self.controller.clock()
            )
            self._fail(
                target,
                Reason.CONFIG_MISMATCH,
                f"read-back differs: {'; '.join(differences)} (retry in {delay:.0f}s)",
            )
            return
        assert entry is not None
        self.state.backoff.pop(target.key, None)
        was = placement.state
        placement.state, placement.reason, placement.message = "Configured", Reason.CONFIGURED, None
        placement.effective = entry.config.to_wire()
        if was != "Configured" or placement.configured_at is None:
            placement.configured_at = (
                kube_client.now_rfc3339()
                if self.state.restarted
                else self.controller.status.configured_at(target, self.runner)
            )
            restarted = self.state.restarted and target.key in self.state.ever_configured
            self.state.ever_configured.add(target.key)
            # A first configuration is reported once per DMRModel (the Ready transition, in
            # StatusWriter): per-runner Events would be a write per pod for every model. A
            # runner that lost its configuration is news about that runner, so it gets its own.
            if restarted:
                self.controller.status.event_soon(
                    target.key,
                    "Normal",
                    "Reconfigured",
                    f"configuration re-applied on {self.runner.name} after it lost it (restart)",
                )
        self.controller.status.mark(target.key)

    def _fail(self, target: ModelTarget, reason: str, message: str, state: str = "Failed") -> None:
        placement = self.controller.placement(target, self.runner)
        changed = placement.reason != reason
        placement.state = state  # type: ignore[assignment]
        placement.reason, placement.message = reason, message
        self.controller.status.mark(target.key)
        if changed:
            self.controller.status.event_soon(target.key, "Warning", reason, message)

    def _backoff(self, target: ModelTarget) -> Backoff:
        return self.state.backoff.setdefault(target.key, Backoff())

    async def _update_readiness_gate(self, targets: list[ModelTarget]) -> None:
        runner = self.runner
        if READINESS_GATE not in runner.readiness_gates or runner.external:
            return
        configured = all(
            self.controller.placements.get((t.key, runner.key)) is not None
            and self.controller.placements[(t.key, runner.key)].state == "Configured"
            for t in targets
        )
        wanted = "True" if configured else "False"
        if runner.pod_conditions.get(READINESS_GATE) == wanted:
            return
        try:
            await self.controller.kube.set_pod_condition(
                namespace=runner.namespace,
                name=runner.name,
                condition_type=READINESS_GATE,
                status=wanted,
                message=f"{sum(1 for t in targets)} model(s) "
                + ("configured" if configured else "not configured yet"),
            )
        except kube_client.KubeError as error:
            logger.warning("could not set %s on %s: %s", READINESS_GATE, runner.key, error)


async def _resolved_address_problem(base_url: str) -> str | None:
    """Refuse an allowed external host whose name resolves to a link-local/metadata address
    (DNS rebinding): the name check at admission cannot see where the name points today."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 80)
    except OSError:
        return None  # unresolvable: the request itself will fail as RunnerUnreachable
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if runner_views.refused_address(address):
            return f"runners.url host {host!r} resolves to {address}, a refused address"
    return None


def _index_store(models: Iterable[wire.StoreModel]) -> dict[str, wire.StoreModel]:
    """The runner's store keyed by fully qualified tag, the form the runner itself returns."""
    index: dict[str, wire.StoreModel] = {}
    for model in models:
        for tag in model.tags:
            index[references.qualified_tag(tag)] = model
    return index


def _matching(
    entries: Iterable[wire.ModelConfigEntry], applied: Applied
) -> wire.ModelConfigEntry | None:
    """The read-back entry for what was applied (same backend, model digest and mode)."""
    request = wire.ConfigureRequest.model_validate(applied.request)
    mode = request.effective_mode()
    for entry in entries:
        if (
            entry.backend == applied.backend
            and entry.model_id == applied.digest
            and entry.mode == mode
            and not wire.config_differences(request, entry, backend=applied.backend)
        ):
            return entry
    return None


def _overwritten(entries: Iterable[wire.ModelConfigEntry], applied: Applied) -> list[str]:
    """What differs in the runner's entry for what was applied (same backend, model, mode), or
    nothing when there is no such entry (a restart forgets configurations, nobody replaced it)."""
    request = wire.ConfigureRequest.model_validate(applied.request)
    for entry in entries:
        if (entry.backend, entry.model_id, entry.mode) == (
            applied.backend,
            applied.digest,
            request.effective_mode(),
        ):
            return wire.config_differences(request, entry, backend=applied.backend)
    return []


class StatusWriter:
    """Coalesces status recomputation and writes only what changed, plus Events."""

    def __init__(self, controller: DMRModelController) -> None:
        self.controller = controller
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending_events: list[tuple[str, str, str, str]] = []
        self.writes = 0
        self._unechoed: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
        """Per DMRModel, until the watch shows our last status write: the statuses it replaced
        (oldest first) and the status written."""

    def current(self, key: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """A watched body, with our last status write when the body predates it.

        Until the watch shows our status patch, events (kopf's own finalizer patch, the create)
        carry a status from before it. Taken as is, that stale status made the next computation
        look like a new transition: a second status write and a second ``Configured`` Event.
        Statuses are compared, not resourceVersions: those are opaque, and kopf may skip the
        echo itself when events for one object come in a burst.
        """
        unechoed = self._unechoed.get(key)
        if unechoed is None:
            return body
        replaced, written = unechoed
        incoming = body.get("status") or {}
        if any(_same_status(incoming, old) for old in replaced):
            return {**body, "status": written}
        # Our write, or somebody else's after it (taken, and corrected if it is wrong).
        del self._unechoed[key]
        return body

    def forget(self, key: str) -> None:
        self._unechoed.pop(key, None)

    def mark(self, key: str) -> None:
        self._dirty.add(key)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dmrmodel-status")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        interval = self.controller.settings.status_interval
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(interval)
            await self.flush()

    async def flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        events, self._pending_events = self._pending_events, []
        writes = [self._write(key) for key in sorted(dirty)]
        await asyncio.gather(*writes)
        # Events after the status they describe, but not one by one: awaited in turn they held
        # the next status flush back (3 Events per model on 3 runners: 1,000 models took
        # 45 s from the last _configure to the last Ready).
        await asyncio.gather(*(self.event_for(*event) for event in events))

    def compute(self, key: str) -> dict[str, Any] | None:
        controller = self.controller
        target = controller.targets.get(key)
        body = controller.bodies.get(key)
        if target is None or body is None:
            return None
        runners = controller.runners_for(key)
        placements = [controller.placement(target, r) for r in runners]
        serving = target.valid and key not in controller.conflicts
        if serving and not all(p.visited for p in placements):
            return None  # a runner's worker has not reported yet; it marks us when it has
        return dmrmodel.model_status(
            target,
            placements,
            previous=body.get("status"),
            endpoint=controller.endpoint_for(target),
            conflict_with=controller.conflicts.get(key),
            now=kube_client.now_rfc3339(),
        )

    async def _write(self, key: str) -> None:
        status = self.compute(key)
        body = self.controller.bodies.get(key)
        if status is None or body is None:
            return
        previous = dict(body.get("status") or {})
        if _same_status(previous, status):
            return
        patch: dict[str, Any] = {k: None for k in previous if k not in status}
        patch.update(status)
        metadata = body["metadata"]
        try:
            await self.controller.kube.patch_status(
                api_version=constants.API_VERSION,
                kind=constants.DMRMODEL_KIND,
                namespace=metadata["namespace"],
                name=metadata["name"],
                status=patch,
            )
            self.writes += 1
            metrics.STATUS_WRITES.labels(kind=constants.DMRMODEL_KIND).inc()
        except kube_client.NotFound:
            return
        except kube_client.KubeError as error:
            logger.warning("status of %s not written: %s", key, error)
            self.mark(key)
            return
        # Remember what we wrote, so neither its echo nor older events look like a change.
        self.controller.bodies[key] = {**body, "status": status}
        replaced = self._unechoed.get(key, ([], {}))[0]
        self._unechoed[key] = ([*replaced, previous], status)
        old_phase = previous.get("phase")
        if old_phase != status.get("phase"):
            if status.get("phase") == "Ready":
                self.event_soon(
                    key,
                    "Normal",
                    "Configured",
                    f"configuration applied and verified on {status.get('runnersSummary')} "
                    "runner(s)",
                )
            self.controller.notify(key, "phase")

    def configured_at(self, target: ModelTarget, runner: runner_views.Runner) -> str:
        """Keep the recorded time across operator restarts when the runner is the same."""
        body = self.controller.bodies.get(target.key) or {}
        for entry in (body.get("status") or {}).get("runners") or ():
            if (
                entry.get("pod") == runner.name
                and entry.get("state") == "Configured"
                and entry.get("configuredAt")
            ):
                return str(entry["configuredAt"])
        return kube_client.now_rfc3339()

    def event_soon(self, key: str, type_: str, reason: str, message: str) -> None:
        self._pending_events.append((key, type_, reason, message))
        self._wake.set()

    async def event_for(self, key: str, type_: str, reason: str, message: str) -> None:
        body = self.controller.bodies.get(key)
        if body is not None:
            await self.event(body, type_, reason, message)

    async def event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            await self.controller.kube.post_event(
                involved=body, type_=type_, reason=reason, message=message
            )
        except kube_client.KubeError as error:
            logger.warning("event %s not recorded: %s", reason, error)


def _same_status(previous: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return dict(previous) == dict(status)
