"""The docker-agent YAML an Agent runs with: validation, rendering and the config hash. Pure.

``reconcile.agent`` decides which DMRModel serves each model; this module writes the file the
ConfigMap carries (``agent_workload`` mounts it), checks the user's configuration with the rules
docker-agent applies at load time (reference/docker-agent-dmr.md §1, §3) and hashes what must roll
the pods.

The ``_configure`` trap (DESIGN.md "Agent"): docker-agent POSTs its own, partial ``_configure``
for every model at every session start, and model-runner REPLACES a model's configuration
instead of merging it, which would undo the DMRModel's. docker-agent derives that URL from
``base_url`` minus one trailing ``/v1`` plus ``/_configure``. Every DMR model is therefore rendered
with ``base_url`` = the runner's ``/v1`` alias (``http://<svc>:<port>/v1``, or
``http://127.0.0.1:12434/v1`` on a sidecar), whose derived ``/_configure`` model-runner does not
route: 404, which docker-agent swallows. Chat, embeddings (``/v1/...`` = ``/engines/v1/...``) and
rerank (docker-agent keeps only the host: ``/rerank``) still reach the runner.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

import yaml

from dmr_operator import constants
from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.dmr import validation
from dmr_operator.reconcile import agent as agent_models

SIDECAR_BASE_URL: Final = f"http://127.0.0.1:{constants.RUNNER_PORT}/v1"
VLLM_BACKEND: Final = "vllm"

# docker-agent decodes the file strictly: unknown keys at the top level and in an agent fail the
# load. Union of the schema versions users run (docker-agent-dmr.md §1.1, §1.5; types.go).
TOP_LEVEL_KEYS: Final = frozenset(
    {
        "version",
        "agents",
        "providers",
        "models",
        "mcps",
        "rag",
        "commands",
        "skills",
        "toolsets",
        "metadata",
        "permissions",
        "runtime",
        "budget",
        "budgets",
        "flavors",
    }
)
AGENT_KEYS: Final = frozenset(
    {
        "model",
        "fallback",
        "description",
        "welcome_message",
        "toolsets",
        "instruction",
        "instruction_file",
        "harness",
        "sub_agents",
        "subagents",
        "handoffs",
        "force_handoff",
        "rag",
        "add_date",
        "add_environment_info",
        "readonly",
        "safety",
        "redact_secrets",
        "code_mode_tools",
        "add_description_parameter",
        "max_iterations",
        "budgets",
        "max_consecutive_tool_calls",
        "max_old_tool_call_tokens",
        "max_tool_result_tokens",
        "num_history_items",
        "session_compaction",
        "compaction_threshold",
        "compaction_model",
        "add_prompt_files",
        "add_prompt_files_depth",
        "commands",
        "structured_output",
        "skills",
        "use_commands",
        "use_skills",
        "use_toolsets",
        "hooks",
        "cache",
    }
)
_HOOK_TYPES: Final = frozenset({"command", "builtin"})
_PARSE_BOOL: Final = frozenset(
    {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
)


def render_agent_config(
    config: Mapping[str, Any],
    resolution: agent_models.Resolution,
    *,
    base_url_override: str | None = None,
) -> str:
    """The docker-agent YAML for the ConfigMap; everything not about DMR models passes through.

    ``base_url_override`` is ``SIDECAR_BASE_URL`` in Sidecar mode. Key order follows the input
    (the API server returns objects with sorted keys) and operator-made entries are added in
    alias order, so equal inputs give byte-identical output and an equal hash.
    """
    rendered: dict[str, Any] = copy.deepcopy(dict(config))
    models: dict[str, Any] = dict(rendered.get("models") or {})
    for alias in sorted(resolution.dmr_aliases):
        entry = models.get(alias)
        if isinstance(entry, Mapping):
            models[alias] = {k: v for k, v in entry.items() if k != agent_models.DMR_MODEL_KEY}
    for resolved in resolution.models:
        served = resolved.served
        if served is None:
            continue
        endpoint = base_url_override or served.endpoint
        existing = models.get(resolved.alias)
        entry = dict(existing) if isinstance(existing, Mapping) else {}
        models[resolved.alias] = _dmr_entry(entry, served, endpoint)
    if models:
        rendered["models"] = models
    for path, value in resolution.rewrites:
        _set_path(rendered, path, value)
    return yaml.safe_dump(rendered, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _dmr_entry(
    entry: dict[str, Any], served: agent_models.ServedModel, endpoint: str | None
) -> dict[str, Any]:
    entry["provider"] = agent_models.DMR_PROVIDER
    entry["model"] = served.model
    if endpoint:
        entry["base_url"] = endpoint
    options = {
        key: value
        for key, value in dict(entry.get("provider_opts") or {}).items()
        if key not in agent_models.ENGINE_OPTIONS
    }
    # docker-agent scales compaction from provider_opts.context_size, never from the runner.
    if served.context_size is not None:
        options["context_size"] = served.context_size
    if served.backend == VLLM_BACKEND and served.thinking_budget is not None:
        options["extra_body"] = _vllm_thinking_body(
            dict(options.get("extra_body") or {}), served.thinking_budget
        )
    if options:
        entry["provider_opts"] = options
    else:
        entry.pop("provider_opts", None)
    return entry


def _vllm_thinking_body(extra_body: dict[str, Any], budget: int) -> dict[str, Any]:
    """What docker-agent adds per chat request for a vLLM engine (docker-agent-dmr.md §3.6).

    With an explicit base_url docker-agent assumes llama.cpp and would only send the budget to
    the (unrouted) ``_configure``, so the operator puts vLLM's per-request fields in extra_body.
    """
    extra_body["thinking_token_budget"] = budget
    if budget == 0:
        kwargs = dict(extra_body.get("chat_template_kwargs") or {})
        kwargs["enable_thinking"] = False
        extra_body["chat_template_kwargs"] = kwargs
    return extra_body


def _set_path(document: MutableMapping[str, Any], path: agent_models.Path, value: str) -> None:
    node: Any = document
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def config_hash(*, rendered_config: str, spec: agent_api.AgentSpec) -> str:
    """Hash of everything whose change must replace the pods.

    The pod template changes by itself when image or env change, but a ConfigMap edit does not
    restart anything: the hash goes into a pod-template annotation. Replicas are left out
    (scaling must not roll) and so is the raw config (the rendered text covers it).
    """
    pod_inputs = spec.model_dump(mode="json", by_alias=True, exclude={"replicas", "config"})
    digest = hashlib.sha256()
    digest.update(rendered_config.encode())
    digest.update(b"\0")
    digest.update(json.dumps(pod_inputs, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:16]


def validate_agent_config(config: Any) -> list[str]:
    """Problems docker-agent would refuse the file for (or the operator cannot work with)."""
    if not isinstance(config, Mapping):
        return ["config must be an object (a docker-agent configuration)"]
    problems = [
        f"config: unknown top-level key {key!r} (docker-agent decodes the file strictly)"
        for key in config
        if key not in TOP_LEVEL_KEYS
    ]
    agents = config.get("agents")
    if not isinstance(agents, Mapping) or not agents:
        problems.append("config.agents must map at least one agent name to its configuration")
        agents = {}
    models = config.get("models")
    if models is not None and not isinstance(models, Mapping):
        problems.append("config.models must be an object of model aliases")
        models = {}
    models = models or {}
    providers = config.get("providers")
    providers = providers if isinstance(providers, Mapping) else {}
    for name, agent in agents.items():
        problems.extend(_agent_problems(str(name), agent, agents, models))
    for alias, entry in models.items():
        problems.extend(_model_problems(str(alias), entry, providers))
    rag = config.get("rag")
    for rag_name, source in rag.items() if isinstance(rag, Mapping) else ():
        reranking = _mapping(_mapping(_mapping(source).get("results")).get("reranking"))
        model = reranking.get("model")
        if model is not None:
            problems.extend(
                _reference_problems(f"rag.{rag_name}.results.reranking.model", model, models)
            )
    return problems


def _agent_problems(
    name: str, agent: Any, agents: Mapping[str, Any], models: Mapping[str, Any]
) -> list[str]:
    where = f"agents.{name}"
    if not isinstance(agent, Mapping):
        return [f"{where} must be an object"]
    problems = [
        f"{where}: unknown key {key!r} (docker-agent rejects unknown agent fields)"
        for key in agent
        if key not in AGENT_KEYS
    ]
    if "model" in agent:
        problems.extend(_reference_problems(f"{where}.model", agent["model"], models))
    fallback_models = _mapping(agent.get("fallback")).get("models")
    if fallback_models is not None:
        if not isinstance(fallback_models, list):
            problems.append(f"{where}.fallback.models must be a list")
        else:
            for index, value in enumerate(fallback_models):
                problems.extend(
                    _reference_problems(f"{where}.fallback.models[{index}]", value, models)
                )
    for key in ("handoffs", "sub_agents"):
        targets = agent.get(key)
        if targets is None:
            continue
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            problems.append(f"{where}.{key} must be a list of agent names")
            continue
        problems.extend(
            f"{where}.{key}: no agent named {target!r}"
            for target in targets
            if target not in agents
        )
    hooks = _mapping(agent.get("hooks")).get("on_agent_switch")
    for index, hook in enumerate(hooks if isinstance(hooks, list) else []):
        hook_type = _mapping(hook).get("type")
        if hook_type not in _HOOK_TYPES:
            problems.append(
                f"{where}.hooks.on_agent_switch[{index}].type must be command or builtin"
            )
    return problems


def _reference_problems(where: str, value: Any, models: Mapping[str, Any]) -> list[str]:
    """A model reference must be a models: alias, ``auto`` or an inline ``provider/model``."""
    if not isinstance(value, str) or not value.strip():
        return [f"{where} must be a non-empty string"]
    return [
        f"{where}: {part!r} is neither a models: alias nor a provider/model reference"
        for part in (p.strip() for p in value.split(","))
        if part and part != agent_models.AUTO and part not in models and "/" not in part
    ]


def _model_problems(alias: str, entry: Any, providers: Mapping[str, Any]) -> list[str]:
    where = f"models.{alias}"
    if not isinstance(entry, Mapping):
        return [f"{where} must be an object"]
    problems: list[str] = []
    dmr_model = entry.get(agent_models.DMR_MODEL_KEY)
    if agent_models.DMR_MODEL_KEY in entry and (not isinstance(dmr_model, str) or not dmr_model):
        problems.append(f"{where}.dmrModel must be the name of a DMRModel")
    provider = entry.get("provider")
    if dmr_model is None and not isinstance(provider, str):
        problems.append(f"{where}.provider must be set (dmr, or use dmrModel)")
    if "thinking_budget" in entry:
        problems.extend(_thinking_budget_problems(where, entry["thinking_budget"]))
    options = entry.get("provider_opts")
    if options is not None and not isinstance(options, Mapping):
        problems.append(f"{where}.provider_opts must be an object")
    elif options and agent_models.is_dmr_entry(entry, providers):
        problems.extend(dmr_provider_opts_problems(where, options))
    return problems


def _thinking_budget_problems(where: str, value: Any) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return [f"{where}.thinking_budget must be an integer or an effort name"]
    try:
        validation.reasoning_budget(value)
    except validation.RunnerValidationError as error:
        return [f"{where}.thinking_budget: {error}"]
    return []


def dmr_provider_opts_problems(where: str, options: Mapping[str, Any]) -> list[str]:
    """docker-agent's load-time checks of a dmr model's provider_opts (docker-agent-dmr.md §3)."""
    problems: list[str] = []
    if "keep_alive" in options:
        keep_alive = options["keep_alive"]
        if not isinstance(keep_alive, str):
            problems.append(
                f'{where}.provider_opts.keep_alive must be a string (e.g. "5m", "1h", "-1"), '
                f"got {type(keep_alive).__name__}: quote it"
            )
        elif not keep_alive.strip():
            problems.append(f"{where}.provider_opts.keep_alive must not be empty")
        else:
            try:
                validation.parse_keep_alive(keep_alive.strip())
            except validation.RunnerValidationError as error:
                problems.append(f"{where}.provider_opts.{error}")
    if "mode" in options:
        mode = options["mode"]
        if not isinstance(mode, str) or mode.strip() not in validation.MODES:
            problems.append(
                f"{where}.provider_opts.mode {mode!r} is invalid; must be one of: "
                + ", ".join(validation.MODES)
            )
    raw = options.get("raw_runtime_flags")
    if raw is not None and not isinstance(raw, str):
        problems.append(f"{where}.provider_opts.raw_runtime_flags must be a string")
    flags = options.get("runtime_flags")
    has_flags = (isinstance(flags, list) and flags) or (isinstance(flags, str) and flags.strip())
    if has_flags and isinstance(raw, str) and raw.strip():
        problems.append(
            f"{where}.provider_opts: cannot set both runtime_flags and raw_runtime_flags; pick one"
        )
    for key in ("supports_images", "supports_pdf"):
        value = options.get(key)
        if value is not None and not isinstance(value, bool) and value not in _PARSE_BOOL:
            problems.append(f"{where}.provider_opts.{key} must be a boolean")
    utilization = options.get("gpu_memory_utilization")
    if isinstance(utilization, int | float) and not isinstance(utilization, bool):
        try:
            validation.validate_gpu_memory_utilization(float(utilization))
        except validation.RunnerValidationError as error:
            problems.append(f"{where}.provider_opts: {error}")
    overrides = options.get("hf_overrides")
    if isinstance(overrides, Mapping):
        try:
            validation.validate_hf_overrides(overrides)
        except validation.RunnerValidationError as error:
            problems.append(f"{where}.provider_opts: {error}")
    extra_body = options.get("extra_body")
    if extra_body is not None and not isinstance(extra_body, Mapping):
        problems.append(f"{where}.provider_opts.extra_body must be an object")
    return problems


def ignored_option_warnings(resolution: agent_models.Resolution) -> list[str]:
    """Engine options the operator drops from DMR models, said once per model."""
    return [
        f"models.{m.alias}.provider_opts {', '.join(m.ignored_options)} ignored: DMRModel "
        f"{m.served.name if m.served else '?'} configures the engine; set them there"
        for m in resolution.models
        if m.ignored_options
    ]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
