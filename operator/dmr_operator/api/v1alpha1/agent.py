"""The ``Agent`` kind: a docker-agent configuration run as pods against DMRModels.

This module is the single source of the Agent CRD schema (``api.crdgen`` turns it into YAML): every
field's description is its ``kubectl explain`` text. The pure logic that resolves an Agent's
models, renders its docker-agent YAML and its children, and computes its status lives in
``reconcile.agent``; the kopf handlers that feed it live in ``handlers``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field
from pydantic.config import JsonDict

from dmr_operator import constants
from dmr_operator.api.v1alpha1.common import CamelModel, Condition, admission_rules

# Pinned so a cluster never silently picks up a new docker-agent release; a released tag of the
# official image (https://hub.docker.com/r/docker/docker-agent). Overridden per Agent by spec.image.
DEFAULT_AGENT_IMAGE = "docker/docker-agent:1.149.0"
# model-runner publishes no versioned CUDA tag users agree on; latest-cuda is what its own chart
# recommends for NVIDIA nodes. Overridden per Agent by spec.runner.image.
DEFAULT_SIDECAR_IMAGE = "docker/model-runner:latest-cuda"

_PRESERVE: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}
# A Kubernetes resource.Quantity as users write it for storage sizes ("100Gi", "500M", "1e9").
_QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|[KMGTPE]i?|[kmun])?$"
# A DNS-1123 subdomain, the rule for names of RuntimeClasses, ServiceAccounts, StorageClasses.
_DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

AgentPhase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
RunnerMode = Literal["Pool", "Sidecar"]
GpuResource = Literal["nvidia.com/gpu", "amd.com/gpu"]


class SidecarGpus(CamelModel):
    """GPUs given to the model-runner sidecar container of each agent pod: through a device
    plugin's extended resource (default), or through Dynamic Resource Allocation (DRA)."""

    model_config = admission_rules(
        (
            "!has(self.deviceClassName) || !has(self.resourceClaimTemplateName)",
            "deviceClassName (a claim template the operator makes) and resourceClaimTemplateName "
            "(a template of your own) are two ways to ask for GPUs through DRA: give one",
            ".resourceClaimTemplateName",
        ),
        (
            "!has(self.selectors) || size(self.selectors) == 0 || has(self.deviceClassName)",
            "selectors narrow down the devices of deviceClassName: set deviceClassName too",
            ".selectors",
        ),
    )

    resource: GpuResource = Field(
        default="nvidia.com/gpu",
        description="Extended resource name of the GPU device plugin: nvidia.com/gpu (default) or "
        "amd.com/gpu. Use a matching runner image (…-cuda for NVIDIA, …-rocm for AMD). Not "
        "used with DRA (deviceClassName or resourceClaimTemplateName).",
    )
    count: int = Field(
        default=1,
        ge=1,
        le=16,
        description="GPUs per pod (default 1): the extended resource's limit and request, like "
        "the gpu.count value of model-runner's own Helm chart, or the number of devices the "
        "DRA claim asks for with deviceClassName.",
    )
    device_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN_PATTERN,
        description="Ask for the GPUs through Dynamic Resource Allocation (Kubernetes 1.34+, "
        "resource.k8s.io/v1) instead of an extended resource: the DeviceClass of your DRA driver "
        "(e.g. gpu.nvidia.com). The operator makes a ResourceClaimTemplate "
        "<agent>-gpus-<hash> (count devices of this class matching every selector); each pod "
        "gets its own claim and the scheduler places it on a node that has such devices free.",
    )
    selectors: list[Annotated[str, Field(min_length=1, max_length=10240)]] = Field(
        default_factory=list,
        max_length=32,
        description="CEL expressions a device must all satisfy (DRA, with deviceClassName), "
        "e.g. \"device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('40Gi')) >= 0\" "
        "or \"device.attributes['gpu.nvidia.com'].productName.startsWith('NVIDIA H100')\". "
        "The apiserver checks them when the claim template is made; a refused expression is "
        "reported in the Agent's ConfigValid condition.",
    )
    resource_claim_template_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN_PATTERN,
        description="Ask for the GPUs through DRA with a ResourceClaimTemplate of your own in "
        "the Agent's namespace (e.g. one your platform team ships): each pod gets a claim made "
        "from it for the model-runner container. count, resource and selectors are not used.",
    )

    @property
    def dynamic(self) -> bool:
        """True when the GPUs come through DRA claims rather than an extended resource."""
        return self.device_class_name is not None or self.resource_claim_template_name is not None


