"""DMRModel status writing: from the runners' ``Placement``s to each DMRModel's status and Events.

``dmrmodels.DMRModelController`` and its ``runner_worker.RunnerWorker``s mark a DMRModel when
something it reports may have changed; ``StatusWriter`` coalesces the marks
(``ControllerSettings.status_interval``), computes the status with the pure
``reconcile.dmrmodel.model_status``, patches only what differs and then posts the Events queued
meanwhile. Until the watch echoes its last write it remembers it, so a stale event body does not
look like a new transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from dmr_operator import constants, metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.controllers import model_placement
from dmr_operator.reconcile import dmrmodel
from dmr_operator.reconcile import runners as runner_views
from dmr_operator.reconcile.dmrmodel import ModelTarget

if TYPE_CHECKING:
    from dmr_operator.controllers import dmrmodels

logger = logging.getLogger(__name__)

SETTLE_RETRY_SECONDS = 5.0
# Status writes (and Events) in progress at once: twice what the API client sends at once.
WRITES_IN_FLIGHT = 2 * kube_client.MAX_IN_FLIGHT


class StatusWriter:
    """Coalesces status recomputation and writes only what changed, plus Events."""

    def __init__(self, controller: dmrmodels.DMRModelController) -> None:
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
        await _bounded(self._write(key) for key in sorted(dirty))
        # Events after the status they describe, but not one by one: awaited in turn they held
        # the next status flush back (3 Events per model on 3 runners: 1,000 models took
        # 45 s from the last _configure to the last Ready).
        await _bounded(self.event_for(*event) for event in events)

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
            unschedulable=controller.unschedulable_for(target),
            placed=controller.placer.view(target) if model_placement.is_placed(target) else None,
            conflict_with=controller.conflicts.get(key),
            now=kube_client.now_rfc3339(),
        )

    async def _write(self, key: str) -> None:
        target = self.controller.targets.get(key)
        if target is not None and model_placement.is_placed(target):
            try:  # labels and Service first: the status then says who serves
                await self.controller.placer.settle(target)
            except kube_client.KubeError as error:
                logger.warning("placement of %s not settled: %s", key, error)
                # Again in a while (not at the next flush: no loop of failing API calls).
                asyncio.get_running_loop().call_later(SETTLE_RETRY_SECONDS, self.mark, key)
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


async def _bounded(writes: Iterator[Coroutine[Any, Any, None]]) -> None:
    """Run the writes ``WRITES_IN_FLIGHT`` at a time, each made only when a slot is free: 10,000
    writes started at once held their request bodies and responses in memory while they
    queued for the API client, and 10,000 tasks waiting on a semaphore still held 10,000
    coroutines."""

    async def slot() -> None:
        for write in writes:  # one iterator shared by the slots: each write is taken once
            await write

    await asyncio.gather(*(slot() for _ in range(WRITES_IN_FLIGHT)))


def _same_status(previous: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    return dict(previous) == dict(status)
