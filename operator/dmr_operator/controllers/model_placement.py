"""Placement of DMRModels with ``spec.placement.replicas``: which pods of the pool hold each one,
and moving it without an outage.

Role: the controller (``controllers.dmrmodels``) asks ``PlacementKeeper.replan`` for a namespace
whenever its models or pods change, and ``runners_for`` for the runners a placed model's workers
configure. ``replan`` feeds the pure ``reconcile.placement.place`` with what each model needs
(``reconcile.model_memory``, from the runner's own ``GET /models/{ref}?remote=true``: the
registry's size and GGUF metadata, before anything is pulled) and what each pod can hold
(``reconcile.model_routing.pod_budget``, from its Node). Both are read once and cached; until
they are known the model waits (``Placing``), nothing is guessed.

Moves are make-before-break. A placed model's runners (the pods its workers configure) are only
the pods chosen for its current spec; a pod still serving it (labelled
``placement.dmr.dev/<model>``) but no longer chosen is left alone, keeping the configuration it
serves with, while the new pod is pulled, configured and verified. ``settle`` (run by the status
writer, after the workers report) labels every chosen pod that is configured, and only once all
of them are, unlabels the pods no longer chosen (the model's Service drops them) and then unloads
the model there. Until a changed spec's needs are known (a new contextSize: its KV cache), the
model has no runners at all: the old pods serve what they have rather than take a configuration
that may not fit them. The label is the record: after an operator restart, the labelled pods are
the previous placement.

A copy no DMRModel serves any more but its runner may still hold (``deletionPolicy: Retain``,
or an unload that failed) is a ``LeftCopy``: it counts on its pod until the runner's read-back
no longer lists its configuration or the runner restarts, and a DMRModel of the same model
placed later in the namespace takes it over rather than adding a second copy.

Neighbours: ``controllers.model_status`` calls ``settle`` and reads ``view`` (a
``reconcile.dmrmodel.PlacementSummary``); I/O through
``clients.kube`` (Nodes, pod labels, the model's Service) and ``clients.modelrunner``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from dmr_operator import metrics
from dmr_operator.clients import kube as kube_client
from dmr_operator.clients import modelrunner
from dmr_operator.dmr import wire
from dmr_operator.reconcile import capacity, model_memory, model_routing, placement, selectors
from dmr_operator.reconcile import runners as runner_views
from dmr_operator.reconcile.dmrmodel import ModelTarget, PlacementSummary

if TYPE_CHECKING:
    from dmr_operator.controllers.dmrmodels import DMRModelController

logger = logging.getLogger(__name__)

# A read placement waits for (a model's size, a Node, DRA claims and slices) that failed for a
# reason that may pass is asked again after this long (never a hot loop).
NEEDS_RETRY_SECONDS: Final = 30.0
# A pod whose Node cannot be read (rbac.readNodes off) is placed on by runner slots alone.
UNKNOWN_MEMORY: Final = 2**62


@dataclasses.dataclass(frozen=True)
class LeftCopy:
    """A copy of a model on a pod that no DMRModel serves but the runner may still hold."""

    reference: str
    model_id: str
    """The model's digest, as the runner lists it in ``GET /engines/_configure``."""
    needs: model_memory.ModelNeeds
    incarnation: tuple[str, ...]
    """The runner process it was left on: a restarted one holds nothing."""


def is_placed(target: ModelTarget) -> bool:
    """Whether the operator chooses the target's pods (``placement.replicas``), rather than
    configuring it on every pod of its pool."""
    spec = target.spec
    return (
        target.valid
        and not target.url
        and spec is not None
        and spec.placement is not None
        and spec.placement.replicas is not None
    )


def pool_key(target: ModelTarget) -> str:
    """Models whose selectors are equal share their pods' capacity."""
    return json.dumps(target.pool_selector, sort_keys=True)


