"""The Agent controller: puts the pure Agent logic (``reconcile.agent*``) onto the cluster.

kopf handlers (``handlers.agent``) feed it watch events: Agents, DMRModels, the Agents' workloads,
pods and Services. It keeps an in-memory picture of them and a per-Agent work queue (deduplicated,
coalesced, retried with bounded backoff). One reconcile is ``plan_agent`` (pure: resolution,
rendering, children, status, in D's calling order) followed by the I/O: server-side apply of the
ConfigMap, workload and Service with an owner reference to the Agent, the sidecar models handed
to ``controllers.dmrmodels`` (which configures them on the Agent's own pods), status and Events.

Steady state costs no write: every child carries the hash of what was applied
(``dmr.dev/applied-hash``), remembered in memory and, after an operator restart, compared with the
live child (one GET); the status is patched only when it differs. Deletion needs no finalizer:
the children are garbage-collected through their owner references.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import pydantic

from dmr_operator import constants
from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.clients import kube as kube_client
from dmr_operator.dmr import references, validation
from dmr_operator.reconcile import agent as agent_models
from dmr_operator.reconcile import agent_config, agent_status, agent_workload, conditions, documents
from dmr_operator.reconcile import runners as runner_views

logger = logging.getLogger(__name__)

APPLIED_HASH_ANNOTATION: Final = f"{constants.GROUP}/applied-hash"
WORKLOAD_KINDS: Final = ("Deployment", "StatefulSet")
CLAIM_TEMPLATE_KIND: Final = "ResourceClaimTemplate"
_APPS: Final = "apps/v1"

ChildKey = tuple[str, str]  # (kind, name) inside the Agent's namespace


@dataclass(frozen=True)
class AgentSettings:
    """Timings; defaults suit production, tests may shorten them."""

    coalesce: float = 0.1
    """Seconds a key waits after an event, so a burst of events costs one reconcile."""
    retry_backoff: tuple[float, float] = (1.0, 60.0)
    """First and longest delay before retrying a reconcile that failed on an API error."""
    parallel: int = 4
    """Agents reconciled at once."""


# --- pure: from watched objects to the inputs of reconcile.agent* ---------------------------------


def served_model(body: Mapping[str, Any]) -> agent_models.ServedModel:
    """A DMRModel object as the Agent logic sees it: spec for what is asked, status for the rest."""
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    model = str(status.get("normalizedModel") or "")
    if not model:
        try:
            model = references.normalize_reference(str(spec.get("model") or ""))
        except ValueError:
            model = str(spec.get("model") or "")
    try:
        flags = spec.get("runtimeFlags") or validation.split_raw_runtime_flags(
            str(spec.get("rawRuntimeFlags") or "")
        )
    except validation.RunnerValidationError:
        flags = []
    budget = spec.get("thinkingBudget")
    try:
        thinking = validation.reasoning_budget(budget) if budget is not None else None
    except validation.RunnerValidationError:
        thinking = None
    context = spec.get("contextSize")
    return agent_models.ServedModel(
        name=str(metadata.get("name", "")),
        model=model,
        backend=str(status.get("backend") or spec.get("backend") or ""),
        mode=str(spec.get("mode") or validation.default_mode_for_flags(flags)),
        context_size=int(context) if context is not None else None,
        thinking_budget=thinking,
        ready=status.get("phase") == "Ready",
        endpoint=status.get("endpoint"),
        created=str(metadata.get("creationTimestamp", "")),
    )


def pod_facts(body: Mapping[str, Any]) -> agent_status.PodFacts:
    status = body.get("status") or {}
    by_type = {c.get("type"): c for c in status.get("conditions") or ()}
    return agent_status.PodFacts(
        name=str((body.get("metadata") or {}).get("name", "")),
        phase=str(status.get("phase") or "Pending"),
        ready=(by_type.get("Ready") or {}).get("status") == "True",
        unschedulable_message=runner_views.unschedulable_message(body),
    )


def owner_reference(agent: Mapping[str, Any]) -> dict[str, Any]:
    metadata = agent.get("metadata") or {}
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.AGENT_KIND,
        "name": metadata.get("name"),
        "uid": metadata.get("uid"),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_child(
    child: Mapping[str, Any], *, agent: Mapping[str, Any]
) -> tuple[dict[str, Any], str]:
    """The child with its owner reference and the hash of it all as an annotation."""
    body = copy.deepcopy(dict(child))
    metadata = body["metadata"]
    metadata["ownerReferences"] = [owner_reference(agent)]
    digest = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    metadata.setdefault("annotations", {})[APPLIED_HASH_ANNOTATION] = digest
    return body, digest


def live_hash(live: Mapping[str, Any] | None) -> str | None:
    """The applied hash a live child carries (None when absent or not ours)."""
    if live is None:
        return None
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(APPLIED_HASH_ANNOTATION)
    return str(value) if value else None


def is_owned_by(live: Mapping[str, Any], agent: Mapping[str, Any]) -> bool:
    uid = (agent.get("metadata") or {}).get("uid")
    owners = (live.get("metadata") or {}).get("ownerReferences") or ()
    return any(o.get("uid") == uid and o.get("controller") for o in owners)


@dataclass(frozen=True)
class AgentPlan:
    """Everything one reconcile of an Agent decided, before any I/O."""

    children: tuple[dict[str, Any], ...]
    """[GPU claim template,] ConfigMap, workload, Service: owned and hashed (``owned_child``)."""
    hashes: tuple[str, ...]
    workload_kind: str | None
    desired_replicas: int
    sidecar_pool: str
    sidecar_models: tuple[str, ...]
    """DMRModel names to configure on the Agent's sidecar pods (empty in Pool mode)."""
    endpoints: frozenset[str]
    """Runner endpoints the Agent's models use in Pool mode (for the shared-runners warning)."""
    status: dict[str, Any]


