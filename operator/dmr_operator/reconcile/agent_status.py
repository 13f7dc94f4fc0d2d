"""An Agent's status from what the other agent_* modules decided and what the cluster shows. Pure.

Inputs: the ``Resolution`` (``reconcile.agent``), the configuration problems
(``agent_config.validate_agent_config`` + ``agent_workload.env_problems``), the workload's replica
counts and a few facts per pod (``PodFacts``, built by the handlers from the Pod watch). Output:
the ``status`` dict to patch, conditions merged by ``reconcile.conditions`` so an unchanged state
costs no write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.reconcile import agent as agent_models
from dmr_operator.reconcile import agent_config, conditions

MODELS_READY: Final = "ModelsReady"
CONFIG_VALID: Final = "ConfigValid"
AVAILABLE: Final = "Available"
READY: Final = "Ready"

_UNLOAD_BUILTIN: Final = "unload"


class Reason:
    """The fixed vocabulary of Agent condition reasons."""

    # ModelsReady
    MODELS_READY = "ModelsReady"
    DMRMODEL_NOT_FOUND = agent_models.Problem.DMRMODEL_NOT_FOUND
    MODE_MISMATCH = agent_models.Problem.MODE_MISMATCH
    NO_MODEL_AVAILABLE = agent_models.Problem.NO_MODEL_AVAILABLE
    MODELS_NOT_READY = "ModelsNotReady"
    # ConfigValid
    VALID = "Valid"
    INVALID_CONFIG = "InvalidConfig"
    SECRET_INLINE = "SecretInline"
    # Available
    REPLICAS_AVAILABLE = "ReplicasAvailable"
    SCALED_TO_ZERO = "ScaledToZero"
    WAITING_FOR_MODELS = "WaitingForModels"
    PODS_STARTING = "PodsStarting"
    UNSCHEDULABLE = "Unschedulable"
    # Ready
    READY = "Ready"
    NOT_READY = "NotReady"


@dataclass(frozen=True)
class PodFacts:
    """One agent pod as the status needs it."""

    name: str
    phase: str  # Pending, Running, ...
    ready: bool
    # The PodScheduled=False message when its reason is Unschedulable, e.g.
    # "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    unschedulable_message: str | None = None


def agent_status(
    *,
    spec: agent_api.AgentSpec,
    generation: int | None,
    resolution: agent_models.Resolution,
    config_problems: Sequence[str],
    env_problems: Sequence[str],
    replicas: int,
    ready_replicas: int,
    pods: Sequence[PodFacts],
    agents_sharing_runners: Sequence[str],
    config_hash: str | None,
    previous_conditions: Iterable[Mapping[str, Any]] | None,
    now: str,
) -> dict[str, Any]:
    """The status to patch (camelCase, as stored).

    ``agents_sharing_runners`` names the OTHER Agents whose models live on the same runner pods
    (Pool mode), for the unload-hook warning; ``replicas``/``ready_replicas`` come from the
    workload's status.
    """
    models_update = _models_condition(resolution)
    config_update = _config_condition(config_problems, env_problems)
    unschedulable = [pod for pod in pods if pod.unschedulable_message]
    available_update = _available_condition(
        spec=spec,
        models_ok=models_update.status == "True",
        replicas=replicas,
        ready_replicas=ready_replicas,
        unschedulable=unschedulable,
    )
    all_true = all(u.status == "True" for u in (models_update, config_update, available_update))
    ready_update = conditions.ConditionUpdate(
        type=READY,
        status="True" if all_true else "False",
        reason=Reason.READY if all_true else Reason.NOT_READY,
        message="" if all_true else _first_message(models_update, config_update, available_update),
    )
    updates = [models_update, config_update, available_update, ready_update]
    if config_update.status == "False":  # a configuration to fix: no retry will help
        updates.append(conditions.stalled(config_update.reason, config_update.message))
    warnings = [
        *agent_config.ignored_option_warnings(resolution),
        *unload_hook_warnings(
            spec.config, spec=spec, agents_sharing_runners=agents_sharing_runners
        ),
        *(
            f"pod {pod.name} cannot be scheduled: {pod.unschedulable_message}"
            for pod in unschedulable
        ),
    ]
    usable = [m for m in resolution.models if m.usable]
    ready_models = sum(1 for m in usable if m.served is not None and m.served.ready)
    status = agent_api.AgentStatus(
        phase=_phase(config_update, models_update, available_update, spec, ready_replicas),
        observed_generation=generation,
        models=[_model_status(m, spec) for m in resolution.models],
        replicas=replicas,
        ready_replicas=ready_replicas,
        ready_models=f"{ready_models}/{len(resolution.models)}",
        ready_of_desired=f"{ready_replicas}/{spec.replicas}",
        config_hash=config_hash,
        warnings=warnings,
    ).to_api()
    status["conditions"] = conditions.merge_conditions(
        previous_conditions, updates, now=now, generation=generation
    )
    return status


def _models_condition(resolution: agent_models.Resolution) -> conditions.ConditionUpdate:
    broken = [m for m in resolution.models if m.problem is not None]
    if broken:
        return conditions.ConditionUpdate(
            type=MODELS_READY,
            status="False",
            reason=str(broken[0].problem),
            message="; ".join(m.message for m in broken),
        )
    waiting = [m for m in resolution.models if m.served is not None and not m.served.ready]
    if waiting:
        names = ", ".join(sorted({m.served.name for m in waiting if m.served is not None}))
        return conditions.ConditionUpdate(
            type=MODELS_READY,
            status="False",
            reason=Reason.MODELS_NOT_READY,
            message=f"waiting for DMRModel {names} to become Ready",
        )
    return conditions.ConditionUpdate(
        type=MODELS_READY, status="True", reason=Reason.MODELS_READY, message=""
    )


def _config_condition(
    config_problems: Sequence[str], env_problems: Sequence[str]
) -> conditions.ConditionUpdate:
    if env_problems:
        return conditions.ConditionUpdate(
            type=CONFIG_VALID,
            status="False",
            reason=Reason.SECRET_INLINE,
            message="; ".join([*env_problems, *config_problems]),
        )
    if config_problems:
        return conditions.ConditionUpdate(
            type=CONFIG_VALID,
            status="False",
            reason=Reason.INVALID_CONFIG,
            message="; ".join(config_problems),
        )
    return conditions.ConditionUpdate(type=CONFIG_VALID, status="True", reason=Reason.VALID)


def _available_condition(
    *,
    spec: agent_api.AgentSpec,
    models_ok: bool,
    replicas: int,
    ready_replicas: int,
    unschedulable: Sequence[PodFacts],
) -> conditions.ConditionUpdate:
    def update(status: bool, reason: str, message: str = "") -> conditions.ConditionUpdate:
        return conditions.ConditionUpdate(
            type=AVAILABLE, status="True" if status else "False", reason=reason, message=message
        )

    if spec.replicas == 0:
        return update(True, Reason.SCALED_TO_ZERO, "spec.replicas is 0")
    if spec.runner.mode == "Pool" and not models_ok:
        return update(False, Reason.WAITING_FOR_MODELS, "scaled to 0 until every model is Ready")
    if ready_replicas >= spec.replicas:
        return update(True, Reason.REPLICAS_AVAILABLE, f"{ready_replicas}/{spec.replicas} ready")
    if unschedulable:
        return update(
            ready_replicas > 0,
            Reason.UNSCHEDULABLE,
            f"{ready_replicas}/{spec.replicas} ready; {len(unschedulable)} pod(s) cannot be "
            f"scheduled: {unschedulable[0].unschedulable_message}",
        )
    return update(
        ready_replicas > 0,
        Reason.PODS_STARTING,
        f"{ready_replicas}/{spec.replicas} ready ({replicas} requested)",
    )


def _phase(
    config_update: conditions.ConditionUpdate,
    models_update: conditions.ConditionUpdate,
    available_update: conditions.ConditionUpdate,
    spec: agent_api.AgentSpec,
    ready_replicas: int,
) -> str:
    if config_update.status != "True" or models_update.reason == Reason.MODE_MISMATCH:
        return "Failed"
    if models_update.status != "True":
        return "Pending"
    if ready_replicas >= spec.replicas:
        return "Ready"
    if available_update.reason == Reason.UNSCHEDULABLE:
        return "Degraded"
    return "Progressing"


def _first_message(*updates: conditions.ConditionUpdate) -> str:
    return next((u.message for u in updates if u.status != "True" and u.message), "")


def _model_status(model: agent_models.ResolvedModel, spec: agent_api.AgentSpec) -> dict[str, Any]:
    served = model.served
    endpoint = served.endpoint if served is not None else None
    if served is not None and spec.runner.mode == "Sidecar":
        endpoint = agent_config.SIDECAR_BASE_URL
    return agent_api.AgentModelStatus(
        alias=model.alias,
        dmr_model=served.name if served is not None else None,
        model=served.model if served is not None else None,
        ready=bool(served is not None and served.ready and model.problem is None),
        endpoint=endpoint,
        message=model.message or None,
    ).to_api()


def unload_hook_warnings(
    config: Mapping[str, Any],
    *,
    spec: agent_api.AgentSpec,
    agents_sharing_runners: Sequence[str],
) -> list[str]:
    """docker-agent's ``unload`` builtin evicts a model engine-wide (docs: single-tenant only).

    On shared runners it yanks the model from under other replicas' and other Agents' sessions.
    """
    agents = config.get("agents")
    hooked = sorted(
        str(name)
        for name, agent in (agents.items() if isinstance(agents, Mapping) else ())
        if _has_unload_hook(agent)
    )
    if not hooked or spec.runner.mode == "Sidecar":
        return []
    sharers = []
    if spec.replicas > 1:
        sharers.append(f"{spec.replicas} replicas")
    if agents_sharing_runners:
        sharers.append("Agent " + ", ".join(sorted(agents_sharing_runners)))
    if not sharers:
        return []
    return [
        f"agents {', '.join(hooked)} unload their models on agent switch, but the runners are "
        f"shared with {' and '.join(sharers)}: unload is engine-wide and evicts the model from "
        f"under their sessions (docker-agent documents it as single-tenant only)"
    ]


def depends_on_other_agents(agent_object: Mapping[str, Any]) -> bool:
    """Does this Agent's status name other Agents (an unload hook on shared runners)? Only such
    Agents need another look when another Agent's endpoints change."""
    config = (agent_object.get("spec") or {}).get("config")
    agents = config.get("agents") if isinstance(config, Mapping) else None
    return isinstance(agents, Mapping) and any(_has_unload_hook(a) for a in agents.values())


def _has_unload_hook(agent: Any) -> bool:
    if not isinstance(agent, Mapping):
        return False
    hooks = agent.get("hooks")
    switch = hooks.get("on_agent_switch") if isinstance(hooks, Mapping) else None
    return any(
        isinstance(hook, Mapping)
        and hook.get("type") == "builtin"
        and hook.get("command") == _UNLOAD_BUILTIN
        for hook in (switch if isinstance(switch, list) else ())
    )
