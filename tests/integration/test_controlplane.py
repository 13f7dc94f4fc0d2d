"""The local control plane: readiness, metrics, CRD admission, ServiceAccount kubeconfigs,
apiserver restarts, warm start time and a teardown that leaves no process behind."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from dmr_operator.testing import controlplane
from dmr_operator.testing.waiting import wait_for

WIDGET_GROUP = "throwaway.test"
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{WIDGET_GROUP}"},
    "spec": {
        "group": WIDGET_GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "color": {"type": "string", "enum": ["red", "green"]},
                                    "replicas": {"type": "integer", "minimum": 1},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def _get(cp: controlplane.ControlPlane, path: str, *, token: str) -> tuple[int, str]:
    request = urllib.request.Request(cp.server_url + path)
    request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(cp.ca_path))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return int(response.status), response.read().decode()


def test_apiserver_is_ready_and_serves_metrics_to_admin(
    control_plane: controlplane.ControlPlane,
) -> None:
    assert _get(control_plane, "/readyz", token=control_plane.admin_token) == (200, "ok")
    status, metrics = _get(control_plane, "/metrics", token=control_plane.admin_token)
    assert status == 200
    assert "apiserver_request_total{" in metrics


def test_kubeconfig_works_with_kubectl(control_plane: controlplane.ControlPlane) -> None:
    import subprocess

    binaries = controlplane.ensure_binaries(build=False)
    assert binaries.kubectl is not None
    kubectl = subprocess.run(
        [
            str(binaries.kubectl),
            "--kubeconfig",
            str(control_plane.kubeconfig_path),
            "get",
            "--raw",
            "/readyz",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (kubectl.returncode, kubectl.stdout) == (0, "ok"), kubectl.stderr


def test_crd_schema_rejects_bad_objects_at_admission(api_client: Any, namespace: str) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    custom = kubernetes.client.CustomObjectsApi(api_client)
    try:
        extensions.create_custom_resource_definition(WIDGET_CRD)
    except kubernetes.client.ApiException as error:
        if error.status != 409:  # left by an earlier run against a kept control plane
            raise

    def create(spec: dict[str, Any]) -> Any:
        return custom.create_namespaced_custom_object(
            WIDGET_GROUP,
            "v1",
            namespace,
            "widgets",
            {
                "apiVersion": f"{WIDGET_GROUP}/v1",
                "kind": "Widget",
                "metadata": {"generateName": "w-"},
                "spec": spec,
            },
        )

    # Served as soon as the CRD is Established; until then creates answer 404.
    wait_for(
        lambda: create({"color": "red", "replicas": 1}),
        timeout=30,
        message="the Widget CRD to be served",
        ignore=(kubernetes.client.ApiException,),
    )
    with pytest.raises(kubernetes.client.ApiException) as bad_enum:
        create({"color": "blue", "replicas": 1})
    assert bad_enum.value.status == 422
    assert "spec.color" in str(bad_enum.value.body)
    with pytest.raises(kubernetes.client.ApiException) as bad_minimum:
        create({"color": "green", "replicas": 0})
    assert bad_minimum.value.status == 422
    assert "spec.replicas" in str(bad_minimum.value.body)


def test_service_account_kubeconfig_authenticates_and_rbac_applies(
    control_plane: controlplane.ControlPlane, api_client: Any, namespace: str, tmp_path: Path
) -> None:
    core = kubernetes.client.CoreV1Api(api_client)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "robot"}})
    token = core.create_namespaced_service_account_token(
        "robot", namespace, {"spec": {"audiences": ["https://kubernetes.default.svc"]}}
    ).status.token
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "robot.kubeconfig")
    robot = kubernetes.client.CoreV1Api(
        kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    )
    with pytest.raises(kubernetes.client.ApiException) as denied:
        robot.list_namespaced_pod(namespace)
    assert denied.value.status == 403  # authenticated as the ServiceAccount, then RBAC says no
    assert f"system:serviceaccount:{namespace}:robot" in str(denied.value.body)

    rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        namespace,
        {"metadata": {"name": "pod-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
    )  # fmt: skip
    rbac.create_namespaced_role_binding(
        namespace,
        {"metadata": {"name": "robot-reads-pods"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}]},
    )  # fmt: skip
    wait_for(
        lambda: robot.list_namespaced_pod(namespace) is not None,
        timeout=10,
        message="the RoleBinding to take effect",
        ignore=(kubernetes.client.ApiException,),
    )


def _processes_in_groups(groups: set[int]) -> list[int]:
    """Live (non-zombie) processes whose process group is one of ``groups``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may contain spaces and parentheses: fields follow the last ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in groups and state != "Z":
            found.append(int(entry.name))
    return found


