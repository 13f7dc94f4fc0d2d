"""The DMRModel kind: one model on a pool of model-runner pods, pulled, configured and verified.

Every field maps to a model-runner wire name (said in its description) and carries as many of
model-runner's own rules as a plain OpenAPI schema can express (enums, ranges,
patterns), so ``kubectl apply`` rejects a bad object at admission. What a schema cannot say
(flag allow-lists per backend, ``hf_overrides`` keys at every depth, exclusivity between fields)
is checked by ``dmr_operator.reconcile.dmrmodel.validate_spec`` before any HTTP call.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from dmr_operator import constants
from dmr_operator.api.v1alpha1.common import CamelModel, Condition, admission_rules
from dmr_operator.dmr import references, validation

Backend = Literal["llama.cpp", "vllm", "mlx", "sglang", "diffusers"]
Mode = Literal["completion", "embedding", "reranking", "image-generation"]
PullPolicy = Literal["IfNotPresent", "Always", "Never"]
DeletionPolicy = Literal["Unload", "Delete", "Retain"]
BusyPolicy = Literal["WaitIdle", "Unload"]
Phase = Literal["Pending", "Pulling", "Configuring", "Ready", "Degraded", "Failed"]
RunnerState = Literal[
    "Pending", "Queued", "Pulling", "Configuring", "Loading", "Configured", "Busy", "Failed"
]

# A flag element may not contain a path separator (model-runner rejects '/' and '\').
_NO_PATH_PATTERN = r"^[^/\\]*$"
_INT32_MAX = 2**31 - 1


class Speculative(CamelModel):
    """Speculative decoding with a smaller draft model (pulled together with the model)."""

    draft_model: str = Field(
        max_length=512,
        pattern=references.MODEL_REFERENCE_PATTERN,
        description="Draft model reference, pulled like the main model [speculative.draft_model].",
    )
    num_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Tokens the draft model proposes per step [speculative.num_tokens].",
    )
    min_acceptance_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Minimum draft acceptance probability, 0..1 [speculative.min_acceptance_rate].",
    )


class VLLMOptions(CamelModel):
    """Options only the vLLM backend reads."""

    gpu_memory_utilization: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Fraction of GPU memory vLLM may use, 0..1 [vllm.gpu-memory-utilization].",
    )
    hf_overrides: dict[str, Any] | None = Field(
        default=None,
        description="Overrides of the Hugging Face model config, passed as --hf-overrides. "
        "Every key at every depth must match ^[a-zA-Z_][a-zA-Z0-9_]*$ [vllm.hf-overrides].",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class LabelSelectorRequirement(CamelModel):
    """One set-based requirement of a label selector."""

    key: str = Field(min_length=1, max_length=317, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values."
    )
    values: list[str] | None = Field(
        default=None, description="Values for In and NotIn; empty for Exists and DoesNotExist."
    )


class LabelSelector(CamelModel):
    """A standard Kubernetes label selector."""

    match_labels: dict[str, str] | None = Field(
        default=None, description="Labels a runner pod must carry, all of them."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, description="Set-based requirements, all of them."
    )


class SecretKeyRef(CamelModel):
    """A key of a Secret in the DMRModel's own namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The Secret's name.",
    )
    key: str = Field(
        default="token",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="The key whose value is used.",
    )


class ModelPlacement(CamelModel):
    """How many pods of its pool hold the model: the pool as a shared, capacity-aware cache."""

    replicas: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Runner pods of the pool that hold the model (pulled, configured, verified) "
        "and serve it. The operator chooses them where the model fits: its weights plus the KV "
        "cache of its contextSize within a pod's free GPU memory (host memory on CPU pods) and "
        "runner slots, never overcommitting a pod, replicas spread over nodes, placements kept "
        "stable. Consumers reach only those pods, through the model's own Service "
        "(status.endpoint). A model that fits nowhere is Ready=False, reason Insufficient, with "
        "the numbers. Unset (default): every pod of the pool, through the pool's Service.",
    )


class Runners(CamelModel):
    """Where the model lives: model-runner pods of this namespace, or one external runner."""

    model_config = admission_rules(
        (
            "!(has(self.url) && has(self.poolSelector))",
            "url and poolSelector are exclusive; pick one",
            ".url",
        ),
    )

    pool_selector: LabelSelector | None = Field(
        default=None,
        description="Label selector over model-runner pods in this namespace; every Ready pod it "
        "matches gets the model. Default: dmr.dev/pool=default.",
    )
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="Base URL of an external model-runner (e.g. http://gpu-box:12434). "
        "Allowed only for hosts on the operator's --allowed-runner-hosts list; link-local "
        "and metadata addresses are always refused. Exclusive with poolSelector.",
    )


