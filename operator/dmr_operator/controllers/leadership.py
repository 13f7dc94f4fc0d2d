"""Leader election for operator replicas: wait for the Lease, hold it, let it go.

``dmr-operator run --leader-elect`` calls ``LeaderElector.acquire`` before kopf starts, so a
standby replica watches nothing and calls no runner; the leader runs kopf while ``hold`` renews
the lease and raises ``LeadershipLost`` when it cannot renew within the renew deadline (the
operator then exits, like controller-runtime's managers do, and comes back as a standby). On a
clean shutdown ``release`` frees the lease, so a rolling update hands over at once. The rules
are in ``reconcile/leadership.py``; this module only reads and writes the Lease.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from dmr_operator import metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.reconcile import leadership

logger = logging.getLogger(__name__)


class LeadershipLost(Exception):
    """The lease could not be renewed in time: another replica may lead now."""


class LeaderElector:
    """Campaigns for one Lease (``namespace``/``name``) as ``identity``."""

    def __init__(
        self,
        kube: kube_client.KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        timings: leadership.LeaseTimings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timings = timings
        self.clock = clock
        self._observed: leadership.Observation | None = None
        self._reported_holder: str | None = None

    @property
    def lease_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def acquire(self) -> None:
        """Return once this replica holds the lease (retrying every retry period)."""
        while True:
            if await self._try_to_lead():
                break
            # Jitter keeps several standbys from asking in lockstep.
            await asyncio.sleep(self.timings.retry_period * random.uniform(1.0, 1.2))
        metrics.LEADER.set(1)
        logger.info("leading: holding lease %s as %s", self.lease_name, self.identity)

    async def hold(self) -> None:
        """Renew the lease until cancelled; raise ``LeadershipLost`` past the renew deadline."""
        renewed_at = self.clock()
        while True:
            await asyncio.sleep(self.timings.retry_period)
            try:
                async with asyncio.timeout(self.timings.renew_deadline):
                    renewed = await self._try_to_lead()
            except TimeoutError:
                renewed = False
            if renewed:
                renewed_at = self.clock()
            elif self.clock() - renewed_at >= self.timings.renew_deadline:
                metrics.LEADER.set(0)
                raise LeadershipLost(
                    f"lease {self.lease_name} not renewed for {self.timings.renew_deadline:.0f} s"
                )

    async def release(self) -> None:
        """Give the lease up (best effort) so a standby takes over without waiting."""
        metrics.LEADER.set(0)
        try:
            lease = await self._read()
            if lease is None or leadership.LeaseView.of(lease).holder != self.identity:
                return
            lease["spec"] = {**(lease.get("spec") or {}), **leadership.released()}
            await self.kube.replace(lease)
            logger.info("released lease %s", self.lease_name)
        except kube_client.KubeError as error:
            logger.warning("could not release lease %s: %s", self.lease_name, error)

    # --- one attempt ------------------------------------------------------------------------

    async def _try_to_lead(self) -> bool:
        """One read and, when the lease is free or ours, one write. True = we hold it now."""
        now = self.clock()
        try:
            lease = await self._read()
            if lease is None:
                await self.kube.create(self._body(None, self._claim(None)))
                return True
            view = leadership.LeaseView.of(lease)
            observed = self._observed
            self._observed = (
                observed.after(view, now)
                if observed is not None
                else leadership.Observation(lease=view, changed_at=now)
            )
            if not self._observed.free_for(self.identity, now):
                self._report_holder(view.holder)
                return False
            await self.kube.replace(self._body(lease, self._claim(view)))
            return True
        except kube_client.Conflict:
            return False  # another replica wrote first; read again next round
        except kube_client.KubeError as error:
            logger.warning("lease %s: %s", self.lease_name, error)
            return False

    async def _read(self) -> dict[str, Any] | None:
        found = await self.kube.get(
            api_version=leadership.API_VERSION,
            kind="Lease",
            namespace=self.namespace,
            name=self.name,
        )
        return dict(found) if found is not None else None

    def _claim(self, current: leadership.LeaseView | None) -> dict[str, Any]:
        return leadership.claim(
            current,
            identity=self.identity,
            timings=self.timings,
            now=datetime.datetime.now(datetime.UTC),
        )

    def _body(self, lease: dict[str, Any] | None, spec: dict[str, Any]) -> dict[str, Any]:
        if lease is None:
            metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
            return {
                "apiVersion": leadership.API_VERSION,
                "kind": "Lease",
                "metadata": metadata,
                "spec": spec,
            }
        # The read resourceVersion stays in metadata: a concurrent writer makes this a Conflict.
        return {**lease, "spec": {**(lease.get("spec") or {}), **spec}}

    def _report_holder(self, holder: str) -> None:
        if holder != self._reported_holder:
            self._reported_holder = holder
            logger.info(
                "standing by: lease %s is held by %s; waiting for it to be released or expire",
                self.lease_name,
                holder,
            )
