"""The Kubernetes children of an Agent: ConfigMap, Deployment or StatefulSet, Service. Pure.

Inputs are the Agent's name, namespace and spec plus what ``agent_config`` rendered and hashed;
outputs are plain dicts without owner references (the handlers adopt them with ``kopf.adopt``).

Choices, and why:
- docker-agent runs ``serve api /config/agent.yaml --listen 0.0.0.0:8080 --session-db
  /data/session.db`` (its default listen address, 127.0.0.1, is unreachable from a Service),
  probed on ``GET /api/ping``.
- Restricted Pod Security: the images name their users (``docker-agent``, ``modelrunner``) without
  pinning a UID, and the kubelet cannot prove a *name* is non-root, so the pod runs as a numeric
  UID/GID. Every path either program writes is an emptyDir (or the model PVC), so that UID owns
  them and the docker-agent container's root filesystem can be read-only.
- Pool mode: the workload stays at 0 replicas until every model is Ready, so docker-agent never
  serves (or fails its first session) against a model that is still being pulled.
- Sidecar mode: each pod gets a model-runner native sidecar (an init container with
  ``restartPolicy: Always``: it starts before docker-agent, restarts on its own and does not hold
  up termination); the operator configures the agent's models on it and then sets the pod
  condition ``dmr.dev/models-configured``, a readiness gate,
  so the pod joins the Service only once its own runner is configured. model-runner creates its
  runner sockets in its working directory (``/app`` in the image, not writable by another UID),
  so the sidecar's workingDir is a writable emptyDir; binaries are found through absolute paths.
- Persistent sidecar storage needs a claim per pod, which only a StatefulSet's
  volumeClaimTemplates give. Its ``persistentVolumeClaimRetentionPolicy`` (GA in 1.32) deletes
  the claims with the Agent by default, since a deleted Agent's weights are tens of GiB nobody
  asked to keep, and keeps them when replicas shrink (scaling back up finds the models).
  ``storage.retainOnDelete`` keeps them on delete too. Without ``storage.size`` it is a
  Deployment with an emptyDir store (models pulled again whenever a pod is replaced).
- GPUs through DRA (``runner.gpus.deviceClassName``): a ResourceClaimTemplate named after a hash
  of what it asks for, since the apiserver refuses any change to a template's spec; a changed
  request is a new template (and a new pod template pointing at it), never a failed update.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final, Literal

from dmr_operator import constants
from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.reconcile import documents

AGENT_CONTAINER: Final = "docker-agent"
AGENT_PORT: Final = 8080
AGENT_PORT_NAME: Final = "http"
CONFIG_FILE: Final = "agent.yaml"
CONFIG_DIR: Final = "/config"
DATA_DIR: Final = "/data"
AGENT_HOME: Final = "/home/docker-agent"
AGENT_WORKDIR: Final = "/work"
HEALTH_PATH: Final = "/api/ping"
RUNNER_HEALTH_PATH: Final = "/engines/status"
RUNNER_MODELS_DIR: Final = "/models"
RUNNER_SOCKET_DIR: Final = "/var/run/model-runner"
RUNNER_HOME: Final = "/home/modelrunner"
RUNNER_TMP_SUBPATH: Final = ".tmp"  # the runner's /tmp, a directory of its model volume
# Any UID outside the images' own ranges; 65532 is the conventional "nonroot" user.
POD_UID: Final = 65532
# Set True by the operator on a sidecar pod once every model is configured on its runner.
MODELS_CONFIGURED_CONDITION: Final = f"{constants.GROUP}/models-configured"

NAME_LABEL: Final = "app.kubernetes.io/name"
INSTANCE_LABEL: Final = "app.kubernetes.io/instance"
APP_NAME: Final = "docker-agent"

_LABEL_VALUE_MAX: Final = 63
# Env names whose literal values are credentials by every convention users follow.
_SECRET_NAME: Final = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

WorkloadKind = Literal["Deployment", "StatefulSet"]

RESOURCE_API_VERSION: Final = "resource.k8s.io/v1"
# The pod's name for its GPU claim, referenced by the model-runner container's resources.claims.
GPU_CLAIM: Final = "gpus"


def configmap_name(agent: str) -> str:
    return f"{agent}-config"


def sidecar_pool_name(agent: str) -> str:
    """The ``dmr.dev/pool`` label value of an agent's sidecar pods: its private pool (<= 63)."""
    name = f"agent-{agent}"
    if len(name) <= _LABEL_VALUE_MAX:
        return name
    digest = hashlib.sha256(agent.encode()).hexdigest()[:8]
    return f"{name[: _LABEL_VALUE_MAX - 9].rstrip('-.')}-{digest}"


