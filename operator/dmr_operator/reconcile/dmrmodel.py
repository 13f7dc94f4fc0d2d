"""DMRModel, pure: from the object to the exact ``_configure`` body, and from results to status.

``target_from_object`` parses and validates a DMRModel with model-runner's own rules (no HTTP call
is ever made for an invalid spec); ``configure_request`` renders the wire JSON for a backend;
``model_status`` summarises what every runner reported into phase, conditions and the printer
columns. ``find_conflicts`` settles which of two DMRModels claiming the same model on the same
runner wins. The controller in ``dmr_operator.controllers.dmrmodels`` drives these.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import pydantic

from dmr_operator import constants
from dmr_operator.api.v1alpha1.dmrmodel import DMRModelSpec, RunnerState
from dmr_operator.dmr import references, validation
from dmr_operator.reconcile import conditions, documents, runners, selectors

DEFAULT_POOL_SELECTOR: Mapping[str, Any] = {
    "matchLabels": {constants.POOL_LABEL: constants.DEFAULT_POOL}
}


class Reason:
    """The fixed vocabulary of condition reasons (documented in the README's troubleshooting)."""

    READY = "Ready"
    PULLED = "Pulled"
    CONFIGURED = "Configured"
    PULLING = "Pulling"
    PULL_QUEUED = "PullQueued"
    CONFIGURING = "Configuring"
    LOADING = "Loading"
    OVER_CAPACITY = "OverCapacity"
    WITHIN_CAPACITY = "WithinCapacity"
    LOAD_FAILED = "LoadFailed"
    NO_RUNNERS = "NoRunners"
    RUNNER_UNREACHABLE = "RunnerUnreachable"
    PULL_FAILED = "PullFailed"
    CONFIG_REJECTED = "ConfigRejected"
    BACKEND_UNAVAILABLE = "BackendUnavailable"
    CONFIG_MISMATCH = "ConfigMismatch"
    RUNNER_BUSY = "RunnerBusy"
    INVALID_SPEC = "InvalidSpec"
    CONFLICT = "Conflict"
    PLACING = "Placing"
    INSUFFICIENT = "Insufficient"


# Failures no retry can fix: the spec (or the pool's image) must change. Stalled for GitOps.
_NEEDS_A_PERSON = frozenset({Reason.CONFIG_REJECTED, Reason.BACKEND_UNAVAILABLE})

# Which failure a person should hear about first when runners disagree.
_REASON_PRIORITY = (
    Reason.INVALID_SPEC,
    Reason.BACKEND_UNAVAILABLE,
    Reason.CONFIG_REJECTED,
    Reason.PULL_FAILED,
    Reason.CONFIG_MISMATCH,
    Reason.LOAD_FAILED,
    Reason.RUNNER_UNREACHABLE,
    Reason.RUNNER_BUSY,
    Reason.PULLING,
    Reason.PULL_QUEUED,
    Reason.CONFIGURING,
    Reason.LOADING,
)


@dataclass(frozen=True)
class ModelTarget:
    """A DMRModel as the controller needs it: identity, parsed spec, and what is wrong with it."""

    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    spec: DMRModelSpec | None
    problems: tuple[str, ...] = ()
    normalized: str | None = None
    draft: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def valid(self) -> bool:
        return self.spec is not None and not self.problems

    @property
    def url(self) -> str | None:
        return self.spec.runners.url if self.spec and self.spec.runners else None

    @property
    def pool_selector(self) -> Mapping[str, Any]:
        if self.spec and self.spec.runners and self.spec.runners.pool_selector:
            return self.spec.runners.pool_selector.to_api()
        return DEFAULT_POOL_SELECTOR

    @functools.cached_property
    def pool_labels(self) -> dict[str, str]:
        """Labels every runner pod of this model's pool carries (what a pool Service selects)."""
        return selectors.implied_labels(self.pool_selector)

    @functools.cached_property
    def fingerprint(self) -> str:
        """What a runner worker compares with what it applied: same object, generation and spec.

        Cached: workers compare it for every model on every pass, and a spec dump is not free.
        A digest of the spec: it is kept per model and per runner that applied it.
        """
        spec = self.spec.model_dump_json() if self.spec else ""
        return f"{self.uid}:{self.generation}:{hashlib.sha256(spec.encode()).hexdigest()[:32]}"

    @property
    def identity(self) -> tuple[str, str, str]:
        """What two DMRModels must not both claim on one runner: model, backend, mode."""
        spec = self.spec
        mode = (spec.mode if spec else None) or "completion"
        return (self.normalized or "", (spec.backend if spec else None) or "", mode)


class _Identity(TypedDict):
    namespace: str
    name: str
    uid: str
    generation: int
    created: str


def target_from_object(
    body: Mapping[str, Any], *, allowed_runner_hosts: Iterable[str] = ()
) -> ModelTarget:
    """Parse and validate a DMRModel object; problems are collected, never raised."""
    metadata = body.get("metadata") or {}
    identity = _Identity(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        uid=str(metadata.get("uid", "")),
        generation=int(metadata.get("generation") or 0),
        created=str(metadata.get("creationTimestamp", "")),
    )
    try:
        spec = DMRModelSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as error:
        return ModelTarget(**identity, spec=None, problems=tuple(_pydantic_problems(error)))
    problems = validate_spec(spec, allowed_runner_hosts=allowed_runner_hosts)
    draft = spec.speculative.draft_model if spec.speculative else None
    return ModelTarget(
        **identity,
        spec=spec,
        problems=tuple(problems),
        normalized=references.normalize_reference(spec.model),
        draft=references.normalize_reference(draft) if draft else None,
    )


def _pydantic_problems(error: pydantic.ValidationError) -> list[str]:
    return [
        f"spec.{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
    ]


def validate_spec(spec: DMRModelSpec, *, allowed_runner_hosts: Iterable[str] = ()) -> list[str]:
    """Every rule the CRD schema cannot express, with model-runner's own messages."""
    problems: list[str] = []

    def check(field_path: str, rule: Any, *args: Any) -> Any:
        try:
            return rule(*args)
        except validation.RunnerValidationError as error:
            problems.append(f"spec.{field_path}: {error}")
            return None

    if spec.runtime_flags and spec.raw_runtime_flags:
        problems.append("spec: runtimeFlags and rawRuntimeFlags are exclusive; pick one")
    flags, flags_field = list(spec.runtime_flags or []), "runtimeFlags"
    if not flags and spec.raw_runtime_flags:
        flags_field = "rawRuntimeFlags"
        flags = check(flags_field, validation.split_raw_runtime_flags, spec.raw_runtime_flags) or []
    if spec.backend is not None and flags:
        check(flags_field, validation.validate_runtime_flags, spec.backend, flags)
    if spec.keep_alive is not None:
        check("keepAlive", validation.parse_keep_alive, spec.keep_alive)
    if spec.thinking_budget is not None:
        check("thinkingBudget", validation.reasoning_budget, spec.thinking_budget)
    if spec.context_size == 0:
        problems.append(
            "spec.contextSize: 0 is ignored by model-runner; use a positive size, or -1 for "
            "unlimited"
        )
    if spec.speculative is not None and spec.backend not in (None, "llama.cpp"):
        problems.append(
            f"spec.speculative: speculative decoding is a llama.cpp feature, not {spec.backend}"
        )
    if spec.backend == "diffusers" and spec.mode != "image-generation":
        problems.append("spec.mode: backend diffusers serves only mode image-generation")
    if spec.vllm is not None:
        if spec.backend not in (None, "vllm"):
            problems.append(f"spec.vllm: vllm options need backend vllm, not {spec.backend}")
        if spec.vllm.hf_overrides is not None:
            check("vllm.hfOverrides", validation.validate_hf_overrides, spec.vllm.hf_overrides)
            problems.extend(
                f"spec.vllm.hfOverrides: key {path!r} is refused: keys starting with '__' reach "
                "Python internals of the model config in vLLM"
                for path in _dunder_keys(spec.vllm.hf_overrides)
            )
        if spec.vllm.gpu_memory_utilization is not None:
            check(
                "vllm.gpuMemoryUtilization",
                validation.validate_gpu_memory_utilization,
                spec.vllm.gpu_memory_utilization,
            )
    if spec.runners is not None:
        if spec.runners.url and spec.runners.pool_selector:
            problems.append("spec.runners: url and poolSelector are exclusive; pick one")
        if spec.runners.url:
            problem = runners.external_url_problem(spec.runners.url, allowed_runner_hosts)
            if problem:
                problems.append(f"spec.{problem}")
        if spec.runners.url and spec.placement and spec.placement.replicas:
            problems.append(
                "spec.placement: placement.replicas chooses pods of a pool: it needs "
                "runners.poolSelector, not url"
            )
    return problems


def _dunder_keys(value: Any) -> list[str]:
    """Keys like ``__class__`` at any depth: valid for model-runner, but vLLM applies
    hf_overrides onto a Python object, so the operator refuses them as a policy."""
    return [path for path, key, _ in documents.iter_keys(value) if key.startswith("__")]


def resolve_backend(spec: DMRModelSpec, model_format: str | None) -> str:
    """The backend to configure: the spec's, else what model-runner picks for the format."""
    if spec.backend:
        return spec.backend
    return validation.default_backend_for_format(model_format or "gguf")


def configure_request(target: ModelTarget, backend: str) -> dict[str, Any]:
    """The ``_configure`` body for ``backend``, in model-runner's exact wire spelling.

    The model is sent in its normalised form: vLLM serves a model under the name used for its
    first load, so one canonical string per model keeps agents and the operator in agreement.
    """
    spec = target.spec
    if spec is None or target.normalized is None:
        raise ValueError(f"DMRModel {target.key} has no valid spec")
    body: dict[str, Any] = {"model": target.normalized}
    if spec.mode:
        body["mode"] = spec.mode
    if spec.context_size is not None:
        body["context-size"] = spec.context_size
    if spec.runtime_flags:
        body["runtime-flags"] = list(spec.runtime_flags)
    elif spec.raw_runtime_flags:
        body["raw-runtime-flags"] = spec.raw_runtime_flags
    if spec.keep_alive is not None:
        body["keep_alive"] = spec.keep_alive
    if spec.speculative is not None and target.draft:
        speculative: dict[str, Any] = {"draft_model": target.draft}
        if spec.speculative.num_tokens is not None:
            speculative["num_tokens"] = spec.speculative.num_tokens
        if spec.speculative.min_acceptance_rate is not None:
            speculative["min_acceptance_rate"] = spec.speculative.min_acceptance_rate
        body["speculative"] = speculative
    if backend == "vllm" and spec.vllm is not None:
        vllm: dict[str, Any] = {}
        if spec.vllm.gpu_memory_utilization is not None:
            vllm["gpu-memory-utilization"] = spec.vllm.gpu_memory_utilization
        if spec.vllm.hf_overrides is not None:
            vllm["hf-overrides"] = spec.vllm.hf_overrides
        body["vllm"] = vllm
    # On vLLM the budget travels per request (Agents render it); only llama.cpp takes it here.
    if backend == "llama.cpp" and spec.thinking_budget is not None:
        body["llamacpp"] = {"reasoning-budget": validation.reasoning_budget(spec.thinking_budget)}
    return body


def config_hash(backend: str, request: Mapping[str, Any]) -> str:
    canonical = json.dumps({"backend": backend, "request": request}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def find_conflicts(
    claims: Mapping[str, tuple[ModelTarget, frozenset[str]]],
) -> dict[str, str]:
    """Targets that lose a claim, mapped to the name of the older DMRModel that keeps it.

    ``claims`` maps a target key to the target and the runner keys it selects. Two valid targets
    conflict when they name the same model, backend and mode and share a runner: the older one
    (creation time, then name) wins, so applying a duplicate never disturbs a working model.
    """
    losers: dict[str, str] = {}
    ordered = sorted(
        (c for c in claims.values() if c[0].valid), key=lambda c: (c[0].created, c[0].name)
    )
    for index, (target, runner_keys) in enumerate(ordered):
        for older, older_runners in ordered[:index]:
            if older.key in losers or older.namespace != target.namespace:
                continue
            if older.identity == target.identity and runner_keys & older_runners:
                losers[target.key] = older.name
                break
    return losers


@dataclass
class Placement:
    """What one runner reports about one model: the unit the controller updates."""

    runner: runners.Runner
    state: RunnerState = "Pending"
    reason: str = Reason.CONFIGURING
    message: str | None = None
    pulled: bool = False
    pulled_percent: int | None = None
    configured_at: str | None = None
    digest: str | None = None
    backend: str | None = None
    config_hash: str | None = None
    loaded: bool | None = None
    over_capacity: str | None = None
    """Why the models assigned to this runner exceed it (``capacity.over_capacity``)."""
    capacity_checked: bool = False
    effective: Mapping[str, Any] | None = field(default=None)
    visited: bool = False
    """A runner worker has looked at this pair since the operator started: until then the
    placement says nothing, and status is not written from it (no flapping after a restart)."""


@dataclass(frozen=True)
class PlacementSummary:
    """A placed model's placement (``spec.placement.replicas``), as its status shows it."""

    wanted: int
    chosen: tuple[tuple[str, str | None], ...]  # (pod, node) the placement chose, sorted
    serving: int  # chosen pods in the model's Service (configured there and labelled)
    shortfall: str | None  # why it is on fewer pods than wanted, with the numbers
    waiting: str | None  # why it is not placed yet (its size is being read)
    endpoint: str  # the model's own Service


def model_status(
    target: ModelTarget,
    placements: Sequence[Placement],
    *,
    previous: Mapping[str, Any] | None,
    endpoint: str | None,
    conflict_with: str | None,
    now: str,
    unschedulable: Sequence[str] = (),
    placed: PlacementSummary | None = None,
) -> dict[str, Any]:
    """The complete ``status`` of a DMRModel, stable when nothing changed (no spurious writes).

    ``unschedulable`` says which of its pool's pods the scheduler cannot place, and why: the
    answer to "why is my model not on every pod" and, with none placed, to "why no runner"."""
    previous = previous or {}
    generation = target.generation
    base: dict[str, Any] = {
        "observedGeneration": generation,
        "normalizedModel": target.normalized,
    }
    if not target.valid or conflict_with is not None:
        if conflict_with is not None:
            reason = Reason.CONFLICT
            model, backend, mode = target.identity
            message = (
                f"{model} ({backend or 'auto'} backend, {mode}) is already managed on the same "
                f"runners by DMRModel {conflict_with}; delete one of them"
            )
        else:
            reason = Reason.INVALID_SPEC
            message = "; ".join(target.problems)
        failed = conditions.ConditionUpdate
        base.update(
            phase="Failed",
            conditions=conditions.merge_conditions(
                previous.get("conditions"),
                [
                    failed("Pulled", "False", reason, message),
                    failed("Configured", "False", reason, message),
                    failed("Ready", "False", reason, message),
                    conditions.stalled(reason, message),
                ],
                now=now,
                generation=generation,
            ),
            runners=[],
            readyRunners=0,
            totalRunners=0,
            runnersSummary="0/0",
        )
        return _without_none(base)

    total = len(placements)
    configured = [p for p in placements if p.state == "Configured"]
    pulled_all = total > 0 and all(p.pulled for p in placements)
    blocking = _blocking_reason(placements)
    waiting = _first_three(unschedulable)
    if total == 0 and placed is not None and (placed.waiting or placed.shortfall):
        phase = "Pending"
        reason = Reason.PLACING if placed.waiting else Reason.INSUFFICIENT
        message = str(placed.waiting or placed.shortfall)
    elif total == 0:
        message = _no_runner_message(target) + (f"; {waiting}" if waiting else "")
        phase, reason = "Pending", Reason.NO_RUNNERS
    elif len(configured) == total and placed is not None and placed.shortfall:
        # Serving where it fits, short of its replicas: not Ready, and the numbers say why.
        message = f"configured on {total} runner(s); {placed.shortfall}"
        phase, reason = "Degraded", Reason.INSUFFICIENT
    elif len(configured) == total:
        message = f"configured on {total} runner(s)" + (f"; {waiting}" if waiting else "")
        phase, reason = "Ready", Reason.READY
    else:
        reason, message = blocking
        if configured:
            phase = "Degraded"
        elif any(p.state in ("Pulling", "Queued") for p in placements):
            phase = "Pulling"
        elif all(p.state == "Failed" for p in placements):
            phase = "Failed"
        else:
            phase = "Configuring"
    pulled_reason = (
        Reason.PULLED
        if pulled_all
        else (
            reason
            if reason in (Reason.PULL_FAILED, Reason.NO_RUNNERS, Reason.RUNNER_UNREACHABLE)
            else Reason.PULLING
        )
    )
    configured_ok = total > 0 and len(configured) == total
    update = conditions.ConditionUpdate
    base["conditions"] = conditions.merge_conditions(
        previous.get("conditions"),
        [
            update(
                "Pulled",
                "True" if pulled_all else "False",
                pulled_reason,
                f"pulled on {sum(p.pulled for p in placements)}/{total} runner(s)",
            ),
            update(
                "Configured",
                "True" if configured_ok else "False",
                Reason.CONFIGURED if configured_ok else reason,
                f"configured on {len(configured)}/{total} runner(s)"
                + ("" if configured_ok else f": {message}"),
            ),
            *_capacity_condition(placements),
            update("Ready", "True" if phase == "Ready" else "False", reason, message),
            *(
                [conditions.stalled(reason, message)]
                if phase == "Failed" and reason in _NEEDS_A_PERSON
                else []
            ),
        ],
        now=now,
        generation=generation,
    )
    first = configured[0] if configured else None
    base.update(
        phase=phase,
        digest=next((p.digest for p in (first, *placements) if p and p.digest), None),
        backend=first.backend
        if first
        else next((p.backend for p in placements if p.backend), None),
        configHash=first.config_hash if first else None,
        runners=[_runner_status(p) for p in sorted(placements, key=lambda p: p.runner.key)],
        readyRunners=len(configured),
        totalRunners=total,
        runnersSummary=f"{len(configured)}/{total}",
        effective=dict(first.effective) if first and first.effective is not None else None,
        endpoint=placed.endpoint if placed is not None else endpoint,
        placedSummary=f"{placed.serving}/{placed.wanted}"
        if placed is not None
        else f"{len(configured)}/{total}",
        placement=[{"pod": pod, **({"node": node} if node else {})} for pod, node in placed.chosen]
        if placed is not None
        else None,
    )
    return _without_none(base)


def _blocking_reason(placements: Sequence[Placement]) -> tuple[str, str]:
    pending = [p for p in placements if p.state != "Configured"]
    for reason in _REASON_PRIORITY:
        hits = [p for p in pending if p.reason == reason]
        if hits:
            first = hits[0]
            detail = f": {first.message}" if first.message else ""
            return reason, f"{first.runner.name}{detail}" + (
                f" (and {len(hits) - 1} more runner(s))" if len(hits) > 1 else ""
            )
    return Reason.CONFIGURING, "waiting for runners"


def _no_runner_message(target: ModelTarget) -> str:
    if target.url:
        return f"external runner {target.url} is not reachable yet"
    labels = ", ".join(f"{k}={v}" for k, v in sorted(_selector_labels(target).items()))
    wanted = labels or "the selector"
    return f"no Ready model-runner pod in namespace {target.namespace} matches {wanted}"


def _selector_labels(target: ModelTarget) -> dict[str, str]:
    return dict(target.pool_selector.get("matchLabels") or {})


def _first_three(messages: Sequence[str]) -> str:
    """Up to three messages joined, and how many more there are: a condition stays readable."""
    more = f" (and {len(messages) - 3} more)" if len(messages) > 3 else ""
    return "; ".join(messages[:3]) + more


def _capacity_condition(placements: Sequence[Placement]) -> list[conditions.ConditionUpdate]:
    """``WithinCapacity``, once a runner's capacity is known: a warning, never a block on Ready
    (the runner still serves; it evicts or queues, which is what people need to hear)."""
    checked = [p for p in placements if p.capacity_checked]
    if not checked:
        return []
    over = [p.over_capacity for p in checked if p.over_capacity]
    if over:
        message = _first_three(over)
        return [
            conditions.ConditionUpdate("WithinCapacity", "False", Reason.OVER_CAPACITY, message)
        ]
    return [
        conditions.ConditionUpdate(
            "WithinCapacity",
            "True",
            Reason.WITHIN_CAPACITY,
            f"the models fit the runner slots and GPU memory of {len(checked)} runner(s)",
        )
    ]


def _runner_status(placement: Placement) -> dict[str, Any]:
    runner = placement.runner
    return _without_none(
        {
            "pod": runner.name,
            "node": runner.node,
            "address": runner.address,
            "state": placement.state,
            "pulledPercent": placement.pulled_percent,
            "configuredAt": placement.configured_at,
            "message": placement.message,
            "loaded": placement.loaded,
            "keepAlive": (placement.effective or {}).get("keep_alive")
            or (runner.default_keep_alive if placement.state == "Configured" else None),
        }
    )


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