class PlacementKeeper:
    """Chosen pods per placed DMRModel, the facts they were chosen from, and the moves."""

    def __init__(self, controller: DMRModelController) -> None:
        self.controller = controller
        self.needs: dict[tuple[str, int | None], model_memory.ModelNeeds] = {}
        self._needs_problem: dict[tuple[str, int | None], str] = {}  # why its read failed
        self.nodes: dict[str, Mapping[str, Any] | None] = {}
        # DRA: a pod's allocated ResourceClaims and its node's ResourceSlices (None: unreadable).
        self.claims: dict[str, Mapping[str, Any] | None] = {}
        self.slices: dict[str, list[Mapping[str, Any]] | None] = {}
        self.chosen: dict[str, tuple[str, ...]] = {}
        # What each placed model needs for its current spec, and what each copy of it took when
        # it was configured on a pod ((model key, pod key)): a copy a changed spec moves away
        # from keeps its old size until it is unloaded.
        self.planned_needs: dict[str, model_memory.ModelNeeds] = {}
        self.copies: dict[str, dict[str, model_memory.ModelNeeds]] = {}  # model -> pod -> needs
        # Copies out of their Service whose unload has not finished: still in the pod's memory.
        self.releasing: dict[tuple[str, str], model_memory.ModelNeeds] = {}
        # Copies left on pods by deleted or moved models: pod key -> model key -> copy.
        self.left: dict[str, dict[str, LeftCopy]] = {}
        self.shortfalls: dict[str, placement.Shortfall] = {}
        # Namespace -> its pods' room as the last placement there counted it (for metrics).
        self.room: dict[str, list[metrics.PodRoom]] = {}
        self.waiting: dict[str, str] = {}
        # Models whose current spec has not been placed yet (its needs are being read): their
        # chosen pods are those of an earlier spec, not to be reconfigured.
        self.unplanned: set[str] = set()
        self._services: dict[str, str] = {}  # target key -> uid its Service was applied for
        self._reading: set[object] = set()
        # Reads that failed for a reason a retry may change (not a refusal), until their retry.
        self._failed_reads: set[object] = set()
        self._waiters: dict[object, set[str]] = {}  # what is being read -> namespaces waiting
        # One settle or clean-up per model at a time: a label patch in flight must not land
        # after the model's labels were taken off for its deletion.
        self._locks: dict[str, asyncio.Lock] = {}
        self.leaving: set[str] = set()  # models being deleted: never placed or labelled again
        self._tasks: set[asyncio.Task[None]] = set()
        self.reads = 0  # registry/Node reads, for benchmarks

    # --- planning (sync, from the controller's reassignment) ------------------------------------

    def replan(self, namespace: str) -> None:
        controller = self.controller
        targets = [
            target
            for target in controller.targets_in(namespace)
            if is_placed(target) and target.key not in self.leaving
        ]
        for key in [k for k in self.chosen if k.startswith(f"{namespace}/")]:
            known = controller.targets.get(key)
            if known is None or not is_placed(known):
                self.forget(key)
        if targets:
            self._replan_namespace(namespace, targets)
        else:
            self.room.pop(namespace, None)

    def _replan_namespace(self, namespace: str, targets: list[ModelTarget]) -> None:
        """One placement for the namespace's placed models: pools whose selectors overlap
        share their pods, and each pod is counted once."""
        controller = self.controller
        pools = {target.key: pool_key(target) for target in targets}
        examples = {pool: target for target in targets for pool in [pools[target.key]]}
        members: list[tuple[runner_views.Runner, frozenset[str]]] = []
        for runner in controller.pods_in(namespace):
            if runner.ready:
                member = frozenset(
                    pool
                    for pool, example in examples.items()
                    if controller.in_pool(example, runner)
                )
                if member:
                    members.append((runner, member))
        self._forget_left_copies_gone_with_their_runner(namespace)
        budgets = [self._budget(runner) for runner, _ in members]
        if any(budget is None for budget in budgets):
            # A Node is still being read: placing without that pod would move models off it
            # (after an operator restart, off pods that serve them) only to move them back.
            return
        demands = []
        for target in targets:
            pool = pools[target.key]
            needs = self._needs(target, [runner for runner, member in members if pool in member])
            if needs is None:
                if target.key not in self.unplanned:
                    self.unplanned.add(target.key)
                    controller.status.mark(target.key)
                continue
            self.unplanned.discard(target.key)
            self.planned_needs[target.key] = needs
            spec = target.spec
            assert spec is not None and spec.placement is not None
            demands.append(
                placement.ModelDemand(
                    key=target.key,
                    pool=pool,
                    replicas=int(spec.placement.replicas or 0),
                    needs=needs,
                )
            )
        by_label = {model_routing.placement_label(target.name): target for target in targets}
        everywhere = [
            target
            for target in controller.targets_in(namespace)
            if target.valid
            and not target.url
            and not is_placed(target)
            and target.key not in controller.conflicts
        ]
        heirs = {t.normalized: t for t in [*everywhere, *targets] if t.normalized}
        pods = []
        for (runner, member), budget in zip(members, budgets, strict=True):
            assert budget is not None
            holdings = self._holdings(runner, budget, by_label, everywhere, heirs)
            if holdings is None:
                return  # the size of a copy it holds is being read: nothing is guessed
            pods.append(dataclasses.replace(budget, pools=member, holdings=holdings))
        result = placement.place(demands, pods, previous=self.chosen)
        self.room[namespace] = [
            metrics.PodRoom(
                namespace=namespace,
                pod=pod.key.split("/", 1)[1],
                memory_bytes=pod.memory_bytes if pod.memory_bytes < UNKNOWN_MEMORY else None,
                placed_bytes=pod.memory_bytes - result.free_memory_bytes[pod.key],
                slots=pod.slots,
                placed_slots=pod.slots - result.free_slots[pod.key],
            )
            for pod in pods
        ]
        for demand in demands:
            chosen = result.pods.get(demand.key, ())
            shortfall = result.shortfalls.get(demand.key)
            before = (self.chosen.get(demand.key), self.shortfalls.get(demand.key))
            if before != (chosen, shortfall):
                controller.status.mark(demand.key)
            self.chosen[demand.key] = chosen
            if shortfall is None:
                self.shortfalls.pop(demand.key, None)
            else:
                self.shortfalls[demand.key] = shortfall

    def _holdings(
        self,
        runner: runner_views.Runner,
        budget: placement.RunnerPod,
        by_label: Mapping[str, ModelTarget],
        everywhere: list[ModelTarget],
        heirs: Mapping[str, ModelTarget],
    ) -> dict[str, int] | None:
        """What the pod holds now, model key -> bytes, for placement to count until it is gone:
        the placed models it serves (its placement labels; each with the needs it was
        configured with, so a copy that no longer fits is counted until unloaded), the ones
        being unloaded, the copies left there (as the DMRModel of the same model in ``heirs``
        if there is one: its copy already), and the models of its pools without placement (on
        every pod). None while a size is being read. A size that cannot be read counts nothing
        (the model says why in its own status) but still takes its runner slot."""
        held: dict[str, int] = {}
        sizes: list[tuple[str, model_memory.ModelNeeds | None]] = []
        for label, value in runner.labels.items():
            target = by_label.get(label) if value == "true" else None
            if target is not None:
                copy = self.copies.get(target.key, {}).get(runner.key)
                sizes.append((target.key, copy or self._needs(target, [runner])))
        for (model_key, pod_key), needs in self.releasing.items():
            if pod_key == runner.key:
                sizes.append((model_key, needs))
        for model_key, left in self.left.get(runner.key, {}).items():
            heir = heirs.get(left.reference)
            # Without an heir, under a key no model has: a DMRModel created again under the
            # deleted one's name, for another model, must not pass for its holder.
            sizes.append((heir.key if heir else f"{model_key} (left)", left.needs))
        for target in everywhere:
            if self.controller.in_pool(target, runner):
                sizes.append((target.key, self._needs(target, [runner])))
        for model_key, size in sizes:
            if size is None:
                if self._reading_needs(model_key):
                    return None
                held.setdefault(model_key, 0)
            else:  # the same copy seen twice (a left copy its heir serves): the larger counts
                on_pod = size.on_pod(budget.gpu_memory_bytes)
                held[model_key] = max(held.get(model_key, 0), on_pod)
        return held

    def _reading_needs(self, model_key: str) -> bool:
        """Whether a size of the model's is being read (rather than known to be unreadable)."""
        target = self.controller.targets.get(model_key)
        if target is None or target.spec is None:
            return False
        references = [target.normalized, *([target.draft] if target.draft else [])]
        return any(
            ("needs", (reference, target.spec.context_size)) in self._reading
            for reference in references
        )

    def _budget(self, runner: runner_views.Runner) -> placement.RunnerPod | None:
        """The pod's memory and runner slots (its pools and holdings are the caller's). None
        while its Node is being read."""
        if runner.node is None:  # a Ready pod is always bound; be safe anyway
            return placement.RunnerPod(
                key=runner.key,
                pools=frozenset(),
                node="",
                slots=0,
                gpu_memory_bytes=0,
                host_memory_bytes=0,
            )
        if runner.node not in self.nodes:
            self._read_node(runner.node, runner.namespace)
            return None
        node = self.nodes[runner.node]
        claimed: int | None = None
        if runner.claims:
            keys = [f"{runner.namespace}/{name}" for name in runner.claims]
            unread = [key for key in keys if key not in self.claims]
            for key in unread:
                self._read_claim(key)
            if runner.node not in self.slices:
                self._read_slices(runner.node, runner.namespace)
            if unread or runner.node not in self.slices:
                return None
            claims = [claim for key in keys if (claim := self.claims[key]) is not None]
            claimed = model_routing.claimed_gpu_memory(claims, self.slices[runner.node] or ())
        budget = (
            model_routing.pod_budget(runner, node, claimed_gpu_memory=claimed)
            if node is not None
            else None
        )
        if budget is None:
            budget = placement.RunnerPod(
                key=runner.key,
                pools=frozenset(),
                node=runner.node,
                slots=capacity.MAX_SLOTS,
                gpu_memory_bytes=0,
                host_memory_bytes=UNKNOWN_MEMORY,
            )
        return budget

    def _needs(
        self, target: ModelTarget, runners: list[runner_views.Runner]
    ) -> model_memory.ModelNeeds | None:
        """The model's needs, with its speculative draft's (loaded beside it, with the same
        context: llama.cpp's --ctx-size-draft defaults to the model's)."""
        spec = target.spec
        assert spec is not None and target.normalized is not None
        references = [target.normalized, *([target.draft] if target.draft else [])]
        parts = [self._needs_of(target, ref, spec.context_size, runners) for ref in references]
        if any(part is None for part in parts):
            return None
        self.waiting.pop(target.key, None)
        needs = model_memory.combined([part for part in parts if part is not None])
        share = model_memory.vllm_gpu_share(spec)
        return dataclasses.replace(needs, gpu_share=share) if share is not None else needs

    def _needs_of(
        self,
        target: ModelTarget,
        reference: str,
        context_size: int | None,
        runners: list[runner_views.Runner],
    ) -> model_memory.ModelNeeds | None:
        key = (reference, context_size)
        needs = self.needs.get(key)
        if needs is not None:
            return needs
        if ("needs", key) in self._failed_reads:
            self._wait(target, self._needs_problem[key])
            return None
        if not runners:
            self._wait(target, "waiting for a Ready runner of its pool to read its size from")
            return None
        self._wait(target, f"reading the size of {reference} from the registry")
        self._read_needs(key, runners[0], target.namespace)
        return None

    def _wait(self, target: ModelTarget, why: str) -> None:
        if self.waiting.get(target.key) != why:
            self.waiting[target.key] = why
            self.controller.status.mark(target.key)

    # --- reads (async, once each) ---------------------------------------------------------------

    def _spawn(self, what: object, coroutine: Any, namespace: str) -> None:
        """Run one read of ``what`` at a time; when it is done, the namespaces that waited for
        it are planned again (only those: with 50 namespaces, replanning every one after each
        of 200 size reads was most of the operator's CPU). A read that failed is not run again
        before its retry time (``_read_failed``)."""
        self._waiters.setdefault(what, set()).add(namespace)
        if what in self._reading or what in self._failed_reads:
            coroutine.close()
            return
        self._reading.add(what)

        async def run() -> None:
            try:
                await coroutine
            finally:
                self._reading.discard(what)
                self._replan(self._waiters.pop(what, set()))

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_node(self, name: str, namespace: str) -> None:
        async def read() -> None:
            self.reads += 1
            try:
                # None (e.g. rbac.readNodes off): placed on by runner slots alone.
                self.nodes[name] = await self.controller.node(name)
            except kube_client.KubeError as error:
                self._read_failed(("node", name), namespace, f"node {name}: {error}")

        self._spawn(("node", name), read(), namespace)

    def _read_failed(self, what: object, namespace: str, problem: str) -> None:
        """A read that may succeed later (an apiserver restarting, a timeout, a registry that
        does not answer): what it concerns waits (the pods are not placed on, the model is not
        placed), and it is tried again in a while."""
        logger.warning(
            "placement waits for %s; asking again in %.0f s", problem, NEEDS_RETRY_SECONDS
        )
        self._failed_reads.add(what)

        def again() -> None:
            self._failed_reads.discard(what)
            self._replan({namespace} | self._waiters.get(what, set()))

        asyncio.get_running_loop().call_later(NEEDS_RETRY_SECONDS, again)

    def _read_claim(self, key: str) -> None:
        namespace, name = key.split("/", 1)

        async def read() -> None:
            self.reads += 1
            try:
                claim = await self.controller.kube.get(
                    api_version="resource.k8s.io/v1",
                    kind="ResourceClaim",
                    namespace=namespace,
                    name=name,
                )
            except kube_client.KubeError as error:
                if not kube_client.refused_for_good(error):
                    self._read_failed(("claim", key), namespace, f"claim {key}: {error}")
                    return
                logger.info("claim %s unreadable, its GPUs' memory unknown: %s", key, error)
                claim = None
            # An allocation never changes once the pod runs: read once, kept.
            self.claims[key] = claim if isinstance(claim, Mapping) else None

        self._spawn(("claim", key), read(), namespace)

    def _read_slices(self, node: str, namespace: str) -> None:
        async def read() -> None:
            self.reads += 1
            slices: list[Mapping[str, Any]] | None
            try:
                found = await self.controller.kube.request(
                    "GET",
                    "/apis/resource.k8s.io/v1/resourceslices",
                    params={"fieldSelector": f"spec.nodeName={node}"},
                )
                slices = list((found or {}).get("items") or ())
            except kube_client.KubeError as error:
                if not kube_client.refused_for_good(error):
                    self._read_failed(("slices", node), namespace, f"slices of {node}: {error}")
                    return
                logger.info("resource slices of %s unreadable: %s", node, error)
                slices = None
            self.slices[node] = slices

        self._spawn(("slices", node), read(), namespace)

    def _read_needs(
        self, key: tuple[str, int | None], runner: runner_views.Runner, namespace: str
    ) -> None:
        reference, context_size = key

        async def read() -> None:
            self.reads += 1
            assert runner.base_url is not None
            client = modelrunner.ModelRunnerClient(self.controller.http, runner.base_url)
            needs = None
            try:
                model = await client.get_model(reference, remote=True)
                if model is None or model.config.size is None:
                    model = await client.get_model(reference) or model
                if model is not None:
                    needs = model_memory.needs_of(model, context_size=context_size)
                problem = None if needs else f"runner {runner.name} knows no size of {reference}"
            except modelrunner.RunnerError as error:
                problem = f"could not read the size of {reference} from {runner.name}: {error}"
            if needs is not None:
                self.needs[key] = needs
                self._needs_problem.pop(key, None)
            else:
                self._needs_problem[key] = f"{problem}; asking again in 30 s"
                self._read_failed(("needs", key), namespace, str(problem))

        self._spawn(("needs", key), read(), namespace)

    def _replan(self, namespaces: set[str]) -> None:
        for namespace in sorted(namespaces):
            self.controller.namespace_changed(namespace)

    # --- what the controller and the status writer ask ------------------------------------------

    def runners_for(self, target: ModelTarget) -> list[runner_views.Runner]:
        """The Ready pods chosen for the model's current spec."""
        if target.key in self.unplanned:
            return []
        chosen = set(self.chosen.get(target.key, ()))
        return [
            runner
            for runner in self.controller.pods_in(target.namespace)
            if runner.ready and runner.key in chosen
        ]

    @staticmethod
    def labelled(target: ModelTarget, runner: runner_views.Runner) -> bool:
        return runner.labels.get(model_routing.placement_label(target.name)) == "true"

    def view(self, target: ModelTarget) -> PlacementSummary:
        spec = target.spec
        assert spec is not None and spec.placement is not None
        pods = self.controller.pods
        chosen = self.chosen.get(target.key, ())
        shortfall = self.shortfalls.get(target.key)
        return PlacementSummary(
            wanted=int(spec.placement.replicas or 0),
            chosen=tuple(
                (key.split("/", 1)[-1], pods[key].node if key in pods else None) for key in chosen
            ),
            serving=sum(1 for key in chosen if key in pods and self.labelled(target, pods[key])),
            shortfall=placement.shortfall_message(shortfall) if shortfall else None,
            waiting=self.waiting.get(target.key)
            if target.key in self.unplanned or target.key not in self.chosen
            else None,
            endpoint=model_routing.model_service_endpoint(target.name, target.namespace),
        )

    async def settle(self, target: ModelTarget) -> None:
        """Label the chosen pods the model is configured on; once all are, let the others go."""
        async with self._locks.setdefault(target.key, asyncio.Lock()):
            if target.key not in self.leaving:
                await self._settle(target)

    async def _settle(self, target: ModelTarget) -> None:
        controller = self.controller
        chosen = self.chosen.get(target.key)
        if chosen is None:
            return
        await self._ensure_service(target)
        label = model_routing.placement_label(target.name)
        configured = []
        needs = None if target.key in self.unplanned else self.planned_needs.get(target.key)
        for key in chosen:
            runner = controller.pods.get(key)
            done = controller.placements.get((target.key, key))
            if runner is None or done is None or done.state != "Configured":
                continue
            configured.append(key)
            if needs is not None and controller.configured_as(target, key):
                self.copies.setdefault(target.key, {})[key] = needs  # the old size is gone
            if not self.labelled(target, runner):
                await controller.relabel(runner, {label: "true"})
        if len(configured) < len(chosen) or not chosen:
            return  # the old copies serve until every new one does
        for runner in controller.pods_in(target.namespace):
            if runner.key not in chosen and self.labelled(target, runner):
                await self._release(target, runner, label)

    async def _release(self, target: ModelTarget, runner: runner_views.Runner, label: str) -> None:
        """Out of the Service first, then out of memory: no request meets an unload. Until the
        unload is done, the copy still counts on the pod."""
        pair = (target.key, runner.key)
        copies = self.copies.get(target.key, {})
        needs = copies.get(runner.key) or self.planned_needs.get(target.key)
        if needs is not None:
            self.releasing[pair] = needs
        left = None
        try:
            await self.controller.relabel(runner, {label: None})
            copies.pop(runner.key, None)
            left = await self.controller.release(target, runner)
        finally:
            if (released := self.releasing.pop(pair, None)) is not None:
                if left is not None:
                    self._leave(target, runner.key, left, released)
                self.controller.namespace_changed(runner.namespace)

    async def forget_labels(self, target: ModelTarget) -> None:
        """A deleted model: its label comes off every pod (its Service goes with it). Its
        copies count on their pods until ``unloaded`` says the finalizer is done with them."""
        self.leaving.add(target.key)
        label = model_routing.placement_label(target.name)
        async with self._locks.setdefault(target.key, asyncio.Lock()):
            for runner in self.controller.pods_in(target.namespace):
                if self.labelled(target, runner):
                    copy = self.copies.get(target.key, {}).get(runner.key)
                    needs = copy or self.planned_needs.get(target.key)
                    if needs is not None:
                        self.releasing[(target.key, runner.key)] = needs
                    await self.controller.relabel(runner, {label: None})
        self.forget(target.key)
        self._locks.pop(target.key, None)

    def unloaded(self, target: ModelTarget, left: Mapping[str, str] | None = None) -> None:
        """The finalizer is done with a deleted model: its memory is free, except on the pods
        in ``left`` (pod key -> the model's digest there), where its copy stays."""
        pairs = [pair for pair in self.releasing if pair[0] == target.key]
        for pair in pairs:
            needs = self.releasing.pop(pair)
            digest = (left or {}).get(pair[1])
            if digest:
                self._leave(target, pair[1], digest, needs)
        if pairs:
            self.controller.namespace_changed(target.namespace)

    def _leave(
        self, target: ModelTarget, pod_key: str, digest: str, needs: model_memory.ModelNeeds
    ) -> None:
        runner = self.controller.pods.get(pod_key)
        if runner is None or target.normalized is None:
            return  # the pod is gone, and its memory with it
        logger.info(
            "%s stays configured on %s: it counts there until the runner no longer lists it",
            target.normalized,
            pod_key,
        )
        self.left.setdefault(pod_key, {})[target.key] = LeftCopy(
            target.normalized, digest, needs, runner.incarnation
        )

    def listed(self, runner: runner_views.Runner, entries: Iterable[wire.ModelConfigEntry]) -> None:
        """A read-back of every configuration the runner holds: the copies left there that it
        no longer lists (unloaded by somebody, or evicted with their configuration) are gone."""
        copies = self.left.get(runner.key)
        if not copies:
            return
        listed = {entry.model_id for entry in entries}
        gone = [key for key, left in copies.items() if left.model_id not in listed]
        for key in gone:
            del copies[key]
        if not copies:
            del self.left[runner.key]
        if gone:
            self.controller.namespace_changed(runner.namespace)

    def rooms(self) -> list[metrics.PodRoom]:
        return [room for rooms in list(self.room.values()) for room in rooms]

    def short_models(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in list(self.shortfalls):
            namespace = key.split("/", 1)[0]
            counts[namespace] = counts.get(namespace, 0) + 1
        return counts

    def holds_left_copies(self, pod_key: str) -> bool:
        return pod_key in self.left

    def _forget_left_copies_gone_with_their_runner(self, namespace: str) -> None:
        pods = self.controller.pods
        for pod_key in [k for k in self.left if k.startswith(f"{namespace}/")]:
            runner = pods.get(pod_key)
            copies = self.left[pod_key]
            for key in [
                k
                for k, left in copies.items()
                if runner is None or runner.incarnation != left.incarnation
            ]:
                del copies[key]  # a restarted runner holds nothing it was given before
            if not copies:
                del self.left[pod_key]

    def forget(self, key: str) -> None:
        self.chosen.pop(key, None)
        self.planned_needs.pop(key, None)
        self.copies.pop(key, None)
        self.shortfalls.pop(key, None)
        self.waiting.pop(key, None)
        self.unplanned.discard(key)
        self._services.pop(key, None)

    async def _ensure_service(self, target: ModelTarget) -> None:
        body = self.controller.bodies.get(target.key) or {}
        uid = str((body.get("metadata") or {}).get("uid") or "")
        if self._services.get(target.key) == uid:
            return
        service = model_routing.render_model_service(
            model_name=target.name,
            namespace=target.namespace,
            pool_labels=selectors.implied_labels(target.pool_selector),
            owner=body,
        )
        await self.controller.kube.apply(service)
        self._services[target.key] = uid

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