def selector_labels(agent: str) -> dict[str, str]:
    """The workload's (immutable) selector: the pods of one Agent, nothing else."""
    return {INSTANCE_LABEL: agent, constants.AGENT_LABEL: agent}


def labels(agent: str) -> dict[str, str]:
    return {
        NAME_LABEL: APP_NAME,
        **selector_labels(agent),
        constants.MANAGED_BY_LABEL: constants.MANAGED_BY,
    }


def workload_kind(spec: agent_api.AgentSpec) -> WorkloadKind:
    if spec.runner.mode == "Sidecar" and spec.runner.storage.size:
        return "StatefulSet"
    return "Deployment"


def runner_problems(spec: agent_api.AgentSpec) -> list[str]:
    """Sidecar-only runner fields on a Pool-mode Agent, and GPU requests that contradict
    themselves (the CRD's admission rules, for clusters and objects they did not check): they
    would be ignored without a word."""
    runner = spec.runner
    if runner.mode == "Sidecar":
        return _gpu_problems(runner.gpus) if runner.gpus is not None else []
    given = [
        name
        for name, value in (
            ("gpus", runner.gpus),
            ("resources", runner.resources),
            ("storage.size", runner.storage.size),
        )
        if value is not None
    ]
    return [
        f"spec.runner.{name}: only Sidecar mode runs a model-runner in the agent's pods; Pool "
        "mode uses the DMRModels' runner pools"
        for name in given
    ]


def _gpu_problems(gpus: agent_api.SidecarGpus) -> list[str]:
    problems = []
    if gpus.device_class_name and gpus.resource_claim_template_name:
        problems.append(
            "spec.runner.gpus.resourceClaimTemplateName: deviceClassName (a claim template the "
            "operator makes) and resourceClaimTemplateName (your own) exclude each other"
        )
    if gpus.selectors and not gpus.device_class_name:
        problems.append(
            "spec.runner.gpus.selectors: selectors narrow down the devices of deviceClassName; "
            "set deviceClassName too"
        )
    return problems


def env_problems(spec: agent_api.AgentSpec) -> list[str]:
    """Secrets must come by reference: a literal value under a secret-looking name is refused,
    in ``env`` and anywhere in the docker-agent config (which is stored in a ConfigMap)."""
    problems = []
    for index, variable in enumerate(spec.env):
        name = str(variable.get("name", ""))
        if variable.get("value") and _SECRET_NAME.search(name):
            problems.append(
                f"env[{index}] {name}: literal value for a secret-looking variable; use "
                f"valueFrom.secretKeyRef (or envFrom.secretRef) so the value stays in a Secret"
            )
    problems.extend(
        f"config.{path}: a literal secret in the configuration, which is stored in a ConfigMap; "
        "put it in a Secret, pass it with env/envFrom and write ${env.NAME} here"
        for path in _literal_secrets(spec.config)
    )
    return problems


# A value that only names an environment variable (docker-agent's token_key) or refers to one.
_ENV_REFERENCE: Final = re.compile(r"^(?:[A-Z_][A-Z0-9_]*|\$\{[^}]+\}|\$[A-Za-z_][A-Za-z0-9_]*)$")


def _literal_secrets(config: Any) -> list[str]:
    return [
        path
        for path, key, value in documents.iter_keys(config)
        if isinstance(value, str)
        and value
        and _SECRET_NAME.search(key)
        and not _ENV_REFERENCE.match(value)
    ]


def _metadata(name: str, namespace: str, agent: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(agent)}


def render_configmap(*, agent: str, namespace: str, rendered_config: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(agent),
            "namespace": namespace,
            "labels": labels(agent),
        },
        "data": {CONFIG_FILE: rendered_config},
    }