class SidecarStorage(CamelModel):
    """Where the sidecar's model store (/models, model-runner's MODELS_PATH) lives."""

    size: str | None = Field(
        default=None,
        pattern=_QUANTITY_PATTERN,
        description="Size of a persistent model store per pod (e.g. 100Gi). Unset (default): an "
        "emptyDir, so models are pulled again whenever a pod is replaced. Set: the pods run "
        "as a StatefulSet with one PersistentVolumeClaim per replica (deleted with the Agent "
        "unless retainOnDelete), so pulled models survive restarts, config rollouts and "
        "scaling down and up again.",
    )
    retain_on_delete: bool = Field(
        default=False,
        description="Keep the model-store claims (and the weights pulled into them) when the "
        "Agent is deleted: its StatefulSet's persistentVolumeClaimRetentionPolicy.whenDeleted "
        "becomes Retain instead of Delete. Claims are always kept when replicas shrink. Remove "
        "kept claims with `kubectl delete pvc -l dmr.dev/agent=NAME`. Only used with size.",
    )
    storage_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN_PATTERN,
        description="StorageClass of the persistent model store (default: the cluster default). "
        "Only used with size.",
    )


class AgentRunner(CamelModel):
    """Where the Agent's models run."""

    model_config = admission_rules(
        (
            "self.mode == 'Sidecar' || (!has(self.gpus) && !has(self.resources)"
            " && (!has(self.storage) || !has(self.storage.size)))",
            "gpus, resources and storage.size are for the sidecar model-runner: they need "
            "mode Sidecar (Pool mode uses the DMRModels' runner pools)",
            ".mode",
        ),
    )

    mode: RunnerMode = Field(
        default="Pool",
        description="Pool (default): use the model-runner pools the DMRModels are configured on "
        "(base_url = each DMRModel's status.endpoint). Sidecar: every agent pod gets its own "
        "model-runner container (with GPUs), the operator configures the referenced DMRModels on "
        "it and docker-agent talks to it on 127.0.0.1:12434.",
    )
    image: str = Field(
        default=DEFAULT_SIDECAR_IMAGE,
        min_length=1,
        description=f"model-runner image of the sidecar (Sidecar mode only; default "
        f"{DEFAULT_SIDECAR_IMAGE}; docker/model-runner:latest-rocm for AMD, "
        f"…:latest-vllm-cuda for safetensors models on vLLM).",
    )
    gpus: SidecarGpus | None = Field(
        default=None,
        description="GPUs for the sidecar (Sidecar mode only; default: none, CPU inference).",
    )
    storage: SidecarStorage = Field(
        default_factory=SidecarStorage,
        description="The sidecar's model store (Sidecar mode only; default: emptyDir).",
    )
    resources: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra=_PRESERVE,
        description="Kubernetes ResourceRequirements of the sidecar container (Sidecar mode "
        "only). GPU limits come from gpus and are merged in.",
    )


