"""model-runner's JSON shapes, with the exact (and inconsistent) wire spellings.

``_configure`` mixes ``context-size``/``runtime-flags`` (hyphens) with ``keep_alive`` and
``speculative.draft_model`` (underscores), and ``GET /engines/_configure`` answers with Go's
capitalised field names; model-runner silently drops a misspelt key, so every body is built and
read through these models (reference/model-runner-api.md §3). Python attribute names are
snake_case; constructing by wire alias also works. The client (``clients.modelrunner``) sends and
parses these, the reconciler compares through ``config_differences``, the emulator uses
``ConfigureRequest.stored_config`` to store what a runner would. Rules live in ``validation``.
"""

from __future__ import annotations

import math
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from dmr_operator.dmr import references, validation


class WireModel(BaseModel):
    """Base: unknown keys ignored (like Go), population by name or by wire alias."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        """The JSON object to send: wire aliases, absent values omitted (never null)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SpeculativeConfig(WireModel):
    draft_model: str | None = None
    num_tokens: int | None = None
    min_acceptance_rate: float | None = None

    def normalized(self) -> tuple[str, int, float]:
        """Go drops zero values (``omitempty``), so None, ``""`` and ``0`` are the same."""
        return (self.draft_model or "", self.num_tokens or 0, self.min_acceptance_rate or 0.0)


class VLLMConfig(WireModel):
    gpu_memory_utilization: float | None = Field(default=None, alias="gpu-memory-utilization")
    hf_overrides: dict[str, Any] | None = Field(default=None, alias="hf-overrides")

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        # exclude_none must not reach into the overrides: a null there is a value vLLM gets.
        if self.hf_overrides is not None:
            wire["hf-overrides"] = self.hf_overrides
        return wire


class LlamaCppConfig(WireModel):
    reasoning_budget: int | None = Field(default=None, alias="reasoning-budget")


class BackendConfiguration(WireModel):
    """What a runner stores per (backend, model, mode) and echoes as ``Config``."""

    context_size: int | None = Field(default=None, alias="context-size")
    runtime_flags: list[str] | None = Field(default=None, alias="runtime-flags")
    speculative: SpeculativeConfig | None = None
    keep_alive: str | None = None
    vllm: VLLMConfig | None = None
    llamacpp: LlamaCppConfig | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        if self.vllm is not None:
            wire["vllm"] = self.vllm.to_wire()
        return wire


class ConfigureRequest(BackendConfiguration):
    """The body of ``POST /engines[/{backend}]/_configure``."""

    model: str
    mode: str | None = None
    raw_runtime_flags: str | None = Field(default=None, alias="raw-runtime-flags")

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        # model first: easier to read in logs and request dumps.
        return {"model": wire.pop("model"), **wire}

    def effective_runtime_flags(self) -> list[str]:
        """The flags the runner validates and stores (array, else raw shell-split)."""
        return validation.effective_runtime_flags(self.runtime_flags, self.raw_runtime_flags)

    def effective_mode(self) -> str:
        """The mode the runner files the config under when ``mode`` is absent."""
        if self.mode is not None:
            return self.mode
        return validation.default_mode_for_flags(self.effective_runtime_flags())

    def validate_for(self, backend: str) -> None:
        """Every rule the runner applies (plus range checks it leaves to engine start-up).

        ``backend`` is the one in the ``_configure`` path: its allow-list applies, even if the
        runner later auto-selects another backend for the model's format.
        """
        validation.validate_backend(backend)
        if self.mode is not None:
            validation.validate_mode(self.mode)
        if self.keep_alive is not None:
            validation.parse_keep_alive(self.keep_alive)
        if self.context_size is not None:
            validation.validate_int32("context-size", self.context_size)
        validation.validate_flag_sources(self.runtime_flags, self.raw_runtime_flags)
        validation.validate_runtime_flags(backend, self.effective_runtime_flags())
        if self.vllm is not None:
            if self.vllm.hf_overrides is not None:
                validation.validate_hf_overrides(self.vllm.hf_overrides)
            if self.vllm.gpu_memory_utilization is not None:
                validation.validate_gpu_memory_utilization(self.vllm.gpu_memory_utilization)
        if self.llamacpp is not None and self.llamacpp.reasoning_budget is not None:
            validation.validate_int32("reasoning-budget", self.llamacpp.reasoning_budget)

    def stored_config(self) -> BackendConfiguration:
        """What the runner keeps and echoes: flags split, keep_alive in Go form, and the zero
        values Go's ``omitempty`` drops (empty flags, empty hf-overrides, zero speculative
        fields) removed."""
        flags = self.effective_runtime_flags()
        keep_alive = None
        if self.keep_alive is not None:
            keep_alive = validation.keep_alive_echo(self.keep_alive)
        speculative = None
        if self.speculative is not None:
            draft, tokens, rate = self.speculative.normalized()
            speculative = SpeculativeConfig(
                draft_model=draft or None,
                num_tokens=tokens or None,
                min_acceptance_rate=rate or None,
            )
        vllm = None
        if self.vllm is not None:
            vllm = VLLMConfig(
                gpu_memory_utilization=self.vllm.gpu_memory_utilization,
                hf_overrides=self.vllm.hf_overrides or None,
            )
        return BackendConfiguration(
            context_size=self.context_size,
            runtime_flags=flags or None,
            speculative=speculative,
            keep_alive=keep_alive,
            vllm=vllm,
            llamacpp=self.llamacpp,
        )