def render_service(*, agent: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(agent, namespace, agent),
        "spec": {
            "selector": selector_labels(agent),
            "ports": [
                {
                    "name": AGENT_PORT_NAME,
                    "port": AGENT_PORT,
                    "targetPort": AGENT_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def claim_template_name(agent: str, gpus: agent_api.SidecarGpus) -> str:
    """The GPU claim template the pods use: the user's own, or ours named by what it asks for."""
    if gpus.resource_claim_template_name:
        return gpus.resource_claim_template_name
    request = [gpus.device_class_name, gpus.count, *gpus.selectors]
    digest = hashlib.sha256(repr(request).encode()).hexdigest()[:8]
    return f"{agent}-gpus-{digest}"


def render_claim_template(
    *, agent: str, namespace: str, spec: agent_api.AgentSpec
) -> dict[str, Any] | None:
    """The ResourceClaimTemplate for a Sidecar runner's DRA GPUs (None when it needs none)."""
    gpus = spec.runner.gpus
    if spec.runner.mode != "Sidecar" or gpus is None or not gpus.device_class_name:
        return None
    exactly: dict[str, Any] = {
        "deviceClassName": gpus.device_class_name,
        "allocationMode": "ExactCount",
        "count": gpus.count,
    }
    if gpus.selectors:
        exactly["selectors"] = [{"cel": {"expression": e}} for e in gpus.selectors]
    return {
        "apiVersion": RESOURCE_API_VERSION,
        "kind": "ResourceClaimTemplate",
        "metadata": _metadata(claim_template_name(agent, gpus), namespace, agent),
        "spec": {
            "metadata": {"labels": labels(agent)},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}},
        },
    }


def desired_replicas(spec: agent_api.AgentSpec, *, models_ready: bool) -> int:
    """Pool mode waits for Ready models at 0 replicas; sidecar pods wait behind their gate."""
    if spec.runner.mode == "Pool" and not models_ready:
        return 0
    return spec.replicas


def render_workload(
    *,
    agent: str,
    namespace: str,
    spec: agent_api.AgentSpec,
    config_hash: str,
    models_ready: bool,
) -> dict[str, Any]:
    """The Deployment (or, for a persistent sidecar store, StatefulSet) running docker-agent."""
    kind = workload_kind(spec)
    sidecar = spec.runner.mode == "Sidecar"
    pod_labels = labels(agent)
    if sidecar:
        pod_labels[constants.POOL_LABEL] = sidecar_pool_name(agent)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": POD_UID,
            "runAsGroup": POD_UID,
            "fsGroup": POD_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_agent_container(spec)],
        "volumes": _volumes(agent, spec, kind),
    }
    if sidecar:
        # A native sidecar (1.29+): started before docker-agent, restarted on its own, and no
        # obstacle to the pod's termination; its readiness still counts for the pod's.
        pod_spec["initContainers"] = [_runner_container(spec.runner) | {"restartPolicy": "Always"}]
        pod_spec["readinessGates"] = [{"conditionType": MODELS_CONFIGURED_CONDITION}]
        if spec.runner.gpus is not None and spec.runner.gpus.dynamic:
            pod_spec["resourceClaims"] = [
                {
                    "name": GPU_CLAIM,
                    "resourceClaimTemplateName": claim_template_name(agent, spec.runner.gpus),
                }
            ]
    optional = {
        "nodeSelector": spec.node_selector or None,
        "tolerations": spec.tolerations or None,
        "affinity": spec.affinity,
        "runtimeClassName": spec.runtime_class_name,
        "serviceAccountName": spec.service_account_name,
    }
    pod_spec.update({key: value for key, value in optional.items() if value is not None})
    workload_spec: dict[str, Any] = {
        "replicas": desired_replicas(spec, models_ready=models_ready),
        "selector": {"matchLabels": selector_labels(agent)},
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {constants.CONFIG_HASH_ANNOTATION: config_hash},
            },
            "spec": pod_spec,
        },
    }
    if kind == "StatefulSet":
        workload_spec.update(_statefulset_fields(agent, spec.runner.storage))
    elif sidecar and spec.runner.gpus is not None:
        # A surge pod would need GPUs the old pods still hold: replace in place instead.
        workload_spec["strategy"] = {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {
            "name": agent,
            "namespace": namespace,
            "labels": labels(agent),
            "annotations": {constants.CONFIG_HASH_ANNOTATION: config_hash},
        },
        "spec": workload_spec,
    }


