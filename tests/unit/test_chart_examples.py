"""examples/ and kind-config.yaml: the first things a newcomer applies.

Covers: every example parses and validates against the API models (and docker-agent configs
against the operator's own config checks); every model named exists in the emulator's default
catalogue, so the sandbox can serve it; the set of examples the brief asks for is there; the
plain pool manifest stays in step with the chart's pool and is restricted-compliant;
kind-config.yaml has the GPU-like worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dmr_operator import constants
from dmr_operator.api.v1alpha1 import agent as agent_api
from dmr_operator.api.v1alpha1 import dmrmodel as dmrmodel_api
from dmr_operator.dmr import references
from dmr_operator.reconcile import agent_config
from dmr_operator.testing import emulator_state, helm, podsecurity

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def objects_of_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for path in EXAMPLES for obj in load(path) if obj["kind"] == kind]


def test_examples_exist() -> None:
    assert EXAMPLES[0].name == "00-pool.yaml"
    models = {obj["metadata"]["name"]: obj["spec"] for obj in objects_of_kind("DMRModel")}
    backends = {spec.get("backend") for spec in models.values()}
    assert {"llama.cpp", "vllm"} <= backends
    assert any("speculative" in spec for spec in models.values())
    assert any(
        "gpuMemoryUtilization" in spec.get("vllm", {}) and "hfOverrides" in spec.get("vllm", {})
        for spec in models.values()
    )
    assert any(spec.get("mode") == "embedding" for spec in models.values())
    modes = [obj["spec"].get("runner", {}).get("mode", "Pool") for obj in objects_of_kind("Agent")]
    assert sorted(modes) == ["Pool", "Sidecar"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_is_commented_and_namespace_free(path: Path) -> None:
    assert path.read_text().startswith("#"), "say what the example shows"
    for obj in load(path):
        # Applied with `kubectl apply -n <namespace>`; a fixed namespace would fight that.
        assert "namespace" not in obj["metadata"]


def test_dmrmodels_validate_against_the_api() -> None:
    for obj in objects_of_kind("DMRModel"):
        model = dmrmodel_api.DMRModel.model_validate(obj)
        # Defaults may be added; nothing written may be renamed or dropped.
        assert obj["spec"].items() <= model.spec.to_api().items()


def test_agents_validate_against_the_api_and_name_example_models() -> None:
    dmrmodel_names = {obj["metadata"]["name"] for obj in objects_of_kind("DMRModel")}
    for obj in objects_of_kind("Agent"):
        agent = agent_api.Agent.model_validate(obj)
        assert agent_config.validate_agent_config(agent.spec.config) == []
        named = {entry["dmrModel"] for entry in agent.spec.config["models"].values()}
        if agent.spec.default_model:
            named.add(agent.spec.default_model)
        assert named <= dmrmodel_names


def test_every_model_is_in_the_emulator_catalogue() -> None:
    catalogue = set(emulator_state.DEFAULT_CATALOGUE)
    for obj in objects_of_kind("DMRModel"):
        spec = obj["spec"]
        refs = [spec["model"]]
        if "speculative" in spec:
            refs.append(spec["speculative"]["draftModel"])
        for ref in refs:
            assert references.qualified_tag(ref) in catalogue, ref


def chart_pool(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    objects = helm.render_chart(ROOT / "charts" / "dmr-operator", values=values, release="dmr")
    statefulset = next(obj for obj in objects if obj["kind"] == "StatefulSet")
    service = next(
        obj for obj in objects if obj["kind"] == "Service" and "pool" in obj["metadata"]["name"]
    )
    return statefulset, service


def test_plain_pool_matches_the_charts_cpu_pool() -> None:
    plain = {obj["kind"]: obj for obj in load(ROOT / "examples" / "00-pool.yaml")}
    chart_statefulset, chart_service = chart_pool(
        {"runnerPools": [{"name": "default", "accelerator": "cpu", "cloudEnvironment": False}]}
    )
    assert plain["Service"]["metadata"]["name"] == chart_service["metadata"]["name"]
    assert plain["Service"]["spec"]["selector"] == {constants.POOL_LABEL: constants.DEFAULT_POOL}
    # protocol included: server-side apply on Kubernetes < 1.21 refuses ports without it.
    assert plain["Service"]["spec"]["ports"] == chart_service["spec"]["ports"]

    template = plain["StatefulSet"]["spec"]["template"]
    assert template["metadata"]["labels"][constants.POOL_LABEL] == constants.DEFAULT_POOL
    container = template["spec"]["containers"][0]
    chart_container = chart_statefulset["spec"]["template"]["spec"]["containers"][0]
    for key in ("name", "image", "env", "securityContext", "workingDir", "volumeMounts"):
        assert container[key] == chart_container[key], key
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == chart_container[probe]["httpGet"]
    assert container["ports"] == chart_container["ports"]
    chart_pod_security = chart_statefulset["spec"]["template"]["spec"]["securityContext"]
    pod_security = template["spec"]["securityContext"]
    assert pod_security.items() <= chart_pod_security.items()
    assert podsecurity.check_restricted(template["spec"]) == []
    for workload in objects_of_kind("StatefulSet"):
        spec = podsecurity.pod_spec_of(workload)
        assert spec is not None and podsecurity.check_restricted(spec) == []


def test_kind_config_has_a_gpu_like_worker() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [node["role"] for node in config["nodes"]]
    assert roles == ["control-plane", "worker"]
    worker = config["nodes"][1]
    assert worker["labels"] == {"nvidia.com/gpu.present": "true"}
    (patch,) = [yaml.safe_load(text) for text in worker["kubeadmConfigPatches"]]
    assert patch["kind"] == "JoinConfiguration"
    assert patch["nodeRegistration"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    # The CPU pool example must be able to land on that worker.
    toleration = objects_of_kind("StatefulSet")[0]["spec"]["template"]["spec"]["tolerations"][0]
    assert toleration["key"] == "nvidia.com/gpu" and toleration["effect"] == "NoSchedule"
