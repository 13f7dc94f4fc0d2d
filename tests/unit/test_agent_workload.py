"""The Agent's children: ConfigMap, Deployment/StatefulSet and Service as rendered dicts.

Covers the docker-agent command line and probes, restricted Pod Security (checked with
``testing.podsecurity``), Pool-mode scale-from-zero, Sidecar GPUs, storage and readiness gate,
labels, the config-hash annotation and the env secret rule.
"""

from __future__ import annotations

from typing import Any

import pytest

from dmr_operator import constants
from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.reconcile import agent_workload
from dmr_operator.testing import podsecurity

CONFIG = {"agents": {"root": {"model": "dmr/ai/qwen3"}}}


def spec_of(**fields: Any) -> agent_api.AgentSpec:
    return agent_api.AgentSpec.model_validate({"config": CONFIG, **fields})


def workload(spec: agent_api.AgentSpec, *, models_ready: bool = True) -> dict[str, Any]:
    return agent_workload.render_workload(
        agent="helper",
        namespace="team",
        spec=spec,
        config_hash="0123456789abcdef",
        models_ready=models_ready,
    )


def container(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    pod = manifest["spec"]["template"]["spec"]
    containers = [*pod["containers"], *pod.get("initContainers", [])]
    return next(c for c in containers if c["name"] == name)


def test_pool_deployment_runs_docker_agent_serve_api() -> None:
    manifest = workload(spec_of())
    assert manifest["kind"] == "Deployment"
    agent = container(manifest, "docker-agent")
    assert agent["image"] == agent_api.DEFAULT_AGENT_IMAGE
    assert agent["args"] == [
        "serve",
        "api",
        "/config/agent.yaml",
        "--listen",
        "0.0.0.0:8080",
        "--session-db",
        "/data/session.db",
    ]
    assert agent["readinessProbe"]["httpGet"] == {"path": "/api/ping", "port": "http"}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/api/ping", "port": "http"}
    assert {"name": "TELEMETRY_ENABLED", "value": "false"} in agent["env"]
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/config", "/data", "/home/docker-agent", "/tmp", "/work"} <= mounts
    pod = manifest["spec"]["template"]["spec"]
    volume_types = {v["name"]: set(v) - {"name"} for v in pod["volumes"]}
    assert volume_types["data"] == {"emptyDir"} and volume_types["home"] == {"emptyDir"}
    assert len(pod["containers"]) == 1 and "readinessGates" not in pod


@pytest.mark.parametrize(
    "spec",
    [
        spec_of(),
        spec_of(runner={"mode": "Sidecar", "gpus": {"resource": "amd.com/gpu", "count": 2}}),
        spec_of(runner={"mode": "Sidecar", "storage": {"size": "50Gi"}}),
    ],
    ids=["pool", "sidecar", "sidecar-persistent"],
)
def test_pods_meet_restricted_pod_security(spec: agent_api.AgentSpec) -> None:
    manifest = workload(spec)
    pod = manifest["spec"]["template"]["spec"]
    assert podsecurity.check_restricted(pod) == []
    # The images name their users; only a numeric UID lets the kubelet prove non-root.
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False


def test_labels_and_config_hash_annotation() -> None:
    manifest = workload(spec_of())
    template = manifest["spec"]["template"]
    assert template["metadata"]["annotations"] == {"dmr.dev/config-hash": "0123456789abcdef"}
    labels = template["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "docker-agent"
    assert labels["app.kubernetes.io/instance"] == "helper"
    assert labels["dmr.dev/agent"] == "helper"
    selector = manifest["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()


def test_pool_mode_stays_at_zero_replicas_until_models_are_ready() -> None:
    spec = spec_of(replicas=3)
    assert workload(spec, models_ready=False)["spec"]["replicas"] == 0
    assert workload(spec, models_ready=True)["spec"]["replicas"] == 3


def test_spec_scheduling_fields_reach_the_pod() -> None:
    spec = spec_of(
        nodeSelector={"gpu": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {}},
        runtimeClassName="nvidia",
        serviceAccountName="agent",
        resources={"limits": {"memory": "1Gi"}},
        env=[{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        envFrom=[{"secretRef": {"name": "cloud-keys"}}],
    )
    manifest = workload(spec)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == "agent"
    agent = container(manifest, "docker-agent")
    assert agent["resources"] == {"limits": {"memory": "1Gi"}}
    assert agent["envFrom"] == [{"secretRef": {"name": "cloud-keys"}}]
    assert agent["env"][-1]["valueFrom"]["secretKeyRef"]["name"] == "s"
    assert agent_workload.env_problems(spec) == []


def test_literal_secret_in_env_is_refused() -> None:
    spec = spec_of(env=[{"name": "OPENAI_API_KEY", "value": "sk-123"}, {"name": "X", "value": "1"}])
    (problem,) = agent_workload.env_problems(spec)
    assert "OPENAI_API_KEY" in problem and "secretKeyRef" in problem


def test_sidecar_gets_gpus_readiness_gate_and_private_pool() -> None:
    spec = spec_of(
        replicas=3,
        runner={
            "mode": "Sidecar",
            "gpus": {"count": 1},
            "resources": {"limits": {"memory": "8Gi"}},
        },
    )
    manifest = workload(spec, models_ready=False)
    assert manifest["kind"] == "Deployment"
    assert manifest["spec"]["replicas"] == 3  # gated per pod, not scaled from zero
    pod = manifest["spec"]["template"]["spec"]
    assert pod["readinessGates"] == [{"conditionType": "dmr.dev/models-configured"}]
    # A native sidecar: an init container that keeps running, started before docker-agent.
    assert [c["name"] for c in pod["containers"]] == ["docker-agent"]
    (runner,) = pod["initContainers"]
    assert runner["name"] == constants.RUNNER_CONTAINER
    assert runner["restartPolicy"] == "Always"
    assert runner["image"] == "docker/model-runner:latest-cuda"
    assert runner["ports"] == [{"name": "dmr", "containerPort": 12434, "protocol": "TCP"}]
    assert runner["resources"] == {
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"},
        "requests": {"nvidia.com/gpu": "1"},
    }
    assert {"name": "DO_NOT_TRACK", "value": "1"} in runner["env"]
    assert runner["readinessProbe"]["httpGet"] == {"path": "/engines/status", "port": "dmr"}
    # Runner sockets are created in the working directory: it must be writable.
    mounts = {m["mountPath"]: m["name"] for m in runner["volumeMounts"]}
    assert runner["workingDir"] in mounts
    assert {"/models", "/tmp", "/dev/shm"} <= set(mounts)
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert labels[constants.POOL_LABEL] == agent_workload.sidecar_pool_name("helper")
    # No surge: a new pod would need a GPU the old one still holds.
    assert manifest["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_persistent_sidecar_store_is_a_statefulset_with_claims() -> None:
    spec = spec_of(
        runner={"mode": "Sidecar", "storage": {"size": "50Gi", "storageClassName": "fast"}}
    )
    manifest = workload(spec)
    assert agent_workload.workload_kind(spec) == "StatefulSet"
    assert manifest["kind"] == "StatefulSet"
    assert manifest["spec"]["serviceName"] == "helper"
    (claim,) = manifest["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "models"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    # Claims go with the Agent by default and stay when replicas shrink.
    assert manifest["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Delete",
        "whenScaled": "Retain",
    }
    kept = workload(
        spec_of(runner={"mode": "Sidecar", "storage": {"size": "50Gi", "retainOnDelete": True}})
    )
    assert kept["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    volumes = {v["name"] for v in manifest["spec"]["template"]["spec"]["volumes"]}
    assert "models" not in volumes  # comes from the claim template


def test_sidecar_pool_name_is_a_valid_label_value() -> None:
    assert agent_workload.sidecar_pool_name("helper") == "agent-helper"
    long_name = "a" * 60 + ".b" * 40
    value = agent_workload.sidecar_pool_name(long_name)
    assert len(value) <= 63 and value[-1].isalnum() and value[0].isalnum()
    assert value != agent_workload.sidecar_pool_name("a" * 60 + ".c" * 40)


def test_configmap_and_service() -> None:
    configmap = agent_workload.render_configmap(
        agent="helper", namespace="team", rendered_config="agents: {}\n"
    )
    assert configmap["metadata"]["name"] == "helper-config"
    assert configmap["data"] == {"agent.yaml": "agents: {}\n"}
    manifest = workload(spec_of())
    volume = next(
        v for v in manifest["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    assert volume["configMap"]["name"] == "helper-config"
    service = agent_workload.render_service(agent="helper", namespace="team")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == manifest["spec"]["selector"]["matchLabels"]
    for child in (configmap, service, manifest):
        assert "ownerReferences" not in child["metadata"]


def test_image_is_overridable() -> None:
    manifest = workload(spec_of(image="registry.local/docker-agent@sha256:" + "a" * 64))
    assert container(manifest, "docker-agent")["image"].startswith("registry.local/")


def test_sidecar_only_runner_fields_on_a_pool_agent_are_named() -> None:
    pool = spec_of(runner={"mode": "Pool", "gpus": {"count": 1}, "storage": {"size": "1Gi"}})
    assert agent_workload.runner_problems(pool) == [
        "spec.runner.gpus: only Sidecar mode runs a model-runner in the agent's pods; Pool mode "
        "uses the DMRModels' runner pools",
        "spec.runner.storage.size: only Sidecar mode runs a model-runner in the agent's pods; "
        "Pool mode uses the DMRModels' runner pools",
    ]
    sidecar = spec_of(runner={"mode": "Sidecar", "gpus": {"count": 1}})
    assert agent_workload.runner_problems(sidecar) == []


BIG_GPU = "device.capacity['gpu.nvidia.com'].memory.compareTo(quantity('40Gi')) >= 0"


def test_dra_gpus_are_a_claim_from_a_template_named_by_its_request() -> None:
    spec = spec_of(
        runner={
            "mode": "Sidecar",
            "gpus": {"deviceClassName": "gpu.nvidia.com", "count": 2, "selectors": [BIG_GPU]},
            "resources": {"limits": {"memory": "8Gi"}},
        }
    )
    template = agent_workload.render_claim_template(agent="helper", namespace="team", spec=spec)
    assert template is not None
    assert template["apiVersion"] == "resource.k8s.io/v1"
    assert template["kind"] == "ResourceClaimTemplate"
    name = template["metadata"]["name"]
    assert name.startswith("helper-gpus-")
    assert template["metadata"]["labels"][constants.AGENT_LABEL] == "helper"
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request == {
        "name": "gpu",
        "exactly": {
            "deviceClassName": "gpu.nvidia.com",
            "allocationMode": "ExactCount",
            "count": 2,
            "selectors": [{"cel": {"expression": BIG_GPU}}],
        },
    }
    pod = workload(spec)["spec"]["template"]["spec"]
    assert pod["resourceClaims"] == [{"name": "gpus", "resourceClaimTemplateName": name}]
    runner = container(workload(spec), constants.RUNNER_CONTAINER)
    # The claim gives the devices: no extended resource besides it.
    assert runner["resources"] == {"limits": {"memory": "8Gi"}, "claims": [{"name": "gpus"}]}
    # Templates are immutable: another request is another template, the same one the same.
    other = spec.model_copy(deep=True)
    assert other.runner.gpus is not None
    other.runner.gpus.count = 1
    assert agent_workload.claim_template_name("helper", other.runner.gpus) != name
    assert spec.runner.gpus is not None
    assert agent_workload.claim_template_name("helper", spec.runner.gpus) == name


def test_own_claim_template_is_referenced_not_rendered() -> None:
    spec = spec_of(runner={"mode": "Sidecar", "gpus": {"resourceClaimTemplateName": "h100"}})
    assert agent_workload.render_claim_template(agent="helper", namespace="team", spec=spec) is None
    pod = workload(spec)["spec"]["template"]["spec"]
    assert pod["resourceClaims"] == [{"name": "gpus", "resourceClaimTemplateName": "h100"}]
    runner = container(workload(spec), constants.RUNNER_CONTAINER)
    assert runner["resources"] == {"claims": [{"name": "gpus"}]}
    assert podsecurity.check_restricted(workload(spec)["spec"]["template"]["spec"]) == []


def test_extended_resource_gpus_make_no_claim() -> None:
    spec = spec_of(runner={"mode": "Sidecar", "gpus": {"count": 1}})
    assert agent_workload.render_claim_template(agent="helper", namespace="team", spec=spec) is None
    assert "resourceClaims" not in workload(spec)["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("gpus", "field"),
    [
        (
            {"deviceClassName": "gpu.nvidia.com", "resourceClaimTemplateName": "h100"},
            "resourceClaimTemplateName",
        ),
        ({"selectors": [BIG_GPU]}, "selectors"),
    ],
)
def test_contradicting_gpu_requests_are_named(gpus: dict[str, Any], field: str) -> None:
    spec = spec_of(runner={"mode": "Sidecar", "gpus": gpus})
    (problem,) = agent_workload.runner_problems(spec)
    assert problem.startswith(f"spec.runner.gpus.{field}:")