class DMRModelSpec(CamelModel):
    """Desired state of a model on model-runner."""

    model_config = admission_rules(
        (
            "!(has(self.runtimeFlags) && size(self.runtimeFlags) > 0"
            " && has(self.rawRuntimeFlags) && size(self.rawRuntimeFlags) > 0)",
            "runtimeFlags and rawRuntimeFlags are exclusive; pick one",
            ".rawRuntimeFlags",
        ),
        (
            "!has(self.vllm) || !has(self.backend) || self.backend == 'vllm'",
            "vllm options need backend vllm (or no backend, for a safetensors model)",
            ".vllm",
        ),
        (
            "!has(self.speculative) || !has(self.backend) || self.backend == 'llama.cpp'",
            "speculative decoding is a llama.cpp feature: no backend, or backend llama.cpp",
            ".speculative",
        ),
        (
            "!has(self.backend) || self.backend != 'diffusers'"
            " || (has(self.mode) && self.mode == 'image-generation')",
            "backend diffusers serves only mode image-generation",
            ".mode",
        ),
        (
            "!has(self.contextSize) || self.contextSize != 0",
            "0 is ignored by model-runner; use a positive size, or -1 for unlimited",
            ".contextSize",
        ),
        (
            "!has(self.placement) || !has(self.placement.replicas) || !has(self.runners)"
            " || !has(self.runners.url)",
            "placement.replicas chooses pods of a pool: it needs runners.poolSelector, not url",
            ".placement",
        ),
    )

    model: str = Field(
        min_length=1,
        max_length=512,
        pattern=references.MODEL_REFERENCE_PATTERN,
        description="Model reference as model-runner takes it: ai/qwen3:14B, "
        "hf.co/org/repo:Q4_K_M, registry.example.com/x:tag. Normalised like model-runner does "
        "(qwen3 -> ai/qwen3:latest) [model].",
    )
    backend: Backend | None = Field(
        default=None,
        description="Inference engine; decides the _configure path /engines/{backend}/_configure "
        "and the runtime-flag allow-list. Default: from the model's format, as model-runner "
        "decides (GGUF -> llama.cpp, safetensors -> vllm, DDUF -> diffusers).",
    )
    mode: Mode | None = Field(
        default=None,
        description="Runner mode [mode]. Default: completion (embedding when runtimeFlags "
        "contain --embeddings).",
    )
    context_size: int | None = Field(
        default=None,
        ge=-1,
        le=_INT32_MAX,
        description="Context window in tokens; -1 = unlimited on llama.cpp [context-size].",
    )
    keep_alive: str | None = Field(
        default=None,
        max_length=64,
        pattern=validation.KEEP_ALIVE_PATTERN,
        description='How long an idle model stays loaded: a Go duration ("30m", "1h30m"), "0" '
        '(unload after each request) or "-1" (never unload). Quote it in YAML [keep_alive]. '
        "Unset: the runner's default, 5 minutes, or 8 hours on a runner with "
        "MODEL_RUNNER_ENVIRONMENT=cloud and GPUs visible (NVIDIA_VISIBLE_DEVICES; the chart's "
        "pools set cloud). Runners past their slots evict idle models even with -1.",
    )
    runtime_flags: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Extra engine flags, one element per token; checked against model-runner's "
        "allow-list for the backend; no '/' or '\\'. Exclusive with rawRuntimeFlags "
        "[runtime-flags].",
        json_schema_extra={
            "items": {"type": "string", "maxLength": 256, "pattern": _NO_PATH_PATTERN}
        },
    )
    raw_runtime_flags: str | None = Field(
        default=None,
        max_length=4096,
        pattern=_NO_PATH_PATTERN,
        description="Extra engine flags as one shell-quoted string (split like model-runner "
        "does). Exclusive with runtimeFlags [raw-runtime-flags].",
    )
    thinking_budget: int | str | None = Field(
        default=None,
        description="Reasoning budget: tokens, or an effort name (none 0, minimal 1024, low "
        "2048, medium 8192, high 16384, xhigh/max 32768, adaptive -1). llama.cpp: "
        "[llamacpp.reasoning-budget]; vLLM: sent per request by Agents (thinking_token_budget).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    speculative: Speculative | None = Field(
        default=None, description="Speculative decoding [speculative]."
    )
    vllm: VLLMOptions | None = Field(default=None, description="vLLM-only options [vllm].")
    runners: Runners | None = Field(
        default=None,
        description="Where the model is served. Default: pods labelled dmr.dev/pool=default.",
    )
    pull_policy: PullPolicy = Field(
        default="IfNotPresent",
        description="IfNotPresent pulls a runner's missing model; Always pulls on every "
        "(re)configuration; Never expects the model in the runner's store.",
    )
    deletion_policy: DeletionPolicy = Field(
        default="Unload",
        description="On delete: Unload the model from the runners, also Delete it from their "
        "stores, or Retain everything.",
    )
    busy_policy: BusyPolicy = Field(
        default="WaitIdle",
        description='When a runner answers 409 "runner already active": WaitIdle retries with '
        "backoff; Unload evicts the running model and configures again.",
    )
    pull_token_secret: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key whose value is sent as the pull's bearer token (gated or "
        "private Hugging Face models, private registries). Read at each pull, never stored.",
    )
    placement: ModelPlacement | None = Field(
        default=None,
        description="How many pods of the pool hold the model (default: all of them).",
    )
    warmup: bool = Field(
        default=False,
        description="Ready only once the model is loaded and answering on every runner: after "
        "configuring, the operator loads it (X-Preload-Only) and confirms it in /engines/ps. "
        "Off (default): Ready means configured and read back; the first request loads it.",
    )