class AgentSpec(CamelModel):
    """What to run: a docker-agent configuration and how its pods look."""

    config: dict[str, Any] = Field(
        json_schema_extra=_PRESERVE,
        description="The docker-agent configuration (agents, models, toolsets, rag, hooks…) in "
        "docker-agent's own YAML schema, passed through untouched except for DMR models. A model "
        "names a DMRModel with models.<alias>.dmrModel: <name> (an operator extension, removed "
        "from the rendered file), or by reference: provider: dmr + model: <ref>, or inline "
        "model: dmr/<ref>, matched to the namespace's DMRModels by normalised reference. "
        "model: auto (or no model) picks defaultModel if a Ready DMRModel serves it, else the "
        "oldest Ready completion DMRModel. The operator sets provider, model, base_url and "
        "provider_opts.context_size of every DMR model; configure the engine on the DMRModel, "
        "not in provider_opts.",
    )
    image: str = Field(
        default=DEFAULT_AGENT_IMAGE,
        min_length=1,
        description=f"docker-agent container image (default {DEFAULT_AGENT_IMAGE}, a pinned "
        f"release of the official image; set another tag, a digest or a mirror here to "
        f"override).",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        description="Number of docker-agent pods (default 1). In Pool mode the Deployment stays "
        "at 0 replicas until every model is Ready.",
    )
    resources: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra=_PRESERVE,
        description="Kubernetes ResourceRequirements of the docker-agent container.",
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra environment variables of the docker-agent container (Kubernetes EnvVar "
        "list). Secrets by reference only: a literal value under a name like *KEY*, *TOKEN*, "
        "*SECRET* or *PASSWORD* is rejected; use valueFrom.secretKeyRef.",
    )
    env_from: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Kubernetes EnvFromSource list (secretRef/configMapRef) of the docker-agent "
        "container, e.g. cloud provider API keys.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Pod nodeSelector (e.g. GPU node labels)."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod tolerations (Kubernetes Toleration list)."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra=_PRESERVE, description="Pod affinity (Kubernetes Affinity)."
    )
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN_PATTERN,
        description="Pod runtimeClassName (e.g. nvidia for GPU containers on some clusters).",
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN_PATTERN,
        description="ServiceAccount of the pods (default: the namespace's default account; its "
        "token is not mounted).",
    )
    default_model: str | None = Field(
        default=None,
        min_length=1,
        description="The model auto selection prefers, like docker-agent's "
        "DOCKER_AGENT_DEFAULT_MODEL: a DMR reference, with or without the dmr/ prefix "
        "(dmr/ai/qwen3 or ai/qwen3:14B). Default: none, the oldest Ready completion DMRModel.",
    )
    runner: AgentRunner = Field(
        default_factory=AgentRunner,
        description="Where the models run: the DMRModels' pools (default) or a sidecar per pod.",
    )


class AgentModelStatus(CamelModel):
    """One model of the configuration and the DMRModel serving it."""

    alias: str = Field(description="Key of the model in the rendered configuration's models.")
    dmr_model: str | None = Field(
        default=None, description="Name of the DMRModel serving it (unset when none matched)."
    )
    model: str | None = Field(
        default=None, description="The normalised model reference rendered as models.<alias>.model."
    )
    ready: bool = Field(default=False, description="Whether the DMRModel is Ready.")
    endpoint: str | None = Field(
        default=None, description="The base_url docker-agent uses for this model."
    )
    message: str | None = Field(
        default=None, description="Why the model cannot be used, when it cannot."
    )


class AgentStatus(CamelModel):
    """What the operator observed, written by the operator only."""

    phase: AgentPhase = Field(
        default="Pending",
        description="Pending (models missing or not Ready), Progressing (pods starting or "
        "rolling), Ready, Degraded (fewer Ready pods than asked, e.g. unschedulable), Failed "
        "(invalid spec).",
    )
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status was computed for."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="ModelsReady, ConfigValid, Available and Ready, each with a reason.",
    )
    models: list[AgentModelStatus] = Field(
        default_factory=list, description="Every DMR model of the configuration."
    )
    replicas: int | None = Field(default=None, description="Pods the workload asks for now.")
    ready_replicas: int | None = Field(default=None, description="Pods that are Ready.")
    ready_models: str | None = Field(
        default=None, description="Ready models over all DMR models, e.g. 2/3 (printer column)."
    )
    ready_of_desired: str | None = Field(
        default=None, description="Ready pods over spec.replicas, e.g. 1/2 (printer column)."
    )
    config_hash: str | None = Field(
        default=None,
        description="Hash of everything that rolls the pods (rendered configuration, image, env…); "
        "also the pod template annotation dmr.dev/config-hash.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="Footguns noticed in the configuration or on the cluster (unload hooks on "
        "shared runners, unschedulable GPU pods, ignored provider_opts…).",
    )


class Agent(CamelModel):
    """A docker-agent configuration served (docker-agent serve api) against DMRModels."""

    CRD: ClassVar[dict[str, Any]] = {
        "kind": constants.AGENT_KIND,
        "plural": constants.AGENT_PLURAL,
        "singular": "agent",
        "short_names": ["dmra"],
        "categories": [constants.CATEGORY],
        "printer_columns": [
            {"name": "Models", "type": "string", "jsonPath": ".status.readyModels"},
            {"name": "Replicas", "type": "string", "jsonPath": ".status.readyOfDesired"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }

    api_version: Literal["dmr.dev/v1alpha1"] = Field(
        default="dmr.dev/v1alpha1", description="dmr.dev/v1alpha1"
    )
    kind: Literal["Agent"] = Field(default="Agent", description="Agent")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: AgentSpec = Field(description="The desired agent.")
    status: AgentStatus | None = Field(default=None, description="The observed state.")