def _agent_container(spec: agent_api.AgentSpec) -> dict[str, Any]:
    probe = {"httpGet": {"path": HEALTH_PATH, "port": AGENT_PORT_NAME}, "periodSeconds": 10}
    container: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        "image": spec.image,
        "args": [
            "serve",
            "api",
            f"{CONFIG_DIR}/{CONFIG_FILE}",
            "--listen",
            f"0.0.0.0:{AGENT_PORT}",
            "--session-db",
            f"{DATA_DIR}/session.db",
        ],
        "ports": [{"name": AGENT_PORT_NAME, "containerPort": AGENT_PORT, "protocol": "TCP"}],
        "env": [
            # Only the exact string "false" turns docker-agent's telemetry off.
            {"name": "TELEMETRY_ENABLED", "value": "false"},
            {"name": "HOME", "value": AGENT_HOME},
            *spec.env,
        ],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 6},
        "securityContext": container_security(read_only_root=True),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "home", "mountPath": AGENT_HOME},
            {"name": "work", "mountPath": AGENT_WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if spec.env_from:
        container["envFrom"] = list(spec.env_from)
    if spec.resources:
        container["resources"] = spec.resources
    return container


def _runner_container(runner: agent_api.AgentRunner) -> dict[str, Any]:
    probe = {
        "httpGet": {"path": RUNNER_HEALTH_PATH, "port": constants.RUNNER_PORT_NAME},
        "periodSeconds": 10,
    }
    container: dict[str, Any] = {
        "name": constants.RUNNER_CONTAINER,
        "image": runner.image,
        "workingDir": RUNNER_SOCKET_DIR,
        "ports": [
            {
                "name": constants.RUNNER_PORT_NAME,
                "containerPort": constants.RUNNER_PORT,
                "protocol": "TCP",
            }
        ],
        "env": [
            {"name": "MODEL_RUNNER_PORT", "value": str(constants.RUNNER_PORT)},
            {"name": "MODELS_PATH", "value": RUNNER_MODELS_DIR},
            {"name": "HOME", "value": RUNNER_HOME},
            # Otherwise every configure and inference sends a tracking request to the registry.
            {"name": "DO_NOT_TRACK", "value": "1"},
        ],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 15, "failureThreshold": 6},
        "securityContext": container_security(read_only_root=False),
        "volumeMounts": [
            {"name": "models", "mountPath": RUNNER_MODELS_DIR},
            {"name": "runner-sockets", "mountPath": RUNNER_SOCKET_DIR},
            {"name": "runner-home", "mountPath": RUNNER_HOME},
            # Hugging Face pulls are staged in $TMPDIR: on the model volume, which has the room.
            {"name": "models", "mountPath": "/tmp", "subPath": RUNNER_TMP_SUBPATH},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    resources = _gpu_resources(runner)
    if resources:
        container["resources"] = resources
    return container


def _gpu_resources(runner: agent_api.AgentRunner) -> dict[str, Any]:
    resources: dict[str, Any] = {k: dict(v) for k, v in (runner.resources or {}).items()}
    if runner.gpus is not None and runner.gpus.dynamic:
        # The claim, not a resource name, gives the container its devices.
        resources["claims"] = [{"name": GPU_CLAIM}]
    elif runner.gpus is not None:
        # Extended resources must have requests equal to limits; setting both says so plainly.
        for section in ("limits", "requests"):
            # A quantity is a string on the wire; server-side apply refuses a bare number.
            resources.setdefault(section, {})[runner.gpus.resource] = str(runner.gpus.count)
    return resources


def container_security(*, read_only_root: bool) -> dict[str, Any]:
    """A container's part of Pod Security's ``restricted`` profile (the pod sets the rest)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
    }


def _volumes(agent: str, spec: agent_api.AgentSpec, kind: WorkloadKind) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": configmap_name(agent),
                "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}],
            },
        },
        *({"name": name, "emptyDir": {}} for name in ("data", "home", "work", "tmp")),
    ]
    if spec.runner.mode != "Sidecar":
        return volumes
    names = ["runner-sockets", "runner-home"]
    if kind == "Deployment":
        names.insert(0, "models")
    volumes.extend({"name": name, "emptyDir": {}} for name in names)
    # vLLM and PyTorch need more shared memory than the runtime's 64 MiB default.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    return volumes


def _statefulset_fields(agent: str, storage: agent_api.SidecarStorage) -> dict[str, Any]:
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        claim_spec["storageClassName"] = storage.storage_class_name
    return {
        "serviceName": agent,
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        "persistentVolumeClaimRetentionPolicy": {
            "whenDeleted": "Retain" if storage.retain_on_delete else "Delete",
            "whenScaled": "Retain",
        },
        "volumeClaimTemplates": [
            {"metadata": {"name": "models", "labels": labels(agent)}, "spec": claim_spec}
        ],
    }
