"""Render and lint a Helm chart with Helm's own Go code, without the helm binary.

Tests (and the sandbox) use this to turn ``charts/dmr-operator`` into plain manifests: unit
tests inspect them, integration tests server-side apply them to the local control plane, which is
what ``helm install`` does minus the release bookkeeping. Helm itself comes from
``helm-python-sdk``, a ctypes binding to Helm's Go SDK compiled as a shared library, so
rendering, ``values.schema.json`` validation and lint are Helm's, not an imitation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python
import yaml

# The order `helm install` creates kinds in (Helm's kind sorter), so that a server-side apply of
# render_chart's output meets no missing ServiceAccount, Role or CRD. Other kinds (custom
# resources) come last, after their CRDs.
INSTALL_ORDER = (
    "PriorityClass",
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
)
# Helm's lint severities: 1 info (e.g. "icon is recommended"), 2 warning, 3 error. Warnings count:
# `helm lint --strict` is what chart CI runs.
_LINT_WARNING = 2


def render_chart(
    chart_dir: str | os.PathLike[str],
    *,
    values: Mapping[str, Any],
    release: str = "dmr",
    namespace: str = "dmr-system",
    include_crds: bool = False,
) -> list[dict[str, Any]]:
    """Render the chart like ``helm template`` and return its objects, in file order.

    ``sort_for_install`` puts them in the order to apply them to a cluster.

    ``values`` are validated against the chart's ``values.schema.json`` first, as ``helm install``
    does; a violation raises ``helm_python.HelmValuesError``. A template's ``fail`` raises
    ``helm_python.HelmRenderError``. With ``include_crds`` the files of the chart's ``crds/``
    folder come first, as ``helm install`` creates them before anything else.
    """
    with helm_python.Chart.load(os.fspath(chart_dir)) as chart:
        chart.validate_schema(dict(values))
        rendered = chart.render(dict(values), name=release, namespace=namespace, is_install=True)
        crd_files = chart.crds if include_crds else []
    documents: list[dict[str, Any]] = []
    for crd_file in crd_files:
        documents.extend(_parse_documents(crd_file["data"]))
    for path in sorted(rendered):
        if Path(path).suffix in (".yaml", ".yml"):
            documents.extend(_parse_documents(rendered[path]))
    return documents


def render_notes(
    chart_dir: str | os.PathLike[str],
    *,
    values: Mapping[str, Any],
    release: str = "dmr",
    namespace: str = "dmr-system",
) -> str:
    """The chart's NOTES.txt as ``helm install`` would print it."""
    with helm_python.Chart.load(os.fspath(chart_dir)) as chart:
        rendered = chart.render(dict(values), name=release, namespace=namespace, is_install=True)
    return next((text for path, text in rendered.items() if path.endswith("NOTES.txt")), "")


def lint_chart(chart_dir: str | os.PathLike[str], values: Mapping[str, Any]) -> list[str]:
    """Problems ``helm lint --strict`` reports for the chart with ``values`` (empty = clean)."""
    report = helm_python.lint(os.fspath(chart_dir), dict(values), strict=True)
    problems = [
        f"{message['path']}: {message['error']}"
        for message in report.get("messages", [])
        if message.get("severity", 0) >= _LINT_WARNING
    ]
    problems.extend(str(error) for error in report.get("errors") or [])
    return problems


def sort_for_install(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``objects`` in the order ``helm install`` creates them (stable within a kind)."""
    rank = {kind: position for position, kind in enumerate(INSTALL_ORDER)}
    return sorted(objects, key=lambda obj: rank.get(obj.get("kind", ""), len(INSTALL_ORDER)))


def _parse_documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]