class RunnerStatus(CamelModel):
    """What one runner pod reports about this model."""

    pod: str = Field(description="Runner pod name (or the external URL's host).")
    node: str | None = Field(default=None, description="Node the pod runs on.")
    address: str | None = Field(default=None, description="host:port the operator talks to.")
    state: RunnerState = Field(description="Where this runner is in pull -> configure -> verify.")
    pulled_percent: int | None = Field(
        default=None, ge=0, le=100, description="Pull progress of the model (and draft)."
    )
    configured_at: str | None = Field(
        default=None, description="When the read-back last matched (RFC 3339)."
    )
    message: str | None = Field(default=None, description="The runner's last error, verbatim.")
    loaded: bool | None = Field(
        default=None,
        description="With spec.warmup: the model was loaded and listed by the runner's "
        "/engines/ps after this configuration (it may be unloaded later when idle).",
    )
    keep_alive: str | None = Field(
        default=None,
        description="How long this runner keeps the model loaded when idle: spec.keepAlive as "
        "the runner echoes it, else the runner's own default (5m0s; 8h0m0s with "
        "MODEL_RUNNER_ENVIRONMENT=cloud and NVIDIA GPUs).",
    )


class PlacedRunner(CamelModel):
    """A pod the placement chose for the model."""

    pod: str = Field(description="Runner pod name.")
    node: str | None = Field(default=None, description="Node the pod runs on.")


class DMRModelStatus(CamelModel):
    """Observed state, written by the operator."""

    phase: Phase | None = Field(default=None, description="Summary for people and printers.")
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: list[Condition] | None = Field(
        default=None, description="Pulled, Configured and Ready, with reasons."
    )
    normalized_model: str | None = Field(
        default=None, description="The model reference after model-runner's normalisation."
    )
    digest: str | None = Field(default=None, description="Model ID (sha256 manifest digest).")
    backend: str | None = Field(default=None, description="The backend actually configured.")
    config_hash: str | None = Field(
        default=None, description="Hash of the _configure request the runners were given."
    )
    runners: list[RunnerStatus] | None = Field(default=None, description="One entry per runner.")
    ready_runners: int | None = Field(default=None, description="Runners whose config matches.")
    total_runners: int | None = Field(default=None, description="Runners selected.")
    runners_summary: str | None = Field(
        default=None, description="ready/total, for the RUNNERS printer column."
    )
    effective: dict[str, Any] | None = Field(
        default=None,
        description="The configuration read back from GET /engines/_configure on a runner "
        "(not what was sent).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    endpoint: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL for consumers: the pool Service's /v1 alias, "
        "or with placement.replicas the model's own Service, whose endpoints are exactly the "
        "pods holding it.",
    )
    placement: list[PlacedRunner] | None = Field(
        default=None,
        description="With placement.replicas: the pods chosen to hold the model, and their "
        "nodes (a pod is served from once it is Configured there).",
    )
    placed_summary: str | None = Field(
        default=None,
        description="placed/wanted (pods serving it / placement.replicas, or / pool pods), for "
        "the PLACED printer column.",
    )


class DMRModel(CamelModel):
    """A model served by Docker Model Runner pods, configured and kept configured."""

    api_version: Literal["dmr.dev/v1alpha1"] = Field(default="dmr.dev/v1alpha1", alias="apiVersion")
    kind: Literal["DMRModel"] = "DMRModel"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: DMRModelSpec
    status: DMRModelStatus | None = None

    CRD: ClassVar[dict[str, Any]] = {
        "kind": constants.DMRMODEL_KIND,
        "plural": constants.DMRMODEL_PLURAL,
        "singular": "dmrmodel",
        "short_names": ["dmrm"],
        "categories": [constants.CATEGORY],
        "printer_columns": [
            {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
            {"name": "Backend", "type": "string", "jsonPath": ".status.backend"},
            {"name": "Ctx", "type": "integer", "jsonPath": ".spec.contextSize"},
            {"name": "KeepAlive", "type": "string", "jsonPath": ".spec.keepAlive"},
            {"name": "Runners", "type": "string", "jsonPath": ".status.runnersSummary"},
            {"name": "Placed", "type": "string", "jsonPath": ".status.placedSummary"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }
