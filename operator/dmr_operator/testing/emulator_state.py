"""The model-runner emulator's state: catalogue, model store, configs and runners (no HTTP).

``emulator`` (the aiohttp front end) calls into ``RunnerState``; the rules it enforces come from
``dmr_operator.dmr`` so they match the operator's own. The store outlives a simulated process
restart (it is on disk in reality); configs and runners do not (reference/model-runner-api.md
§3.4, §3.5, §4.2, §4.4). Times are real seconds multiplied by ``time_scale`` where model-runner
would wait minutes (keep_alive), so tests can watch idle expiry happen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

from dmr_operator.dmr import golang, references, validation, wire

MODEL_NOT_FOUND: Final = "model not found"
RUNNER_ALREADY_ACTIVE: Final = "runner already active"
# Go's zero time.Time, which model-runner reports as last_used while a runner is busy.
ZERO_TIME: Final = "0001-01-01T00:00:00Z"
MAX_RUNNER_SLOTS: Final = 8


@dataclasses.dataclass(frozen=True)
class CatalogueModel:
    """A model the emulated registry can serve."""

    reference: str
    digest: str
    format: str = "gguf"
    size: int = 256 * 1024 * 1024  # bytes to "download"
    context_size: int | None = 40960
    parameters: str | None = None
    quantization: str | None = None
    architecture: str | None = None
    layers: int = 1
    created: int = 1_750_000_000
    # GGUF metadata as model-runner returns it (config.gguf, every value a string), e.g. the
    # attention dimensions a KV-cache estimate needs; None: the store shows no gguf map.
    gguf: Mapping[str, str] | None = None

    @property
    def size_label(self) -> str:
        """What model-runner shows as ``config.size`` and in ``Using cached model: <size>``."""
        gib = self.size / 2**30
        return f"{gib:.2f} GiB" if gib >= 1 else f"{self.size / 2**20:.2f} MiB"

    def store_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"format": self.format, "size": self.size_label}
        for key, value in (
            ("quantization", self.quantization),
            ("parameters", self.parameters),
            ("architecture", self.architecture),
            ("context_size", self.context_size),
        ):
            if value is not None:
                config[key] = value
        if self.gguf is not None:
            config["gguf"] = dict(self.gguf)
        return config


def fake_digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def llama_like(
    name: str,
    *,
    size: int,
    layers: int,
    kv_heads: int = 8,
    head_dim: int = 128,
    context: int = 8192,
) -> CatalogueModel:
    """``ai/<name>``: a GGUF model of ``size`` bytes whose metadata has the attention
    dimensions of a llama-architecture model (grouped-query, 4 query heads per KV head), as
    placement's memory estimate reads them."""
    heads = kv_heads * 4
    return CatalogueModel(
        reference=f"docker.io/ai/{name}:latest",
        digest=fake_digest(name),
        size=size,
        context_size=context,
        gguf={
            "general.architecture": "llama",
            "llama.block_count": str(layers),
            "llama.attention.head_count": str(heads),
            "llama.attention.head_count_kv": str(kv_heads),
            "llama.attention.key_length": str(head_dim),
            "llama.attention.value_length": str(head_dim),
            "llama.embedding_length": str(heads * head_dim),
            "llama.context_length": str(context),
        },
    )


def _entry(reference: str, *, digest_seed: str | None = None, **kwargs: Any) -> CatalogueModel:
    return CatalogueModel(
        reference=reference, digest=fake_digest(digest_seed or reference), **kwargs
    )


_DEFAULT_MODELS: Final = (
    # ai/qwen3:8B-Q4_K_M is the same artifact as :latest, so pulling both shows
    # "Using cached model" and gives one model two tags (delete must then be forced).
    _entry("ai/qwen3:latest", parameters="8.19B", quantization="Q4_K_M", architecture="qwen3"),
    _entry(
        "ai/qwen3:8B-Q4_K_M",
        digest_seed="ai/qwen3:latest",
        parameters="8.19B",
        quantization="Q4_K_M",
        architecture="qwen3",
    ),
    _entry("ai/qwen3:14B", size=512 * 2**20, parameters="14.8B", architecture="qwen3", layers=2),
    _entry("ai/qwen3:0.6B", size=64 * 2**20, parameters="0.6B", architecture="qwen3"),
    # The real tier's model (dmr_operator.testing.realpeers): Gemma 3 270M Q4_K_M under three
    # names, three models (IDs) as the loopback registry serves them, with the metadata the real
    # runner reports for it.
    *(
        _entry(
            name,
            size=253_113_024,
            parameters="268.10M",
            quantization="MOSTLY_Q4_K_M",
            architecture="gemma3",
            context_size=32768,
        )
        for name in ("ai/gemma3:270m", "ai/gemma3-draft:270m", "ai/gemma3-embedding:270m")
    ),
    _entry(
        "ai/smollm2:latest",
        size=32 * 2**20,
        parameters="361.82M",
        architecture="llama",
        context_size=8192,
    ),
    _entry(
        "ai/embeddinggemma:latest",
        size=48 * 2**20,
        parameters="307.58M",
        architecture="gemma-embedding",
        context_size=2048,
    ),
    _entry(
        "ai/qwen3-reranker:latest",
        size=48 * 2**20,
        parameters="595.78M",
        architecture="qwen3",
        context_size=8192,
    ),
    _entry(
        "ai/qwen3-vllm:latest",
        format="safetensors",
        size=128 * 2**20,
        parameters="8.19B",
        architecture="qwen3",
        layers=2,
    ),
    _entry("ai/stable-diffusion:latest", format="dduf", size=96 * 2**20, context_size=None),
    _entry(
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        size=64 * 2**20,
        parameters="1.24B",
        quantization="Q4_K_M",
        architecture="llama",
        context_size=131072,
    ),
)
DEFAULT_CATALOGUE: Final[Mapping[str, CatalogueModel]] = {
    references.qualified_tag(model.reference): model for model in _DEFAULT_MODELS
}


@dataclasses.dataclass
class StoredModel:
    digest: str
    tags: list[str]
    source: CatalogueModel

    def to_json(self, *, with_tags: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.digest}
        if with_tags and self.tags:
            data["tags"] = list(self.tags)
        data["created"] = self.source.created
        data["config"] = self.source.store_config()
        return data

    def to_openai(self) -> dict[str, Any]:
        dmr: dict[str, Any] = {}
        config = self.source
        if config.context_size is not None:
            dmr["context_window"] = config.context_size
        for key, value in (
            ("architecture", config.architecture),
            ("parameters", config.parameters),
            ("quantization", config.quantization),
            ("size", config.size_label),
        ):
            if value:
                dmr[key] = value
        return {
            "id": self.tags[0] if self.tags else self.digest,
            "object": "model",
            "created": config.created,
            "owned_by": "docker",
            "dmr": dmr,
        }


class ModelStore:
    """The on-disk store of one runner: survives emulated restarts."""

    def __init__(self) -> None:
        self.models: list[StoredModel] = []
        # The process's DEFAULT_REGISTRY: tags of what it pulls carry that host.
        self.default_registry = references.DEFAULT_DOMAIN

    def tag_for(self, reference: str) -> str:
        """The tag this store keeps for ``reference``."""
        return references.qualified_tag(reference, default_registry=self.default_registry)

    def resolve_id(self, text: str) -> str | None:
        for model in self.models:
            hex_part = model.digest.removeprefix("sha256:")
            if text in (model.digest, hex_part) or (len(text) == 12 and hex_part[:12] == text):
                return model.digest
        return None

    def normalize(self, reference: str) -> str:
        return references.normalize_reference(reference, resolve_id=self.resolve_id)

    def get_local(self, reference: str) -> StoredModel | None:
        """model-runner's ``GetLocal``: by normalised tag or by (short) ID."""
        normalized = self.normalize(reference)
        if not normalized:
            return None
        for model in self.models:
            if model.digest == normalized:
                return model
        wanted = self.tag_for(normalized)
        for model in self.models:
            if wanted in model.tags:
                return model
        return None

    def find_by_partial_name(self, name: str) -> StoredModel | None:
        """``GET /models/{ref}`` fallback: a tag whose last path part, minus tag, is ``name``."""
        for model in self.models:
            for tag in model.tags:
                bare = tag.rsplit(":", 1)[0] if ":" in tag else tag
                if bare.rsplit("/", 1)[-1] == name:
                    return model
        return None

    def resolve_model_id(self, reference: str) -> str:
        """model-runner's ``ResolveID``: the digest when local, else the raw string."""
        model = self.get_local(reference)
        return model.digest if model is not None else reference

    def by_digest(self, digest: str) -> StoredModel | None:
        return next((model for model in self.models if model.digest == digest), None)

    def add(self, source: CatalogueModel, tag: str) -> StoredModel:
        model = self.by_digest(source.digest)
        if model is None:
            model = StoredModel(digest=source.digest, tags=[], source=source)
            self.models.append(model)
        # Re-pointing a tag moves it off any other model, as the store does.
        for other in self.models:
            if other is not model and tag in other.tags:
                other.tags.remove(tag)
        if tag not in model.tags:
            model.tags.append(tag)
        return model

    def delete(self, reference: str, *, force: bool) -> list[dict[str, str]]:
        """model-runner's ``DeleteModel``; raises KeyError (404) or StoreConflict (409)."""
        normalized = self.normalize(reference)
        model = self.get_local(reference)
        if model is None:
            raise KeyError(reference)
        is_tag = model.digest != normalized and "@" not in reference
        actions: list[dict[str, str]] = []
        tag_count = len(model.tags)
        if is_tag:
            tag = self.tag_for(normalized)
            if tag in model.tags:
                model.tags.remove(tag)
                actions.append({"Untagged": tag})
            if tag_count > 1:
                return actions
        if tag_count > 1 and not force:
            raise StoreConflict(
                f"unable to delete {golang.quote(reference)} (must be forced) due to multiple tag "
                "references: resource conflict"
            )
        actions.extend({"Untagged": tag} for tag in model.tags)
        self.models.remove(model)
        actions.append({"Deleted": model.digest})
        return actions

    def disk_usage(self) -> int:
        return sum(model.source.size for model in self.models)


class StoreConflict(Exception):
    """A delete that must be forced."""


# --- configs and runners ----------------------------------------------------------------------

ConfigKey = tuple[str, str, str]  # backend, model ID (or raw ref), mode
RunnerKey = tuple[str, str, str, str]  # backend, model ID, draft model ID, mode


@dataclasses.dataclass
class Runner:
    key: RunnerKey
    model_ref: str
    references: int = 0
    last_used: float = dataclasses.field(default_factory=time.time)
    loading: bool = True
    held_until: float = 0.0
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def backend(self) -> str:
        return self.key[0]

    @property
    def model_id(self) -> str:
        return self.key[1]

    @property
    def mode(self) -> str:
        return self.key[3]

    def in_use(self, now: float) -> bool:
        return self.references > 0 or self.loading or now < self.held_until


def rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + (
        f".{int(timestamp % 1 * 1e9):09d}".rstrip("0").rstrip(".") + "Z"
    )


