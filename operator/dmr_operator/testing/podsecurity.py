"""The "restricted" Pod Security Standard as a pure checker over pod specs.

Kubernetes enforces the standard with the PodSecurity admission plugin; a namespace labelled
``pod-security.kubernetes.io/enforce=restricted`` refuses pods that break it. Tests use this module
to prove, without a cluster, that what we render (the chart's operator and runner pods, the
operator's Agent pods) would be admitted there. It follows the checks of the standard's
"restricted" level, which includes every "baseline" check (kubernetes.io/docs/concepts/security/
pod-security-standards). Windows-only fields other than hostProcess are not checked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Volume types restricted pods may use; everything else (hostPath first of all) is refused.
ALLOWED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
# The only capability a restricted container may add back after dropping ALL.
ALLOWED_ADDED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
ALLOWED_SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
# Namespaced sysctls the baseline level allows.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
_POD_TEMPLATE_KINDS = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job"}
)
_CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


def pod_spec_of(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod spec inside a Pod, a workload (Deployment, StatefulSet, Job...) or a CronJob."""
    kind = manifest.get("kind")
    spec: Mapping[str, Any] = manifest.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in _POD_TEMPLATE_KINDS:
        return (spec.get("template") or {}).get("spec") or {}
    if kind == "CronJob":
        job_spec = (spec.get("jobTemplate") or {}).get("spec") or {}
        return (job_spec.get("template") or {}).get("spec") or {}
    return None


def check_restricted(pod_spec: Mapping[str, Any]) -> list[str]:
    """Every way ``pod_spec`` breaks the restricted standard, as readable messages (empty = ok)."""
    return [*_check_pod_level(pod_spec), *_check_containers(pod_spec)]


def _check_pod_level(pod_spec: Mapping[str, Any]) -> Iterator[str]:
    for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host_namespace):
            yield f"pod: {host_namespace} must not be true"
    for volume in pod_spec.get("volumes") or []:
        volume_types = set(volume) - {"name"}
        if not volume_types <= ALLOWED_VOLUME_TYPES:
            kinds = ", ".join(sorted(volume_types - ALLOWED_VOLUME_TYPES))
            yield f"volume {volume.get('name')}: type {kinds} is not allowed"
    security: Mapping[str, Any] = pod_spec.get("securityContext") or {}
    yield from _check_security_context("pod", security)
    for sysctl in security.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"pod: sysctl {sysctl.get('name')} is not allowed"


def _check_containers(pod_spec: Mapping[str, Any]) -> Iterator[str]:
    pod_security: Mapping[str, Any] = pod_spec.get("securityContext") or {}
    for field in _CONTAINER_FIELDS:
        for container in pod_spec.get(field) or []:
            where = f"container {container.get('name')}"
            security: Mapping[str, Any] = container.get("securityContext") or {}
            yield from _check_security_context(where, security)
            yield from _check_container_only(where, container, security)
            # These three may be set once for the whole pod instead of per container.
            if not _effective(security, pod_security, "runAsNonRoot"):
                yield f"{where}: runAsNonRoot must be true (in the container or the pod)"
            seccomp_type = (_effective(security, pod_security, "seccompProfile") or {}).get("type")
            if seccomp_type not in ALLOWED_SECCOMP_TYPES:
                yield f"{where}: seccompProfile.type must be RuntimeDefault or Localhost"


def _check_container_only(
    where: str, container: Mapping[str, Any], security: Mapping[str, Any]
) -> Iterator[str]:
    if security.get("privileged"):
        yield f"{where}: privileged must not be true"
    if security.get("allowPrivilegeEscalation") is not False:
        yield f"{where}: allowPrivilegeEscalation must be false"
    capabilities: Mapping[str, Any] = security.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        yield f"{where}: capabilities.drop must include ALL"
    added = set(capabilities.get("add") or []) - ALLOWED_ADDED_CAPABILITIES
    if added:
        yield f"{where}: capabilities.add may only hold NET_BIND_SERVICE, not {sorted(added)}"
    if security.get("procMount", "Default") != "Default":
        yield f"{where}: procMount must be Default"
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            yield f"{where}: hostPort {port['hostPort']} is not allowed"


def _check_security_context(where: str, security: Mapping[str, Any]) -> Iterator[str]:
    """Checks that apply alike to a pod's and a container's securityContext."""
    if security.get("runAsNonRoot") is False:
        yield f"{where}: runAsNonRoot must not be false"
    if security.get("runAsUser") == 0:
        yield f"{where}: runAsUser must not be 0"
    seccomp_type = (security.get("seccompProfile") or {}).get("type")
    if seccomp_type is not None and seccomp_type not in ALLOWED_SECCOMP_TYPES:
        yield f"{where}: seccompProfile.type {seccomp_type} is not allowed"
    apparmor_type = (security.get("appArmorProfile") or {}).get("type")
    if apparmor_type is not None and apparmor_type not in ALLOWED_APPARMOR_TYPES:
        yield f"{where}: appArmorProfile.type {apparmor_type} is not allowed"
    selinux: Mapping[str, Any] = security.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in ALLOWED_SELINUX_TYPES:
        yield f"{where}: seLinuxOptions.type {selinux['type']} is not allowed"
    if selinux.get("user") or selinux.get("role"):
        yield f"{where}: seLinuxOptions.user and .role must not be set"
    if (security.get("windowsOptions") or {}).get("hostProcess"):
        yield f"{where}: windowsOptions.hostProcess must not be true"


def _effective(container: Mapping[str, Any], pod: Mapping[str, Any], key: str) -> Any:
    """A container's setting, falling back to the pod's, as the kubelet resolves it."""
    return container[key] if container.get(key) is not None else pod.get(key)
