"""One runner's worker: keeps a runner process's configuration equal to its DMRModels.

``dmrmodels.DMRModelController`` starts a ``RunnerWorker`` per runner process and wakes it when
the DMRModels assigned to the runner, or the runner itself, change. A pass (``sync``) reads the
runner's configurations back, pulls what is missing (within the runner's pull slots), sends
``_configure`` for what differs, checks the read-back, warms ``spec.warmup`` models and sets the
pod's readiness gate. What it applied is kept per incarnation (pod UID, IP, restart count) in
``_RunnerState``: a restart forgets it all. Runner calls go through ``clients.modelrunner``;
outcomes land in the controller's ``Placement``s, and ``model_status.StatusWriter`` is marked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dmr_operator import metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.clients import modelrunner
from dmr_operator.dmr import references, wire
from dmr_operator.reconcile import agent_workload, backends, capacity, dmrmodel
from dmr_operator.reconcile import runners as runner_views
from dmr_operator.reconcile.dmrmodel import ModelTarget, Placement, Reason

if TYPE_CHECKING:
    from dmr_operator.controllers import dmrmodels

logger = logging.getLogger(__name__)

# Set by the worker once its runner has all its models; the controller starts a worker for every
# pod that carries the gate, so a pod with no models is told so too.
READINESS_GATE = agent_workload.MODELS_CONFIGURED_CONDITION


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


class RunnerWorker:
    """Keeps one runner's configuration equal to its desired DMRModels."""

    def __init__(
        self, controller: dmrmodels.DMRModelController, runner: runner_views.Runner
    ) -> None:
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
        """When the next pass is due, given the pass just made: the next read-back or the
        earliest retry still ahead, and never before the runner's own retry (a pass before it
        does nothing). A due time already past would wake the worker at once, pass after pass:
        a model's retry that was due was taken by the pass, or its model is gone from here."""
        state = self.state
        if state.runner.base_url is None or not state.runner.ready:
            return float("inf")  # nothing can be done before its pod changes, which wakes us
        now = self.controller.clock()
        ahead = [b.retry_at for b in state.backoff.values() if b.retry_at > now]
        return max(min([state.next_verify, *ahead]), state.runner_backoff.retry_at)

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
        for key in [k for k in state.backoff if k not in wanted]:
            del state.backoff[key]
        work = [t for t in targets if self._needs_work(t, now)]
        # Models applied before the runner stopped answering are marked unreachable, and being
        # applied they need no work: only a read-back can clear that (10,000 models on 1,500
        # runners: 34 stayed Failed for good after one connect timeout each).
        work_keys = {t.key for t in work}
        recovering = [
            t
            for t in targets
            if t.key not in work_keys
            and controller.placement(t, runner).reason == Reason.RUNNER_UNREACHABLE
        ]
        verify = now >= state.next_verify or bool(recovering)
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
                controller.placer.listed(runner, entries)
                for target in recovering:
                    self._check(target, entries)
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
            tolerated = state.runner_backoff.attempts < settings.unreachable_tolerance
            if tolerated:
                logger.warning("runner %s: %s (retry in %.0fs)", runner.key, error, delay)
            for target in targets:
                # One missed read-back of a serving copy is not an outage worth a status write
                # per model (10,000 of them at scale) and a Ready flap that GitOps tools show.
                if tolerated and controller.placement(target, runner).state == "Configured":
                    continue
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
            try:
                node = await controller.node(runner.node)  # None: e.g. no right to read Nodes
            except kube_client.KubeError:
                return  # asked again at the next pass
            state.capacity_read = True
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