class ConfigError(Exception):
    """A configure request the runner refuses; ``status`` is the HTTP code it answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Loader:
    """In-memory configs and runners of one runner process (lost on restart)."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.configs: dict[ConfigKey, wire.BackendConfiguration] = {}
        self.runners: dict[RunnerKey, Runner] = {}

    def config_for(
        self, backend: str, model_id: str, mode: str
    ) -> wire.BackendConfiguration | None:
        config = self.configs.get((backend, model_id, mode))
        if config is None and mode in ("reranking", "image-generation"):
            config = self.configs.get((backend, model_id, "completion"))
        return config

    def keep_alive_ns(self, runner: Runner) -> int:
        config = self.configs.get((runner.backend, runner.model_id, runner.mode))
        if config is not None and config.keep_alive is not None:
            return validation.parse_keep_alive(config.keep_alive)
        return validation.DEFAULT_KEEP_ALIVE

    def configure(self, path_backend: str, request: wire.ConfigureRequest) -> str:
        """``ConfigureRunner``: validate, pick the backend, store; returns the backend used."""
        try:
            flags = request.effective_runtime_flags()
            validation.validate_runtime_flags(path_backend, flags)
            if request.vllm is not None and request.vllm.hf_overrides is not None:
                validation.validate_hf_overrides(request.vllm.hf_overrides)
        except validation.RunnerValidationError as error:
            raise ConfigError(500, str(error)) from None
        mode = request.effective_mode()
        backend = path_backend
        local = self.store.get_local(request.model)
        if local is not None:
            backend = validation.default_backend_for_format(
                local.source.format, path_backend=path_backend
            )
        model_id = self.store.resolve_model_id(request.model)
        stored = request.stored_config()
        key: ConfigKey = (backend, model_id, mode)
        if key in self.configs and self.configs[key] == stored:
            return backend
        draft_id = ""
        if stored.speculative is not None and stored.speculative.draft_model:
            draft_id = self.store.resolve_model_id(stored.speculative.draft_model)
        runner_key: RunnerKey = (backend, model_id, draft_id, mode)
        if runner_key in self.runners:
            self.evict(backend=backend, model_id=model_id, mode=mode)
        # A runner still loading is not in model-runner's runner table yet, so it never blocks.
        blocking = self.runners.get(runner_key)
        if blocking is not None and not blocking.loading:
            raise ConfigError(409, RUNNER_ALREADY_ACTIVE)
        self.configs[key] = stored
        return backend

    def config_entries(self, model: str | None) -> list[dict[str, Any]]:
        wanted = self.store.resolve_model_id(model) if model else None
        entries = []
        for (backend, model_id, mode), config in self.configs.items():
            local = self.store.get_local(model_id)
            if local is None or (wanted is not None and model_id != wanted):
                continue
            entries.append(
                {
                    "Backend": backend,
                    "Model": local.tags[0] if local.tags else "",
                    "ModelID": model_id,
                    "Mode": mode,
                    "Config": config.to_wire(),
                }
            )
        return entries

    def evict(self, *, backend: str, model_id: str, mode: str) -> None:
        """``evictRunner``: unused runners of (backend or any if empty, model, mode)."""
        now = time.time()
        for key, runner in list(self.runners.items()):
            if (
                not runner.in_use(now)
                and (not backend or runner.backend == backend)
                and runner.model_id == model_id
                and runner.mode == mode
            ):
                del self.runners[key]

    def evict_for_a_new_runner(self, slots: int) -> bool:
        """model-runner's loader with every slot taken (``evict(false)``): every unused runner
        goes at once, whatever its keep_alive (even -1), seen on the real server. False when
        all are busy (the request waits)."""
        if len(self.runners) < slots:
            return True
        self.evict_all_unused()
        return len(self.runners) < slots

    def evict_all_unused(self) -> None:
        now = time.time()
        for key, runner in list(self.runners.items()):
            if not runner.in_use(now):
                del self.runners[key]

    def unload(self, *, unload_all: bool, backend: str, models: Iterable[str]) -> int:
        before = len(self.runners)
        if unload_all:
            self.configs.clear()
            self.evict_all_unused()
        else:
            for model in models:
                model_id = self.store.resolve_model_id(model)
                for key in [k for k in self.configs if k[0] == backend and k[1] == model_id]:
                    del self.configs[key]
                for mode in validation.MODES:
                    self.evict(backend=backend, model_id=model_id, mode=mode)
        return before - len(self.runners)

    def expire_idle(self, *, time_scale: float) -> None:
        now = time.time()
        for key, runner in list(self.runners.items()):
            if runner.in_use(now):
                continue
            timeout = self.keep_alive_ns(runner)
            if timeout < 0:
                continue
            if now - runner.last_used > timeout / golang.SECOND * time_scale:
                del self.runners[key]

    def status(self) -> list[dict[str, Any]]:
        now = time.time()
        result: list[dict[str, Any]] = []
        for runner in self.runners.values():
            entry: dict[str, Any] = {
                "backend_name": runner.backend,
                "model_name": runner.model_ref,
                "mode": runner.mode,
            }
            if runner.loading:
                entry["last_used"] = ZERO_TIME
                entry["loading"] = True
                result.append(entry)
                continue
            busy = runner.in_use(now)
            entry["last_used"] = ZERO_TIME if busy else rfc3339(runner.last_used)
            if busy:
                entry["in_use"] = True
            config = self.configs.get((runner.backend, runner.model_id, runner.mode))
            if config is not None and config.keep_alive is not None:
                entry["keep_alive"] = config.keep_alive
            result.append(entry)
        return result


