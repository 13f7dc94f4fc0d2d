"""Which DMRModel serves each model an Agent's docker-agent configuration names. Pure.

The handlers build one ``ServedModel`` per DMRModel of the namespace from the live objects and
call ``resolve_models``; the ``Resolution`` feeds ``agent_config`` (the rendered docker-agent
YAML), ``agent_workload`` (readiness gating of the pods) and ``agent_status`` (status.models,
conditions). docker-agent's own rules are in reference/docker-agent-dmr.md: §1.5 (inline
``provider/model`` refs), §1.6 (RAG models) and §6.2 (``auto`` selection).

Where a model is named ("slots"):
- ``models.<alias>`` with ``dmrModel: <name>`` (our extension), ``provider: dmr``, or a
  ``providers:`` entry whose ``provider`` is ``dmr``: matched by name or normalised reference;
- ``agents.<a>.model`` (an alias, inline ``dmr/<ref>``, a comma-separated "alloy" list, ``auto``
  or absent) and ``agents.<a>.fallback.models[]``: need a completion model;
- ``rag.<r>.strategies[].embedding_model`` (or ``model``): need an embedding model;
- ``rag.<r>.results.reranking.model``: needs a reranking model.
Inline and ``auto`` slots get an operator-made alias (the DMRModel's name) so the rendered file
can carry the base_url; problems never raise, they become status messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from dmr_operator.dmr import references

COMPLETION: Final = "completion"
EMBEDDING: Final = "embedding"
RERANKING: Final = "reranking"

DMR_PROVIDER: Final = "dmr"
DMR_MODEL_KEY: Final = "dmrModel"
AUTO: Final = "auto"
_INLINE_PREFIX: Final = f"{DMR_PROVIDER}/"
# RAG strategies that turn documents into vectors with a model (bm25 needs none).
_EMBEDDING_STRATEGIES: Final = frozenset({"chunked-embeddings", "semantic-embeddings"})

Path = tuple[str | int, ...]


class Problem:
    """Reasons a model cannot be used (condition reasons of ModelsReady)."""

    DMRMODEL_NOT_FOUND = "DMRModelNotFound"
    MODE_MISMATCH = "ModeMismatch"
    NO_MODEL_AVAILABLE = "NoModelAvailable"


@dataclass(frozen=True)
class ServedModel:
    """A DMRModel as the Agent logic needs it (built by the handlers from the live object)."""

    name: str
    model: str  # status.normalizedModel: rendered verbatim so vLLM's served-model-name matches
    backend: str
    mode: str
    context_size: int | None
    thinking_budget: int | None  # tokens, already resolved from effort names
    ready: bool
    endpoint: str | None  # status.endpoint, http://<service>.<ns>.svc:<port>/v1
    created: str  # creationTimestamp; "first" DMRModel = oldest, so new ones never steal `auto`


@dataclass(frozen=True)
class ResolvedModel:
    """One DMR-backed entry of the rendered ``models:`` section."""

    alias: str
    served: ServedModel | None
    problem: str | None = None  # a Problem reason
    message: str = ""
    # True when the operator made the alias (inline or auto slot) rather than the user.
    synthesized: bool = False
    # provider_opts keys the operator drops because the DMRModel configures the engine.
    ignored_options: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.served is not None and self.problem is None


@dataclass(frozen=True)
class Resolution:
    """Every DMR model of a configuration and how slots are rewritten to reach them."""

    models: tuple[ResolvedModel, ...]
    # New string values of slots (paths into the config) pointing at operator-made aliases.
    rewrites: tuple[tuple[Path, str], ...] = ()
    # The names of models: entries that are DMR-backed (their dmrModel key is removed on render).
    dmr_aliases: frozenset[str] = field(default_factory=frozenset)

    @property
    def all_ready(self) -> bool:
        return all(m.usable and m.served is not None and m.served.ready for m in self.models)

    def served_names(self) -> list[str]:
        return sorted({m.served.name for m in self.models if m.served is not None})


@dataclass(frozen=True)
class _Slot:
    path: Path
    value: str | None  # None: absent, docker-agent picks like `auto`
    mode: str
    owner: str  # for messages: "agents.root.model"


# Keys of provider_opts that docker-agent turns into a _configure body (§1.3): on a DMR-backed
# model they are the DMRModel's job, and sent by docker-agent they would go nowhere (the /v1
# base URL makes its _configure a 404) — so they are dropped from the render and reported.
ENGINE_OPTIONS: Final = frozenset(
    {
        "context_size",
        "runtime_flags",
        "raw_runtime_flags",
        "speculative_draft_model",
        "speculative_num_tokens",
        "speculative_acceptance_rate",
        "keep_alive",
        "mode",
        "gpu_memory_utilization",
        "hf_overrides",
    }
)


def resolve_models(
    config: Mapping[str, Any],
    served: Sequence[ServedModel],
    *,
    default_model: str | None,
    require_ready: bool = True,
) -> Resolution:
    """Bind every DMR model the configuration names to a DMRModel.

    ``require_ready`` is False in Sidecar mode: the DMRModels are configured on the agent's own
    sidecar, so their pool readiness says nothing and ``auto`` may pick any of them.
    """
    catalogue = sorted(served, key=lambda s: (s.created, s.name))
    user_models = _mapping(config.get("models"))
    providers = _mapping(config.get("providers"))
    dmr_aliases = {
        alias
        for alias, entry in user_models.items()
        if isinstance(entry, Mapping) and is_dmr_entry(entry, providers)
    }
    slots = list(_slots(config))

    # Which modes the slots ask of each user alias, so "provider: dmr" entries pick the DMRModel
    # of the right mode when several serve one reference.
    wanted_modes: dict[str, set[str]] = {}
    for slot in slots:
        for name in _parts(slot.value):
            if name in dmr_aliases:
                wanted_modes.setdefault(name, set()).add(slot.mode)

    resolved: dict[str, ResolvedModel] = {}
    for alias in sorted(dmr_aliases):
        entry = user_models[alias]
        modes = wanted_modes.get(alias, set())
        resolved[alias] = _resolve_entry(alias, entry, catalogue, modes)

    taken = set(user_models)
    synthesized: dict[tuple[str, str], str] = {}  # (DMRModel name, mode) -> alias
    rewrites: list[tuple[Path, str]] = []
    for slot in slots:
        new_parts: list[str] = []
        changed = False
        parts: list[str | None] = [*_parts(slot.value)] or [None]
        for part in parts:
            if part is not None and (part in user_models or not _is_dmr_slot_value(part)):
                new_parts.append(part)
                continue
            candidate, problem = _pick_for_slot(
                part, slot, catalogue, default_model=default_model, require_ready=require_ready
            )
            if candidate is None:
                key = part if part is not None else _auto_key(slot.mode)
                resolved.setdefault(
                    key,
                    ResolvedModel(
                        alias=key,
                        served=None,
                        problem=problem[0],
                        message=problem[1],
                        synthesized=True,
                    ),
                )
                if part is not None:
                    new_parts.append(part)
                continue
            alias = synthesized.get((candidate.name, slot.mode), "")
            if not alias:
                alias = _free_alias(candidate.name, taken)
                taken.add(alias)
                synthesized[(candidate.name, slot.mode)] = alias
                resolved[alias] = _with_mode_check(
                    ResolvedModel(alias=alias, served=candidate, synthesized=True), {slot.mode}
                )
            new_parts.append(alias)
            changed = True
        if changed:
            rewrites.append((slot.path, ",".join(new_parts)))

    ordered = tuple(resolved[alias] for alias in sorted(resolved))
    return Resolution(models=ordered, rewrites=tuple(rewrites), dmr_aliases=frozenset(dmr_aliases))


def _resolve_entry(
    alias: str, entry: Mapping[str, Any], catalogue: Sequence[ServedModel], modes: set[str]
) -> ResolvedModel:
    ignored = tuple(sorted(ENGINE_OPTIONS & set(_mapping(entry.get("provider_opts")))))
    name = entry.get(DMR_MODEL_KEY)
    if name is not None:
        match = next((s for s in catalogue if s.name == name), None)
        if match is None:
            return ResolvedModel(
                alias=alias,
                served=None,
                problem=Problem.DMRMODEL_NOT_FOUND,
                message=f"models.{alias}: DMRModel {name!r} does not exist in this namespace",
                ignored_options=ignored,
            )
        return _with_mode_check(
            ResolvedModel(alias=alias, served=match, ignored_options=ignored), modes
        )
    reference = str(entry.get("model", ""))
    candidates = _serving(reference, catalogue)
    if not candidates:
        return ResolvedModel(
            alias=alias,
            served=None,
            problem=Problem.DMRMODEL_NOT_FOUND,
            message=f"models.{alias}: no DMRModel in this namespace serves {reference!r}",
            ignored_options=ignored,
        )
    preferred = [c for c in candidates if c.mode in modes] or candidates
    return _with_mode_check(
        ResolvedModel(alias=alias, served=preferred[0], ignored_options=ignored), modes
    )


def _with_mode_check(model: ResolvedModel, modes: set[str]) -> ResolvedModel:
    served = model.served
    if served is None:
        return model
    wrong = sorted(mode for mode in modes if mode != served.mode)
    if not wrong:
        return model
    return ResolvedModel(
        alias=model.alias,
        served=served,
        problem=Problem.MODE_MISMATCH,
        message=f"model {model.alias!r} is used as a {wrong[0]} model but DMRModel "
        f"{served.name!r} runs in mode {served.mode}",
        synthesized=model.synthesized,
        ignored_options=model.ignored_options,
    )


def _pick_for_slot(
    part: str | None,
    slot: _Slot,
    catalogue: Sequence[ServedModel],
    *,
    default_model: str | None,
    require_ready: bool,
) -> tuple[ServedModel | None, tuple[str, str]]:
    """The DMRModel for an inline ``dmr/<ref>`` or an ``auto``/absent slot value."""
    if part is not None and part != AUTO:
        reference = part.removeprefix(_INLINE_PREFIX)
        candidates = _serving(reference, catalogue)
        if not candidates:
            return None, (
                Problem.DMRMODEL_NOT_FOUND,
                f"{slot.owner}: no DMRModel in this namespace serves {reference!r}",
            )
        preferred = [c for c in candidates if c.mode == slot.mode] or candidates
        return preferred[0], ("", "")
    usable = [s for s in catalogue if s.mode == slot.mode and (s.ready or not require_ready)]
    if slot.mode == COMPLETION and default_model:
        wanted = references.normalize_reference(default_model.removeprefix(_INLINE_PREFIX))
        exact = [s for s in usable if references.normalize_reference(s.model) == wanted]
        same_repo = [s for s in usable if _repository(s.model) == _repository(wanted)]
        usable = exact or same_repo or usable
    if usable:
        return usable[0], ("", "")
    readiness = "Ready " if require_ready else ""
    return None, (
        Problem.NO_MODEL_AVAILABLE,
        f"{slot.owner}: auto selection found no {readiness}DMRModel with mode {slot.mode}",
    )


def _auto_key(mode: str) -> str:
    return AUTO if mode == COMPLETION else f"{AUTO}-{mode}"


def _serving(reference: str, catalogue: Sequence[ServedModel]) -> list[ServedModel]:
    if not reference.strip():
        return []
    wanted = references.normalize_reference(reference)
    return [s for s in catalogue if references.normalize_reference(s.model) == wanted]


def _repository(normalized: str) -> str:
    name, _, tag = normalized.rpartition(":")
    return name if name and "/" not in tag else normalized


def _free_alias(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    suffix = 1
    while f"{name}-dmr{'' if suffix == 1 else f'-{suffix}'}" in taken:
        suffix += 1
    return f"{name}-dmr{'' if suffix == 1 else f'-{suffix}'}"


def _slots(config: Mapping[str, Any]) -> Iterator[_Slot]:
    for agent_name, agent in _mapping(config.get("agents")).items():
        if not isinstance(agent, Mapping):
            continue
        model = agent.get("model")
        yield _Slot(
            path=("agents", agent_name, "model"),
            value=model if isinstance(model, str) else None,
            mode=COMPLETION,
            owner=f"agents.{agent_name}.model",
        )
        fallback_models = _mapping(agent.get("fallback")).get("models")
        for index, value in enumerate(fallback_models if isinstance(fallback_models, list) else []):
            if isinstance(value, str):
                yield _Slot(
                    path=("agents", agent_name, "fallback", "models", index),
                    value=value,
                    mode=COMPLETION,
                    owner=f"agents.{agent_name}.fallback.models[{index}]",
                )
    for rag_name, rag in _mapping(config.get("rag")).items():
        if not isinstance(rag, Mapping):
            continue
        strategies = rag.get("strategies")
        for index, strategy in enumerate(strategies if isinstance(strategies, list) else []):
            if not isinstance(strategy, Mapping) or strategy.get("type") not in (
                _EMBEDDING_STRATEGIES
            ):
                continue
            key = (
                "model"
                if "model" in strategy and "embedding_model" not in strategy
                else ("embedding_model")
            )
            value = strategy.get(key)
            yield _Slot(
                path=("rag", rag_name, "strategies", index, key),
                value=value if isinstance(value, str) else None,
                mode=EMBEDDING,
                owner=f"rag.{rag_name}.strategies[{index}].{key}",
            )
        reranking = _mapping(_mapping(rag.get("results")).get("reranking"))
        if isinstance(reranking.get("model"), str):
            yield _Slot(
                path=("rag", rag_name, "results", "reranking", "model"),
                value=reranking["model"],
                mode=RERANKING,
                owner=f"rag.{rag_name}.results.reranking.model",
            )


def _parts(value: str | None) -> list[str]:
    """The model names of a slot value; several for docker-agent's comma-separated alloys."""
    if value is None:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def _is_dmr_slot_value(part: str) -> bool:
    return part == AUTO or part.startswith(_INLINE_PREFIX)


def is_dmr_entry(entry: Mapping[str, Any], providers: Mapping[str, Any]) -> bool:
    if DMR_MODEL_KEY in entry:
        return True
    provider = entry.get("provider")
    if provider == DMR_PROVIDER:
        return True
    definition = providers.get(provider) if isinstance(provider, str) else None
    return isinstance(definition, Mapping) and definition.get("provider") == DMR_PROVIDER


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