def plan_agent(
    *,
    agent: Mapping[str, Any],
    served: Sequence[agent_models.ServedModel],
    pods: Sequence[agent_status.PodFacts],
    workloads: Mapping[str, Mapping[str, Any]],
    other_agents_endpoints: Mapping[str, frozenset[str]],
    now: str,
    refused: Mapping[str, str] | None = None,
) -> AgentPlan:
    """The pure part of a reconcile: D's calling order (reconcile.agent*) on the watched facts.

    ``workloads`` are the Agent's live workloads by kind (the status of the one the spec asks
    for gives the ready replicas); ``other_agents_endpoints`` the Pool endpoints of the
    namespace's other Agents; ``refused`` the apiserver's words for children it refused, by
    their hash (a GPU claim template whose device selectors do not compile).
    """
    metadata = agent.get("metadata") or {}
    name, namespace = str(metadata.get("name")), str(metadata.get("namespace"))
    generation = metadata.get("generation")
    previous = agent.get("status") or {}
    pool = agent_workload.sidecar_pool_name(name)
    try:
        spec = agent_api.AgentSpec.model_validate(agent.get("spec") or {})
    except pydantic.ValidationError as error:
        return AgentPlan(
            children=(),
            hashes=(),
            workload_kind=None,
            desired_replicas=0,
            sidecar_pool=pool,
            sidecar_models=(),
            endpoints=frozenset(),
            status=_invalid_spec_status(error, generation, previous, now),
        )
    sidecar = spec.runner.mode == "Sidecar"
    resolution = agent_models.resolve_models(
        spec.config, served, default_model=spec.default_model, require_ready=not sidecar
    )
    config_problems = [
        *agent_workload.runner_problems(spec),
        *agent_config.validate_agent_config(spec.config),
    ]
    env_problems = agent_workload.env_problems(spec)
    rendered = agent_config.render_agent_config(
        spec.config,
        resolution,
        base_url_override=agent_config.SIDECAR_BASE_URL if sidecar else None,
    )
    config_hash = agent_config.config_hash(rendered_config=rendered, spec=spec)
    kind = agent_workload.workload_kind(spec)
    workload = workloads.get(kind) or {}
    # Pool mode holds an Agent at 0 replicas until its models are Ready the first time. Once it
    # serves, a DMRModel leaving Ready for a re-configuration (a spec change) must not take the
    # agent down: the gate stays open and status shows ModelsReady=False meanwhile.
    serving = int((workload.get("spec") or {}).get("replicas") or 0) > 0
    gate_open = resolution.all_ready or serving
    desired = agent_workload.desired_replicas(spec, models_ready=gate_open)
    workload_body = agent_workload.render_workload(
        agent=name,
        namespace=namespace,
        spec=spec,
        config_hash=config_hash,
        models_ready=gate_open,
    )
    _quantities_as_strings(workload_body)
    claim_template = agent_workload.render_claim_template(
        agent=name, namespace=namespace, spec=spec
    )
    raw_children = [
        # First: the pods of a new workload must find their claim template.
        *([claim_template] if claim_template is not None else []),
        agent_workload.render_configmap(agent=name, namespace=namespace, rendered_config=rendered),
        workload_body,
        agent_workload.render_service(agent=name, namespace=namespace),
    ]
    owned = [owned_child(child, agent=agent) for child in raw_children]
    config_problems += [
        f"spec.runner.gpus: the apiserver refused the GPU claim template: {refused[digest]}"
        for _, digest in owned
        if refused and digest in refused
    ]
    endpoints = frozenset(
        m.served.endpoint
        for m in resolution.models
        if not sidecar and m.served is not None and m.served.endpoint
    )
    sharing = sorted(n for n, theirs in other_agents_endpoints.items() if theirs & endpoints)
    status = agent_status.agent_status(
        spec=spec,
        generation=int(generation) if generation is not None else None,
        resolution=resolution,
        config_problems=config_problems,
        env_problems=env_problems,
        replicas=desired,
        ready_replicas=int((workload.get("status") or {}).get("readyReplicas") or 0),
        pods=pods,
        agents_sharing_runners=sharing,
        config_hash=config_hash,
        previous_conditions=previous.get("conditions"),
        now=now,
    )
    if config_problems or env_problems:
        # Nothing is rolled out from a config docker-agent would refuse, and a literal secret
        # must never reach a ConfigMap: the children stay as they were until the spec is fixed.
        owned = []
    return AgentPlan(
        children=tuple(body for body, _ in owned),
        hashes=tuple(digest for _, digest in owned),
        workload_kind=kind if owned else None,
        desired_replicas=desired,
        sidecar_pool=pool,
        sidecar_models=tuple(resolution.served_names()) if sidecar else (),
        endpoints=endpoints,
        status=status,
    )