# --- decoding like Go's encoding/json into model-runner's ConfigureRequest ----------------------


class DecodeError(ValueError):
    """The body would fail ``json.Unmarshal`` into the Go struct (400 ``invalid request``)."""


def _pick(data: Mapping[str, Any], name: str) -> Any:
    """Go matches JSON keys to fields case-insensitively (an exact match wins)."""
    if name in data:
        return data[name]
    for key, value in data.items():
        if key.lower() == name.lower():
            return value
    return None


def _string(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DecodeError


def _integer(value: Any, *, bits: int = 64) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise DecodeError
    return value


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError
    return float(value)


def _object(value: Any) -> Mapping[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise DecodeError


def decode_configure_request(data: Any) -> wire.ConfigureRequest:
    """Build the request the way Go would decode it, or raise DecodeError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DecodeError
    mode = _string(_pick(data, "mode"))
    if mode is not None and mode not in validation.MODES:
        raise DecodeError
    keep_alive = _string(_pick(data, "keep_alive"))
    if keep_alive is not None:
        try:
            validation.parse_keep_alive(keep_alive)
        except validation.RunnerValidationError:
            raise DecodeError from None
    flags = _pick(data, "runtime-flags")
    if flags is not None and (
        not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags)
    ):
        raise DecodeError
    speculative = None
    if (raw_speculative := _object(_pick(data, "speculative"))) is not None:
        speculative = wire.SpeculativeConfig(
            draft_model=_string(_pick(raw_speculative, "draft_model")),
            num_tokens=_integer(_pick(raw_speculative, "num_tokens")),
            min_acceptance_rate=_number(_pick(raw_speculative, "min_acceptance_rate")),
        )
    vllm = None
    if (raw_vllm := _object(_pick(data, "vllm"))) is not None:
        overrides = _object(_pick(raw_vllm, "hf-overrides"))
        vllm = wire.VLLMConfig(
            gpu_memory_utilization=_number(_pick(raw_vllm, "gpu-memory-utilization")),
            hf_overrides=dict(overrides) if overrides is not None else None,
        )
    llamacpp = None
    if (raw_llamacpp := _object(_pick(data, "llamacpp"))) is not None:
        llamacpp = wire.LlamaCppConfig(
            reasoning_budget=_integer(_pick(raw_llamacpp, "reasoning-budget"), bits=32)
        )
    return wire.ConfigureRequest(
        model=_string(_pick(data, "model")) or "",
        mode=mode,
        raw_runtime_flags=_string(_pick(data, "raw-runtime-flags")),
        context_size=_integer(_pick(data, "context-size"), bits=32),
        runtime_flags=flags,
        speculative=speculative,
        keep_alive=keep_alive,
        vllm=vllm,
        llamacpp=llamacpp,
    )