def test_second_control_plane_starts_fast_restarts_and_leaves_no_process() -> None:
    binaries = controlplane.ensure_binaries(build=False)
    with_controllers = binaries.controller_manager is not None and binaries.scheduler is not None
    started = time.monotonic()
    second = controlplane.ControlPlane(controllers=with_controllers, binaries=binaries).start()
    try:
        startup_seconds = time.monotonic() - started
        print(f"warm start with cached binaries: {startup_seconds:.1f}s")
        # A few seconds when the machine is idle; the bound leaves room for a busy 2-core runner.
        assert startup_seconds < 45
        pids = second.pids
        assert len(pids) == (4 if with_controllers else 2)

        core = kubernetes.client.CoreV1Api(second.api_client())
        core.create_namespaced_config_map(
            "default", {"metadata": {"name": "survives"}, "data": {"k": "v"}}
        )
        second.restart_apiserver()
        assert core.read_namespaced_config_map("survives", "default").data == {"k": "v"}
        pids = [*pids, *second.pids]  # the restarted apiserver has a new pid
        work_dir = second.work_dir
    finally:
        second.stop()
    assert _processes_in_groups(set(pids)) == []
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not work_dir.exists()


def _stub(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_kubebuilder_assets_take_precedence_over_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    apiserver, etcd = _stub(tmp_path / "kube-apiserver"), _stub(tmp_path / "etcd")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    found = controlplane.ensure_binaries(build=False)
    assert (found.apiserver, found.etcd) == (apiserver, etcd)
    assert found.controller_manager is None  # envtest assets have no controller-manager
    with pytest.raises(controlplane.ControlPlaneUnavailable, match="controllers=True"):
        controlplane.ControlPlane(controllers=True, binaries=found).start()


def test_missing_binaries_are_reported_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    with pytest.raises(controlplane.ControlPlaneUnavailable) as empty:
        controlplane.ensure_binaries(build=False)
    assert "needs kube-apiserver and etcd (it holds: nothing)" in str(empty.value)
    _stub(tmp_path / "kube-apiserver")
    with pytest.raises(controlplane.ControlPlaneUnavailable) as no_etcd:
        controlplane.ensure_binaries(build=False)
    assert "(it holds: kube-apiserver)" in str(no_etcd.value)
    assert "\n" not in str(no_etcd.value)


def test_the_cluster_is_the_version_the_build_module_pins(api_client: Any) -> None:
    """The binaries report the release they were built from (ldflags), and kubectl matches."""
    import subprocess

    version = kubernetes.client.VersionApi(api_client).get_code()
    assert version.git_version == f"v{controlplane.KUBERNETES_VERSION}"
    binaries = controlplane.ensure_binaries(build=False)
    assert binaries.kubectl is not None
    client = subprocess.run(
        [str(binaries.kubectl), "version", "--client", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert json.loads(client.stdout)["clientVersion"]["gitVersion"] == version.git_version


def test_test_namespaces_enforce_pod_security_restricted(api_client: Any, namespace: str) -> None:
    """The real PodSecurity admission plugin refuses a pod "restricted" forbids, in the same
    namespaces where every operator-, chart- and harness-made pod of the suite is admitted."""
    core = kubernetes.client.CoreV1Api(api_client)
    plain = {
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "main", "image": "example.invalid/hello:1"}]},
    }
    with pytest.raises(kubernetes.client.ApiException) as refused:
        core.create_namespaced_pod(namespace, plain)
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert "runAsNonRoot != true" in message