class ModelConfigEntry(WireModel):
    """One element of ``GET /engines/_configure`` (Go field names, no json tags)."""

    backend: str = Field(alias="Backend")
    model: str = Field(alias="Model")
    model_id: str = Field(alias="ModelID")
    mode: str = Field(alias="Mode")
    config: BackendConfiguration = Field(alias="Config")


def _float_equal(first: float | None, second: float | None) -> bool:
    if first is None or second is None:
        return first is second
    return math.isclose(first, second, rel_tol=1e-12, abs_tol=1e-12)


def config_differences(
    requested: ConfigureRequest, entry: ModelConfigEntry, *, backend: str | None = None
) -> list[str]:
    """What differs between a request and what the runner reports having stored (empty = same).

    Compares the way the runner stores things: raw flags split, keep_alive in Go duration form,
    hf-overrides deeply, zero-valued speculative fields as absent. ``backend``, when given, must
    be the entry's backend.
    """
    differences: list[str] = []

    def compare(name: str, wanted: object, actual: object) -> None:
        if wanted != actual:
            differences.append(f"{name}: want {wanted!r}, runner has {actual!r}")

    stored = requested.stored_config()
    actual = entry.config
    if backend is not None:
        compare("backend", backend, entry.backend)
    compare("mode", requested.effective_mode(), entry.mode)
    compare("context-size", stored.context_size, actual.context_size)
    compare("runtime-flags", stored.runtime_flags or [], actual.runtime_flags or [])
    compare("keep_alive", stored.keep_alive, actual.keep_alive)
    compare(
        "speculative",
        (stored.speculative or SpeculativeConfig()).normalized(),
        (actual.speculative or SpeculativeConfig()).normalized(),
    )
    wanted_vllm, actual_vllm = stored.vllm or VLLMConfig(), actual.vllm or VLLMConfig()
    if not _float_equal(wanted_vllm.gpu_memory_utilization, actual_vllm.gpu_memory_utilization):
        compare(
            "vllm.gpu-memory-utilization",
            wanted_vllm.gpu_memory_utilization,
            actual_vllm.gpu_memory_utilization,
        )
    compare("vllm.hf-overrides", wanted_vllm.hf_overrides or {}, actual_vllm.hf_overrides or {})
    compare(
        "llamacpp.reasoning-budget",
        (stored.llamacpp or LlamaCppConfig()).reasoning_budget,
        (actual.llamacpp or LlamaCppConfig()).reasoning_budget,
    )
    return differences


# --- model store ------------------------------------------------------------------------------


class StoreModelConfig(WireModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    format: str | None = None
    quantization: str | None = None
    parameters: str | None = None
    architecture: str | None = None
    size: str | None = None
    gguf: dict[str, str] | None = None
    safetensors: dict[str, str] | None = None
    diffusers: dict[str, str] | None = None
    context_size: int | None = None


class StoreModel(WireModel):
    """A model in a runner's store (``GET /models``, ``GET /models/{ref}``)."""

    id: str
    tags: list[str] = Field(default_factory=list)
    created: int = 0
    config: StoreModelConfig = Field(default_factory=StoreModelConfig)

    def has_reference(
        self, reference: str, *, default_registry: str = references.DEFAULT_DOMAIN
    ) -> bool:
        """Whether one of the tags is ``reference`` (after model-runner's normalisation, on a
        runner whose ``DEFAULT_REGISTRY`` is ``default_registry``)."""
        return any(
            references.tag_matches_reference(tag, reference, default_registry=default_registry)
            for tag in self.tags
        )


def digest_of(model: StoreModel) -> str:
    """The model's ID: the sha256 digest of its manifest (``sha256:<hex>``)."""
    return model.id


class DeleteAction(WireModel):
    untagged: str | None = Field(default=None, alias="Untagged")
    deleted: str | None = Field(default=None, alias="Deleted")


# --- pull progress ----------------------------------------------------------------------------

PULL_SUCCESS: Final = "success"
PULL_ERROR: Final = "error"
PULL_PROGRESS: Final = "progress"
PULL_WARNING: Final = "warning"
CACHED_PREFIX: Final = "Using cached model"


class PullLayer(WireModel):
    id: str | None = None
    size: int = 0
    current: int = 0


class PullProgress(WireModel):
    """One NDJSON line of ``POST /models/create``."""

    type: str
    message: str = ""
    total: int = 0
    layer: PullLayer = Field(default_factory=PullLayer)
    mode: str | None = None

    @property
    def layer_percent(self) -> float | None:
        if self.layer.size <= 0:
            return None
        return min(100.0, 100.0 * self.layer.current / self.layer.size)


class PullProgressTracker:
    """Overall pull percentage from per-layer lines (each line reports only its own layer)."""

    def __init__(self) -> None:
        self._layers: dict[str, int] = {}
        self._total = 0

    def update(self, progress: PullProgress) -> float | None:
        if progress.type == PULL_SUCCESS:
            return 100.0
        if progress.type != PULL_PROGRESS:
            return self.percent
        self._total = max(self._total, progress.total)
        self._layers[progress.layer.id or ""] = progress.layer.current
        return self.percent

    @property
    def percent(self) -> float | None:
        if self._total <= 0:
            return None
        return min(100.0, 100.0 * sum(self._layers.values()) / self._total)


# --- runner status ----------------------------------------------------------------------------


class BackendStatus(WireModel):
    """One element of ``GET /engines/ps``."""

    backend_name: str
    model_name: str
    mode: str
    last_used: str | None = None
    in_use: bool = False
    loading: bool = False
    keep_alive: str | None = None


class DiskUsage(WireModel):
    models_disk_usage: int = 0
    default_backend_disk_usage: int = 0
