"""The Helm chart rendered and linted by Helm's own code (dmr_operator.testing.helm).

Covers: every mode renders and lints clean; standard labels; the operator's command line per
mode; RBAC in cluster-wide and namespaced form, least privilege; leader election; metrics; runner
pools (image per accelerator, GPUs, the Service selector the operator relies on, storage);
values that must be refused at install time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import pytest

from dmr_operator import constants
from dmr_operator.testing import helm

CHART = Path(__file__).resolve().parents[2] / "charts" / "dmr-operator"
RELEASE = "dmr"
NAMESPACE = "dmr-system"
STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)
TWO_POOLS: dict[str, Any] = {
    "runnerPools": [
        {
            "name": "gpu",
            "accelerator": "nvidia",
            "gpus": 2,
            "runtimeClassName": "nvidia",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "resources": {"limits": {"memory": "32Gi"}},
            "storage": {"size": "200Gi", "storageClassName": "fast"},
        },
        {"name": "cpu", "accelerator": "cpu", "replicas": 2, "cloudEnvironment": False},
    ]
}
MODES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-rbac": {
        "watchNamespaces": [NAMESPACE, "team-a"],
        "rbac": {"clusterWide": False},
    },
    "cluster-rbac-listed-namespaces": {"watchNamespaces": ["team-a"]},
    "two-replicas": {"replicaCount": 2},
    "no-leader-election": {"leaderElection": {"enabled": False}},
    "leader-election-namespaced": {
        "leaderElection": {"leaseName": "dmr-lease", "leaseDuration": 30},
        "watchNamespaces": ["team-a", "team-b"],
        "rbac": {"clusterWide": False},
    },
    "metrics-servicemonitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}
    },
    "metrics-off": {"metrics": {"enabled": False}},
    "no-crds-no-rbac": {"crds": {"install": False}, "rbac": {"create": False}},
    "two-pools": TWO_POOLS,
    "vllm-pool": {"runnerPools": [{"name": "vllm", "accelerator": "nvidia", "vllm": True}]},
    "amd-pool": {"runnerPools": [{"name": "rocm", "accelerator": "amd", "gpus": 1}]},
    "external-runners": {"allowedRunnerHosts": ["gpu-box.lan:12434", "10.0.0.7"]},
    "dra-pools": {
        "runnerPools": [
            {
                "name": "big",
                "accelerator": "nvidia",
                "gpuClaim": {"deviceClassName": "gpu-40g", "count": 2, "selectors": ["true"]},
            },
            {
                "name": "own",
                "accelerator": "nvidia",
                "gpuClaim": {"resourceClaimTemplateName": "h100"},
            },
        ],
        "deviceClasses": [{"name": "gpu-40g", "selectors": ["device.driver == 'gpu.nvidia.com'"]}],
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    return helm.render_chart(CHART, values=values, release=RELEASE, namespace=NAMESPACE)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = find(objects, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = only(objects, "Deployment")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("values", MODES.values(), ids=MODES.keys())
def test_every_mode_renders_and_lints_clean(values: dict[str, Any]) -> None:
    objects = render(values)
    assert find(objects, "Deployment")
    assert helm.lint_chart(CHART, values) == []


def test_lint_reports_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "dmr-operator"
    (broken / "templates").mkdir(parents=True)
    (broken / "Chart.yaml").write_text((CHART / "Chart.yaml").read_text())
    (broken / "templates" / "bad.yaml").write_text("kind: {{ .Values.nope.deeper }}\n")
    assert helm.lint_chart(broken, {})


def is_generated_crd(obj: dict[str, Any]) -> bool:
    return obj["kind"] == "CustomResourceDefinition" and obj["spec"]["group"] == constants.GROUP


@pytest.mark.parametrize("values", MODES.values(), ids=MODES.keys())
def test_every_object_has_the_standard_labels(values: dict[str, Any]) -> None:
    for obj in render(values):
        if is_generated_crd(obj):
            continue  # test_generated_crds_carry_the_standard_labels
        labels = obj["metadata"].get("labels") or {}
        missing = [label for label in STANDARD_LABELS if label not in labels]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE


def test_generated_crds_carry_the_standard_labels() -> None:
    crds = [obj for obj in render({}) if is_generated_crd(obj)]
    assert crds
    for crd in crds:
        labels = crd["metadata"].get("labels") or {}
        assert all(label in labels for label in STANDARD_LABELS), crd["metadata"]["name"]


@pytest.mark.parametrize(
    ("keep", "annotations"), [(True, {"helm.sh/resource-policy": "keep"}), (False, None)]
)
def test_crds_are_templates_kept_on_uninstall(
    keep: bool, annotations: dict[str, str] | None
) -> None:
    crds = [obj for obj in render({"crds": {"keep": keep}}) if is_generated_crd(obj)]
    names = {crd["metadata"]["name"] for crd in crds}
    assert names == {
        f"{constants.DMRMODEL_PLURAL}.{constants.GROUP}",
        f"{constants.AGENT_PLURAL}.{constants.GROUP}",
    }
    for crd in crds:
        assert (crd["metadata"].get("annotations") or None) == annotations
    assert not [obj for obj in render({"crds": {"install": False}}) if is_generated_crd(obj)]


def test_operator_defaults_watch_the_cluster_with_leader_election() -> None:
    objects = render({})
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # The new pod stands by until the old one releases the lease: no gap, never two actors.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    container = operator_container(objects)
    assert container["image"] == "dmr-operator:0.1.0"
    assert container["command"] == ["dmr-operator", "run"]
    assert container["args"] == [
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=9090",
        "--log-format=json",
        "--leader-elect",
        f"--leader-election-id={RELEASE}-dmr-operator",
        f"--leader-election-namespace={NAMESPACE}",
        "--lease-duration=15",
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def test_operator_flags_for_namespaces_hosts_and_replicas() -> None:
    objects = render(
        {
            "replicaCount": 2,
            "watchNamespaces": ["team-a", "team-b"],
            "allowedRunnerHosts": ["gpu-box.lan:12434", "10.0.0.7"],
            "metrics": {"enabled": False},
            "image": {"repository": "registry.example/dmr-operator", "tag": "v9"},
        }
    )
    container = operator_container(objects)
    assert container["image"] == "registry.example/dmr-operator:v9"
    assert container["args"] == [
        "--namespace=team-a",
        "--namespace=team-b",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--log-format=json",
        "--allowed-runner-hosts=gpu-box.lan:12434,10.0.0.7",
        "--leader-elect",
        f"--leader-election-id={RELEASE}-dmr-operator",
        f"--leader-election-namespace={NAMESPACE}",
        "--lease-duration=15",
    ]


def test_without_leader_election_the_operator_is_recreated_and_alone() -> None:
    objects = render({"leaderElection": {"enabled": False}})
    assert only(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not [a for a in operator_container(objects)["args"] if a.startswith("--lease")]
    assert "--leader-elect" not in operator_container(objects)["args"]
    assert not find(objects, "Role")
    with pytest.raises(helm_python.HelmRenderError, match=r"needs leaderElection\.enabled"):
        render({"leaderElection": {"enabled": False}, "replicaCount": 2})


def test_the_chart_ships_no_crds_folder_of_its_own() -> None:
    # Only the generated DMRModel/Agent CRD templates: nothing for Helm to install unasked.
    objects = helm.render_chart(CHART, values={"crds": {"install": False}}, include_crds=True)
    assert not find(objects, "CustomResourceDefinition")


def test_cluster_wide_rbac_is_one_cluster_role() -> None:
    objects = render({"leaderElection": {"enabled": False}})
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    role = only(objects, "ClusterRole")
    rules = rules_of(role)
    expected = {
        ("dmr.dev", "dmrmodels", "watch"),
        ("dmr.dev", "agents", "patch"),
        ("dmr.dev", "dmrmodels/status", "patch"),
        ("", "pods", "watch"),
        ("", "pods/status", "patch"),
        ("", "pods", "patch"),  # placement labels
        ("resource.k8s.io", "resourceclaimtemplates", "create"),  # Sidecar GPUs through DRA
        ("", "services", "create"),
        ("", "configmaps", "delete"),
        ("apps", "deployments", "create"),
        ("", "events", "create"),
        ("events.k8s.io", "events", "create"),
        ("", "namespaces", "watch"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    }
    assert expected <= rules
    binding = only(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-dmr-operator", "namespace": NAMESPACE}
    ]
    assert only(objects, "ServiceAccount")["metadata"]["name"] == f"{RELEASE}-dmr-operator"


def test_namespaced_rbac_is_a_role_per_watched_namespace() -> None:
    namespaces = ["team-a", "team-b"]
    objects = render(
        {
            "watchNamespaces": namespaces,
            "rbac": {"clusterWide": False},
            "leaderElection": {"enabled": False},
        }
    )
    roles = find(objects, "Role")
    bindings = find(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert ("", "pods", "watch") in rules_of(roles[0])
    # Only what a Role cannot grant and kopf reads at cluster scope stays cluster-wide (kopf lists
    # namespaces even for a fixed list: tests/integration/test_chart_install.py).
    assert rules_of(only(objects, "ClusterRole")) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        ("", "nodes", "get"),  # rbac.readNodes: runner capacity
        ("resource.k8s.io", "resourceslices", "list"),  # and DRA devices' memory
    }


@pytest.mark.parametrize("values", MODES.values(), ids=MODES.keys())
def test_rbac_is_least_privilege(values: dict[str, Any]) -> None:
    for role in find(render(values), "ClusterRole") + find(render(values), "Role"):
        for group, resource, verb in rules_of(role):
            assert "*" not in (group, resource, verb)
            assert resource not in ("pods/exec", "serviceaccounts/token")
            # Secrets: only get by name (spec.pullTokenSecret), never list or watch.
            assert resource != "secrets" or verb == "get"
            assert verb not in ("escalate", "bind", "impersonate", "deletecollection")
            # Nodes: only get, by name, for the capacity of the runners' nodes.
            assert resource != "nodes" or (verb == "get" and role["kind"] == "ClusterRole")


def test_node_and_secret_reads_can_be_turned_off() -> None:
    cluster_role = only(render({"rbac": {"readNodes": False}}), "ClusterRole")
    assert not any(resource == "nodes" for _, resource, _ in rules_of(cluster_role))
    assert ("", "secrets", "get") in rules_of(only(render({}), "ClusterRole"))
    cluster_role = only(render({"rbac": {"readPullSecrets": False}}), "ClusterRole")
    assert not any(resource == "secrets" for _, resource, _ in rules_of(cluster_role))


def test_lease_rights_only_for_the_lease_in_the_release_namespace() -> None:
    objects = render({"leaderElection": {"leaseName": "dmr-lease"}})
    role = only(objects, "Role", f"{RELEASE}-dmr-operator-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    # create cannot be limited by name; reading and renewing can.
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["dmr-lease"],
            "verbs": ["get", "update"],
        },
    ]
    binding = only(objects, "RoleBinding", f"{RELEASE}-dmr-operator-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == f"{RELEASE}-dmr-operator"
    assert not any(g == "coordination.k8s.io" for g, _, _ in rules_of(only(objects, "ClusterRole")))


def test_metrics_service_and_service_monitor() -> None:
    objects = render({"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s"}}})
    service = only(objects, "Service", f"{RELEASE}-dmr-operator-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = only(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert not find(render({"metrics": {"enabled": False}}), "Service")


def pool_objects(objects: list[dict[str, Any]], pool: str) -> tuple[dict[str, Any], dict[str, Any]]:
    name = f"{RELEASE}-pool-{pool}"
    return only(objects, "StatefulSet", name), only(objects, "Service", name)


def runner_container(statefulset: dict[str, Any]) -> dict[str, Any]:
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == [constants.RUNNER_CONTAINER]
    container: dict[str, Any] = containers[0]
    return container


@pytest.mark.parametrize(
    ("pool", "image", "gpu_limit"),
    [
        (
            {"name": "p", "accelerator": "nvidia"},
            "docker/model-runner:latest-cuda",
            {"nvidia.com/gpu": "1"},
        ),
        (
            {"name": "p", "accelerator": "nvidia", "vllm": True, "gpus": 4},
            "docker/model-runner:latest-vllm-cuda",
            {"nvidia.com/gpu": "4"},
        ),
        (
            {"name": "p", "accelerator": "nvidia", "engine": "vllm"},
            "docker/model-runner:latest-vllm-cuda",
            {"nvidia.com/gpu": "1"},
        ),
        (
            {"name": "p", "accelerator": "nvidia", "engine": "sglang"},
            "docker/model-runner:latest-sglang-cuda",
            {"nvidia.com/gpu": "1"},
        ),
        (
            {"name": "p", "accelerator": "amd"},
            "docker/model-runner:latest-rocm",
            {"amd.com/gpu": "1"},
        ),
        ({"name": "p", "accelerator": "cpu"}, "docker/model-runner:latest", {}),
        ({"name": "p"}, "docker/model-runner:latest", {}),
        ({"name": "p", "accelerator": "nvidia", "gpus": 0}, "docker/model-runner:latest-cuda", {}),
        (
            {"name": "p", "accelerator": "nvidia", "image": "mirror.local/dmr:v1.2.3-cuda"},
            "mirror.local/dmr:v1.2.3-cuda",
            {"nvidia.com/gpu": "1"},
        ),
    ],
)
def test_pool_image_and_gpus_follow_the_accelerator(
    pool: dict[str, Any], image: str, gpu_limit: dict[str, str]
) -> None:
    statefulset, _ = pool_objects(render({"runnerPools": [pool]}), "p")
    container = runner_container(statefulset)
    assert container["image"] == image
    limits = (container.get("resources") or {}).get("limits") or {}
    assert {k: v for k, v in limits.items() if k.endswith("/gpu")} == gpu_limit
    shm_mounted = any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    assert shm_mounted == (bool(pool.get("vllm")) or pool.get("engine") in ("vllm", "sglang"))


def test_pool_statefulset_and_service_match_what_the_operator_expects() -> None:
    objects = render(TWO_POOLS)
    statefulset, service = pool_objects(objects, "gpu")
    # The operator publishes a DMRModel's endpoint from the Service selecting exactly the pool.
    assert service["spec"]["selector"] == {constants.POOL_LABEL: "gpu"}
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": constants.RUNNER_PORT_NAME, "protocol": "TCP"},
        {
            "name": constants.RUNNER_PORT_NAME,
            "port": constants.RUNNER_PORT,
            "targetPort": constants.RUNNER_PORT_NAME,
            "protocol": "TCP",
        },
    ]
    template = statefulset["spec"]["template"]
    assert template["metadata"]["labels"][constants.POOL_LABEL] == "gpu"
    assert (
        statefulset["spec"]["selector"]["matchLabels"].items()
        <= template["metadata"]["labels"].items()
    )
    container = runner_container(statefulset)
    assert container["ports"] == [
        {
            "name": constants.RUNNER_PORT_NAME,
            "containerPort": constants.RUNNER_PORT,
            "protocol": "TCP",
        }
    ]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {
        "MODEL_RUNNER_PORT": str(constants.RUNNER_PORT),
        "DO_NOT_TRACK": "1",
        "MODEL_RUNNER_ENVIRONMENT": "cloud",
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {
            "path": "/engines/status",
            "port": constants.RUNNER_PORT_NAME,
        }
    assert container["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": "2"}
    pod = template["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "models"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
    # Hugging Face staging ($TMPDIR) on the model volume; sockets and $HOME on emptyDirs, so
    # any UID can run it with a read-only root (proven with the real server in tests/real).
    assert {"name": "models", "mountPath": "/tmp", "subPath": ".tmp"} in container["volumeMounts"]
    assert container["workingDir"] == "/var/run/model-runner"
    assert {"name": "sockets", "mountPath": "/var/run/model-runner"} in container["volumeMounts"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    cpu_statefulset, _ = pool_objects(objects, "cpu")
    assert cpu_statefulset["spec"]["replicas"] == 2
    cpu_env = {item["name"] for item in runner_container(cpu_statefulset)["env"]}
    assert "MODEL_RUNNER_ENVIRONMENT" not in cpu_env  # cloudEnvironment: false is honoured
    assert "storageClassName" not in cpu_statefulset["spec"]["volumeClaimTemplates"][0]["spec"]


def test_pool_pods_and_claims_do_not_change_with_the_chart_version() -> None:
    statefulset, _ = pool_objects(render(TWO_POOLS), "cpu")
    # volumeClaimTemplates are immutable and a new pod template restarts every runner.
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    claim_labels = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["labels"]
    for labels in (pod_labels, claim_labels):
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels


def test_pool_env_and_defaults_merge() -> None:
    objects = render(
        {
            "runnerPoolDefaults": {"imageRepository": "mirror.local/model-runner"},
            "runnerPools": [
                {
                    "name": "p",
                    "accelerator": "nvidia",
                    "env": [{"name": "LOG_LEVEL", "value": "debug"}],
                    "storage": {"size": "1Ti"},
                }
            ],
        }
    )
    statefulset, _ = pool_objects(objects, "p")
    container = runner_container(statefulset)
    assert container["image"] == "mirror.local/model-runner:latest-cuda"
    assert {"name": "LOG_LEVEL", "value": "debug"} in container["env"]
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "1Ti"
    }


def test_pool_pods_serve_through_a_pre_stop_sleep_unless_turned_off() -> None:
    objects = render(
        {
            "runnerPools": [
                {"name": "p"},
                {"name": "long", "preStopSleepSeconds": 60},
                {"name": "off", "preStopSleepSeconds": 0},
            ]
        }
    )
    for name, sleep in (("p", 15), ("long", 60)):
        statefulset, _ = pool_objects(objects, name)
        pod = statefulset["spec"]["template"]["spec"]
        assert runner_container(statefulset)["lifecycle"] == {
            "preStop": {"sleep": {"seconds": sleep}}
        }
        assert pod["terminationGracePeriodSeconds"] == sleep + 30  # room to stop after it
    off, _ = pool_objects(objects, "off")
    assert "lifecycle" not in runner_container(off)  # an explicit 0 is not the default's 15
    assert "terminationGracePeriodSeconds" not in off["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": "2"},
        {"runnerPools": [{"name": "p", "preStopSleepSeconds": -1}]},
        {"unknownKey": True},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"allowedRunnerHosts": ["http://gpu-box:12434/"]},
        {"runnerPools": [{"accelerator": "nvidia"}]},
        {"runnerPools": [{"name": "p", "accelerator": "tpu"}]},
        {"runnerPools": [{"name": "p", "gpus": -1}]},
        {"runnerPools": [{"name": "p", "storage": {"size": "lots"}}]},
        {"runnerPools": [{"name": "p", "nodeSelectr": {}}]},
        {"metrics": {"serviceMonitor": {"interval": "often"}}},
        {"leaderElection": {"leaseDuration": 1}},
        {"leaderElection": {"leaseName": "Not_A_Name"}},
        {"runnerPools": [{"name": "p", "gpuClaim": {"deviceClassName": "Bad_Name"}}]},
        {"deviceClasses": [{"name": "c"}]},
    ],
    ids=repr,
)
def test_schema_refuses_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(values)
    assert helm.lint_chart(CHART, values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rbac": {"clusterWide": False}}, "watchNamespaces"),
        ({"runnerPools": [{"name": "p"}, {"name": "p"}]}, "used twice"),
        ({"runnerPools": [{"name": "p", "accelerator": "amd", "vllm": True}]}, "vllm"),
        ({"runnerPools": [{"name": "p", "engine": "sglang"}]}, "engine sglang needs"),
        ({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}, "metrics.enabled"),
        (
            {"runnerPools": [{"name": "p", "gpuClaim": {"selectors": ["true"]}}]},
            "deviceClassName",
        ),
        (
            {
                "runnerPools": [
                    {
                        "name": "p",
                        "gpuClaim": {"deviceClassName": "c", "resourceClaimTemplateName": "t"},
                    }
                ]
            },
            "not both",
        ),
    ],
)
def test_templates_refuse_inconsistent_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


def test_notes_warn_when_pools_are_outside_the_watched_namespaces() -> None:
    values = {"watchNamespaces": ["team-a"], "runnerPools": [{"name": "default"}]}
    notes = helm.render_notes(CHART, values=values, release=RELEASE, namespace=NAMESPACE)
    assert f"{RELEASE}-pool-default" in notes
    assert "WARNING" in notes
    values["watchNamespaces"].append(NAMESPACE)
    assert "WARNING" not in helm.render_notes(CHART, values=values, namespace=NAMESPACE)


def test_install_order_puts_prerequisites_first() -> None:
    values = {"replicaCount": 2, "runnerPools": [{"name": "p"}]}
    objects = helm.sort_for_install(helm.render_chart(CHART, values=values, include_crds=True))
    kinds = [obj["kind"] for obj in objects]
    assert (
        kinds.index("ServiceAccount")
        < kinds.index("ClusterRoleBinding")
        < kinds.index("Deployment")
    )
    last_crd = max(i for i, kind in enumerate(kinds) if kind == "CustomResourceDefinition")
    assert last_crd < kinds.index("ClusterRole") < kinds.index("RoleBinding")
    assert kinds.index("Service") < kinds.index("StatefulSet")


def test_pool_registry_settings_become_model_runners_variables_and_credentials() -> None:
    registry = {
        "default": "mirror.internal:5000",
        "insecure": True,
        "mirrors": ["https://m1.example", "https://m2.example"],
        "credentialsSecret": "registry-creds",
    }
    statefulset, _ = pool_objects(
        render({"runnerPools": [{"name": "p", "registry": registry}]}), "p"
    )
    container = runner_container(statefulset)
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["DEFAULT_REGISTRY"] == "mirror.internal:5000"
    assert env["INSECURE_REGISTRY"] == "true"
    assert env["MODEL_RUNNER_REGISTRY_MIRRORS"] == "https://m1.example,https://m2.example"
    # Where model-runner's keychain looks: $HOME/.docker/config.json.
    assert {
        "name": "registry-credentials",
        "mountPath": "/home/modelrunner/.docker",
        "readOnly": True,
    } in container["volumeMounts"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["registry-credentials"]["secret"] == {
        "secretName": "registry-creds",
        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
    }
    plain = runner_container(pool_objects(render({"runnerPools": [{"name": "p"}]}), "p")[0])
    assert not {"DEFAULT_REGISTRY", "INSECURE_REGISTRY"} & {e["name"] for e in plain["env"]}


def test_dra_pool_claims_its_gpus_from_a_template_named_by_its_request() -> None:
    objects = render(MODES["dra-pools"])
    statefulset, _ = pool_objects(objects, "big")
    pod = statefulset["spec"]["template"]["spec"]
    (claim,) = pod["resourceClaims"]
    template = only(objects, "ResourceClaimTemplate")
    assert claim == {"name": "gpus", "resourceClaimTemplateName": template["metadata"]["name"]}
    assert template["metadata"]["name"].startswith(f"{RELEASE}-pool-big-gpus-")
    assert template["metadata"]["namespace"] == NAMESPACE
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"] == {
        "deviceClassName": "gpu-40g",
        "allocationMode": "ExactCount",
        "count": 2,
        "selectors": [{"cel": {"expression": "true"}}],
    }
    container = runner_container(statefulset)
    # The claim gives the devices; no nvidia.com/gpu extended resource beside it.
    assert container["resources"] == {"claims": [{"name": "gpus"}]}
    own, _ = pool_objects(objects, "own")
    assert own["spec"]["template"]["spec"]["resourceClaims"] == [
        {"name": "gpus", "resourceClaimTemplateName": "h100"}
    ]
    (device_class,) = find(objects, "DeviceClass")
    assert device_class["metadata"]["name"] == "gpu-40g"
    assert device_class["spec"]["selectors"] == [
        {"cel": {"expression": "device.driver == 'gpu.nvidia.com'"}}
    ]
    # Another request is another template (the apiserver refuses changes to one).
    changed = {**MODES["dra-pools"]}
    changed["runnerPools"] = [
        {"name": "big", "accelerator": "nvidia", "gpuClaim": {"deviceClassName": "gpu-40g"}}
    ]
    other = only(render(changed), "ResourceClaimTemplate")
    assert other["metadata"]["name"] != template["metadata"]["name"]