def _quantities_as_strings(workload: dict[str, Any]) -> None:
    """Resource quantities as strings: server-side apply's typed patch rejects bare numbers.

    Users write ``cpu: 1`` in an Agent's resources; a strategic merge patch would take it,
    server-side apply answers 500 "expected string".
    """
    pod = workload["spec"]["template"]["spec"]
    for container in [*pod["containers"], *pod.get("initContainers", [])]:
        for section in (container.get("resources") or {}).values():
            if isinstance(section, dict):
                for name, value in section.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        section[name] = str(value)


def _invalid_spec_status(
    error: pydantic.ValidationError, generation: Any, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    message = "; ".join(
        f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
    )
    update = conditions.ConditionUpdate
    reason = agent_status.Reason.INVALID_CONFIG
    return {
        "phase": "Failed",
        "observedGeneration": generation,
        "conditions": conditions.merge_conditions(
            previous.get("conditions"),
            [
                update(agent_status.CONFIG_VALID, "False", reason, message),
                update(agent_status.READY, "False", agent_status.Reason.NOT_READY, message),
                conditions.stalled(reason, message),
            ],
            now=now,
            generation=int(generation) if generation is not None else None,
        ),
    }


def status_patch(previous: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch turning ``previous`` into ``status``; None when they are equal."""
    if dict(previous) == dict(status):
        return None
    patch: dict[str, Any] = {key: None for key in previous if key not in status}
    patch.update(status)
    return patch


Event = tuple[str, str, str]  # type, reason, message


def transition_events(previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    """Events a person should see when the status moves from ``previous`` to ``status``."""
    before = {c.get("type"): c for c in previous.get("conditions") or ()}
    after = {c.get("type"): c for c in status.get("conditions") or ()}
    events: list[Event] = []

    def changed(kind: str) -> bool:
        old, new = before.get(kind) or {}, after.get(kind) or {}
        return any(old.get(k) != new.get(k) for k in ("status", "reason", "message"))

    config = after.get(agent_status.CONFIG_VALID) or {}
    if config.get("status") == "False" and changed(agent_status.CONFIG_VALID):
        events.append(("Warning", str(config.get("reason")), str(config.get("message"))))
    models = after.get(agent_status.MODELS_READY) or {}
    if models.get("status") == "True" and (
        (before.get(agent_status.MODELS_READY) or {}).get("status") != "True"
    ):
        events.append(
            (
                "Normal",
                agent_status.Reason.MODELS_READY,
                f"models {status.get('readyModels')} Ready: docker-agent scaled to "
                f"{status.get('replicas')} replica(s)",
            )
        )
    elif (
        models.get("status") == "False"
        and models.get("reason") != agent_status.Reason.MODELS_NOT_READY
        and changed(agent_status.MODELS_READY)
    ):
        events.append(("Warning", str(models.get("reason")), str(models.get("message"))))
    old_hash, new_hash = previous.get("configHash"), status.get("configHash")
    if old_hash and new_hash and old_hash != new_hash:
        events.append(
            (
                "Normal",
                "RollingOut",
                f"configuration changed (config hash {old_hash} -> {new_hash}): rolling the pods",
            )
        )
    if status.get("phase") == "Ready" and previous.get("phase") != "Ready":
        events.append(("Normal", "Ready", f"{status.get('readyOfDesired')} pods Ready"))
    seen = set(previous.get("warnings") or ())
    for warning in status.get("warnings") or ():
        if warning not in seen:
            reason = "Unschedulable" if "cannot be scheduled" in warning else "ConfigWarning"
            events.append(("Warning", reason, str(warning)))
    return events


# --- the work queue ---------------------------------------------------------------------------


class WorkQueue:
    """Keys to process: deduplicated, coalesced, one run per key at a time, bounded backoff.

    ``process(key)`` returns normally on success; any exception schedules a retry after an
    exponential delay capped by ``backoff[1]``. A key enqueued while it runs runs again after.
    """

    def __init__(
        self,
        process: Callable[[str], Awaitable[None]],
        *,
        coalesce: float,
        backoff: tuple[float, float],
        parallel: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process = process
        self._coalesce = coalesce
        self._backoff = backoff
        self._clock = clock
        self._slots = asyncio.Semaphore(parallel)
        self._due: dict[str, float] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    def add(self, key: str) -> None:
        due = max(self._clock() + self._coalesce, self._retry_at.get(key, 0.0))
        self._due[key] = min(self._due.get(key, due), due)
        self._wake.set()

    def forget(self, key: str) -> None:
        self._due.pop(key, None)
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)

    def pending(self) -> bool:
        return bool(self._due or self._running)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="agent-queue")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            now = self._clock()
            for key in [k for k, at in self._due.items() if at <= now and k not in self._running]:
                del self._due[key]
                self._running[key] = asyncio.get_running_loop().create_task(
                    self._one(key), name=f"agent:{key}"
                )
            waiting = [at for k, at in self._due.items() if k not in self._running]
            timeout = max(0.0, min(waiting) - now) if waiting else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()

    async def _one(self, key: str) -> None:
        try:
            async with self._slots:
                self.runs += 1
                await self._process(key)
            self._failures.pop(key, None)
            self._retry_at.pop(key, None)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            attempts = self._failures.get(key, 0)
            self._failures[key] = attempts + 1
            first, longest = self._backoff
            delay = min(longest, first * 2 ** min(attempts, 20))
            api_error = isinstance(error, kube_client.KubeError)
            logger.log(
                logging.WARNING if api_error else logging.ERROR,
                "agent %s: %s (retry in %.0fs)",
                key,
                error,
                delay,
                exc_info=not api_error,
            )
            retry_at = self._clock() + delay
            self._retry_at[key] = retry_at
            # Events that came meanwhile wait for the retry too: failures never spin.
            self._due[key] = max(self._due.get(key, 0.0), retry_at)
        finally:
            self._running.pop(key, None)
            self._wake.set()


# --- the controller ---------------------------------------------------------------------------


class SidecarModels(Protocol):
    """The part of ``DMRModelController`` that configures models on Agents' sidecar pods."""

    def set_sidecar_models(self, namespace: str, pool: str, model_names: Iterable[str]) -> None: ...


@dataclass
class _AgentState:
    body: Mapping[str, Any]
    applied: dict[ChildKey, str] = field(default_factory=dict)
    """Hash last applied (or seen live) per child; "" = known absent."""
    workload_generation: int = 0
    """metadata.generation of the workload after our last apply: newer means someone else."""
    endpoints: frozenset[str] = frozenset()
    seen: bool = False
    """Reconciled at least once by this process."""
    config_data: dict[str, Any] | None = None
    """The ConfigMap data last applied or found in sync (to tell a foreign edit from an echo)."""
    refused: dict[str, str] = field(default_factory=dict)
    """The apiserver's words for children it refused, by hash: not tried again until the spec
    (and so the hash) changes."""
    claim_templates: set[str] = field(default_factory=set)
    """Names of the GPU claim templates of ours that exist; all but the current one go."""


class AgentController:
    """In-memory picture of Agents and what they depend on, and the queue that reconciles them."""

    def __init__(
        self,
        *,
        kube: kube_client.KubeClient,
        dmrmodels: SidecarModels | None,
        settings: AgentSettings | None = None,
    ) -> None:
        self.kube = kube
        self.dmrmodels = dmrmodels
        self.settings = settings or AgentSettings()
        self.agents: dict[str, _AgentState] = {}
        self.served: dict[str, dict[str, agent_models.ServedModel]] = {}
        self.workloads: dict[tuple[str, str], Mapping[str, Any]] = {}  # (kind, "ns/name")
        self.pods: dict[str, dict[str, agent_status.PodFacts]] = {}  # "ns/agent" -> pod -> facts
        self._primed_namespaces: set[str] = set()
        # Parallel first reconciles in one namespace share one DMRModel listing.
        self._priming: dict[str, asyncio.Lock] = {}
        self.writes = 0
        self.queue = WorkQueue(
            self.reconcile,
            coalesce=self.settings.coalesce,
            backoff=self.settings.retry_backoff,
            parallel=self.settings.parallel,
        )

    # --- inputs from kopf handlers --------------------------------------------------------------

    def agent_changed(self, body: Mapping[str, Any]) -> None:
        body = documents.without_managed_fields(body)
        key = _key(body)
        state = self.agents.get(key)
        if state is None:
            self.agents[key] = _AgentState(body=body)
            self.queue.add(key)
            return
        old, new = state.body.get("metadata") or {}, body.get("metadata") or {}
        state.body = body
        if old.get("uid") != new.get("uid"):
            self.agents[key] = _AgentState(body=body)
        if (old.get("uid"), old.get("generation")) != (new.get("uid"), new.get("generation")):
            self.queue.add(key)
        # Otherwise: our own status write, or labels: nothing to reconcile.

    def agent_gone(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        state = self.agents.pop(key, None)
        self.queue.forget(key)
        if self.dmrmodels is not None:
            self.dmrmodels.set_sidecar_models(namespace, agent_workload.sidecar_pool_name(name), ())
        if state is not None and state.endpoints:
            self._namespace_changed(namespace)

    def dmrmodel_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        metadata = body.get("metadata") or {}
        namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
        models = self.served.setdefault(namespace, {})
        before = models.get(name)
        if deleted:
            models.pop(name, None)
        else:
            models[name] = served_model(body)
        if models.get(name) != before:
            # Any Agent may pick it (auto) or use it: resolution is cheap and unchanged output
            # costs no write, so every Agent of the namespace is looked at again.
            self._namespace_changed(namespace)

    def workload_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        metadata = body.get("metadata") or {}
        key = _key(body)
        agent = _agent_key_of(body)
        kind = str(body.get("kind") or "")
        if deleted:
            self.workloads.pop((kind, key), None)
        else:
            self.workloads[(kind, key)] = documents.without_managed_fields(body)
        state = self.agents.get(agent) if agent else None
        if state is None or agent is None:
            return
        child = (kind, str(metadata.get("name")))
        # Our applies record the generation they produced: a newer one is someone else's edit
        # (kubectl scale, an HPA...), so the workload is applied again.
        if deleted or _generation(body) > state.workload_generation:
            state.applied.pop(child, None)
        self.queue.add(agent)

    def pod_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        agent = _agent_key_of(body)
        if agent is None:
            return
        facts = pod_facts(body)
        pods = self.pods.setdefault(agent, {})
        gone = deleted or bool((body.get("metadata") or {}).get("deletionTimestamp"))
        if gone:
            changed = pods.pop(facts.name, None) is not None
        else:
            changed = pods.get(facts.name) != facts
            pods[facts.name] = facts
        if not pods:
            self.pods.pop(agent, None)
        if changed and agent in self.agents:
            self.queue.add(agent)

    def configmap_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """Someone edited or deleted an Agent's rendered config: apply ours again.

        Compared with the data this process applied or found in sync, so the echo of our own
        apply (and the initial listing after a restart) is no change.
        """
        agent = _agent_key_of(body)
        state = self.agents.get(agent) if agent else None
        if state is None or agent is None:
            return
        ours = state.config_data
        if deleted or (ours is not None and dict(body.get("data") or {}) != ours):
            state.applied.pop(("ConfigMap", str(body["metadata"]["name"])), None)
            self.queue.add(agent)

    def service_changed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        agent = _agent_key_of(body)
        state = self.agents.get(agent) if agent else None
        if deleted and state is not None and agent is not None:
            state.applied.pop(("Service", str(body["metadata"]["name"])), None)
            self.queue.add(agent)

    def _namespace_changed(self, namespace: str) -> None:
        for key in self.agents:
            if key.startswith(f"{namespace}/"):
                self.queue.add(key)

    # --- one reconcile --------------------------------------------------------------------------

    async def reconcile(self, key: str) -> None:
        state = self.agents.get(key)
        if state is None:
            return
        namespace, name = key.split("/", 1)
        if not state.seen:
            await self._prime(state, key, namespace, name)
        agent = state.body
        others = {
            other.split("/", 1)[1]: s.endpoints
            for other, s in self.agents.items()
            if other != key and other.startswith(f"{namespace}/")
        }
        while True:
            plan = plan_agent(
                agent=agent,
                served=list(self.served.get(namespace, {}).values()),
                pods=sorted(self.pods.get(key, {}).values(), key=lambda p: p.name),
                workloads={
                    kind: body
                    for kind in WORKLOAD_KINDS
                    if (body := self.workloads.get((kind, key))) is not None
                },
                other_agents_endpoints=others,
                now=kube_client.now_rfc3339(),
                refused=state.refused,
            )
            if self.dmrmodels is not None:
                self.dmrmodels.set_sidecar_models(namespace, plan.sidecar_pool, plan.sidecar_models)
            wrote = await self._ensure_children(state, plan)
            if wrote is not None:
                break
            # The apiserver refused a child: plan again, with its words in the status.
        if plan.workload_kind is not None:
            for stale in WORKLOAD_KINDS:
                if stale != plan.workload_kind:
                    wrote.append(await self._remove_stale(state, stale, namespace, name))
            wrote += await self._remove_stale_claim_templates(state, plan, namespace)
        if plan.endpoints != state.endpoints:
            state.endpoints = plan.endpoints
            for other in others:
                other_key = f"{namespace}/{other}"
                # Not every Agent of the namespace: N Agents starting would cost N^2 plans.
                if agent_status.depends_on_other_agents(self.agents[other_key].body):
                    self.queue.add(other_key)
        wrote.append(await self._write_status(key, state, plan.status))
        if not state.seen:
            # The first look after a start: says whether the cluster was already up to date.
            state.seen = True
            logger.info("agent %s: %s", key, "reconciled" if any(wrote) else "in sync")

    async def _prime(self, state: _AgentState, key: str, namespace: str, name: str) -> None:
        """Read what the first reconcile depends on, whatever the watches delivered so far.

        After an operator start, kopf's watches of Agents, DMRModels, workloads and pods arrive
        in any order: planning before the namespace's DMRModels are known would apply a
        configuration without models (scaling the agent to 0) and write a status of 0 ready pods,
        only to undo both a moment later. Reads only, once per Agent (and per namespace).
        """
        async with self._priming.setdefault(namespace, asyncio.Lock()):
            if namespace not in self._primed_namespaces:
                listing = await self.kube.request(
                    "GET",
                    f"/apis/{constants.API_VERSION}/namespaces/{namespace}/"
                    f"{constants.DMRMODEL_PLURAL}",
                )
                served = self.served.setdefault(namespace, {})
                for item in (listing or {}).get("items") or ():
                    served.setdefault(str(item["metadata"]["name"]), served_model(item))
                self._primed_namespaces.add(namespace)
        listing = await self.kube.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            params={"labelSelector": f"{constants.AGENT_LABEL}={name}"},
        )
        pods = self.pods.setdefault(key, {})
        for item in (listing or {}).get("items") or ():
            if not item["metadata"].get("deletionTimestamp"):
                facts = pod_facts(item)
                pods.setdefault(facts.name, facts)
        if _asks_for_dra_claims(state.body):
            # Claim templates of ours from before this process (a GPU request changed meanwhile).
            templates = None
            with contextlib.suppress(kube_client.NotFound):  # no DRA here: the apply says so
                templates = await self.kube.request(
                    "GET",
                    f"/apis/{agent_workload.RESOURCE_API_VERSION}/namespaces/{namespace}/"
                    "resourceclaimtemplates",
                    params={"labelSelector": f"{constants.AGENT_LABEL}={name}"},
                )
            state.claim_templates.update(
                str(item["metadata"]["name"])
                for item in (templates or {}).get("items") or ()
                if is_owned_by(item, state.body)
            )
        for kind in WORKLOAD_KINDS:
            if (kind, key) not in self.workloads:
                live = await self.kube.get(
                    api_version=_APPS, kind=kind, namespace=namespace, name=name
                )
                if live is not None:
                    self.workloads[(kind, key)] = live
                else:
                    # Known absent: no second read before creating it or deciding it is not
                    # stale. If it appears meanwhile, workload_changed forgets this.
                    state.applied.setdefault((kind, name), "")

    async def _ensure_children(self, state: _AgentState, plan: AgentPlan) -> list[bool] | None:
        """Apply the plan's children in order; None when the apiserver refused a claim template
        (remembered in ``state.refused``; the rest is not applied)."""
        wrote = []
        for child, digest in zip(plan.children, plan.hashes, strict=True):
            try:
                wrote.append(await self._ensure_child(state, child, digest))
            except kube_client.KubeError as error:
                if child["kind"] != CLAIM_TEMPLATE_KIND or error.status not in (404, 422):
                    raise
                state.refused[digest] = (
                    "this cluster does not serve resource.k8s.io/v1 (Dynamic Resource "
                    "Allocation needs Kubernetes 1.34 or later)"
                    if error.status == 404
                    else str(error).removeprefix(f"{error.status}: ")
                )
                logger.warning(
                    "agent %s: GPU claim template refused: %s",
                    _key(state.body),
                    state.refused[digest],
                )
                return None
            if child["kind"] == CLAIM_TEMPLATE_KIND:
                state.claim_templates.add(str(child["metadata"]["name"]))
        return wrote

    async def _remove_stale_claim_templates(
        self, state: _AgentState, plan: AgentPlan, namespace: str
    ) -> list[bool]:
        """Delete our claim templates the new pod template no longer names (templates are
        immutable, so a changed GPU request made a new one). Claims already made from them
        belong to their pods and stay."""
        current = {
            str(child["metadata"]["name"])
            for child in plan.children
            if child["kind"] == CLAIM_TEMPLATE_KIND
        }
        deleted = []
        for stale in sorted(state.claim_templates - current):
            await self.kube.delete(
                api_version=agent_workload.RESOURCE_API_VERSION,
                kind=CLAIM_TEMPLATE_KIND,
                namespace=namespace,
                name=stale,
            )
            self.writes += 1
            state.claim_templates.discard(stale)
            logger.info("agent %s: deleted its former claim template %s", _key(state.body), stale)
            deleted.append(True)
        return deleted

    async def _ensure_child(self, state: _AgentState, child: dict[str, Any], digest: str) -> bool:
        """Apply the child unless it is known (or found) to be applied already; True = wrote."""
        kind, metadata = str(child["kind"]), child["metadata"]
        child_key = (kind, str(metadata["name"]))
        remembered = state.applied.get(child_key)
        if kind == "ConfigMap":
            state.config_data = dict(child.get("data") or {})
        if remembered == digest:
            return False
        if remembered is None:
            # A workload was read (or watched) while priming; other children are read now.
            live = self.workloads.get((kind, f"{metadata['namespace']}/{metadata['name']}"))
            if live is None:
                live = await self.kube.get(
                    api_version=child["apiVersion"],
                    kind=kind,
                    namespace=metadata["namespace"],
                    name=metadata["name"],
                )
            if live_hash(live) == digest:  # an operator restart: the cluster already has it
                state.applied[child_key] = digest
                state.workload_generation = max(
                    state.workload_generation, _generation(live) if kind in WORKLOAD_KINDS else 0
                )
                return False
        result = await self.kube.apply(child)
        self.writes += 1
        state.applied[child_key] = digest
        if kind in WORKLOAD_KINDS:
            state.workload_generation = _generation(result)
        logger.info("agent %s: applied %s %s", _key(state.body), kind, metadata["name"])
        return True

    async def _remove_stale(self, state: _AgentState, kind: str, namespace: str, name: str) -> bool:
        """A workload of the other kind (runner.storage changed): delete it if it is ours."""
        child_key = (kind, name)
        if state.applied.get(child_key) == "":
            return False
        if child_key not in state.applied:
            live = self.workloads.get((kind, f"{namespace}/{name}")) or await self.kube.get(
                api_version=_APPS, kind=kind, namespace=namespace, name=name
            )
            if live is None or not is_owned_by(live, state.body):
                state.applied[child_key] = ""
                return False
        await self.kube.delete(api_version=_APPS, kind=kind, namespace=namespace, name=name)
        self.writes += 1
        state.applied[child_key] = ""
        logger.info("agent %s/%s: deleted its former %s", namespace, name, kind)
        return True

    async def _write_status(self, key: str, state: _AgentState, status: dict[str, Any]) -> bool:
        agent = state.body
        previous = dict(agent.get("status") or {})
        patch = status_patch(previous, status)
        if patch is None:
            return False
        metadata = agent["metadata"]
        try:
            await self.kube.patch_status(
                api_version=constants.API_VERSION,
                kind=constants.AGENT_KIND,
                namespace=metadata["namespace"],
                name=metadata["name"],
                status=patch,
            )
        except kube_client.NotFound:
            return False  # deleted meanwhile; its DELETED event cleans up
        self.writes += 1
        # Remember what was written, so the echo of our own write does not look like a change.
        state.body = {**agent, "status": status}
        for type_, reason, message in transition_events(previous, status):
            try:
                await self.kube.post_event(
                    involved=agent, type_=type_, reason=reason, message=message
                )
            except kube_client.KubeError as error:
                logger.warning("event %s on agent %s not recorded: %s", reason, key, error)
        return True

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()


def _key(body: Mapping[str, Any]) -> str:
    metadata = body.get("metadata") or {}
    return f"{metadata.get('namespace')}/{metadata.get('name')}"


def _agent_key_of(body: Mapping[str, Any]) -> str | None:
    metadata = body.get("metadata") or {}
    agent = (metadata.get("labels") or {}).get(constants.AGENT_LABEL)
    return f"{metadata.get('namespace')}/{agent}" if agent else None


def _asks_for_dra_claims(agent: Mapping[str, Any]) -> bool:
    """Whether the Agent's (unvalidated) spec asks for GPUs through an operator-made claim."""
    runner = (agent.get("spec") or {}).get("runner") or {}
    return bool((runner.get("gpus") or {}).get("deviceClassName"))


def _generation(body: Mapping[str, Any] | None) -> int:
    return int(((body or {}).get("metadata") or {}).get("generation") or 0)
