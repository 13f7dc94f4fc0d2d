"""Server-side apply of plain manifests (dicts) to any cluster: ``kubectl apply --server-side``.

Used by the chart-install and examples integration tests (objects rendered by ``helm.py`` or read
from ``examples/``) and by ``dmr-operator sandbox`` (the default pool and the examples). Kinds are
resolved through the API server's discovery, so custom resources work as soon as their CRD is
served: a CustomResourceDefinition applied here is waited for until it is Established.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from dmr_operator.testing.waiting import wait_for

APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "dmr-manifests"
CRD_ESTABLISH_TIMEOUT = 30.0


def load_file(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of one file, empty documents left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_directory(directory: Path, *, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The documents of every ``*.yaml`` file in ``directory`` but ``exclude``, in name order."""
    skipped = set(exclude)
    return [
        document
        for path in sorted(directory.glob("*.yaml"))
        if path.name not in skipped
        for document in load_file(path)
    ]


def placeholder_volume(name: str, *, size: str) -> dict[str, Any]:
    """A PersistentVolume for one claim to bind to where no storage provisioner runs.

    The local control plane has none, so a StatefulSet's volumeClaimTemplates would leave its
    pods Pending. Nothing ever mounts it: simulated pods have no filesystem.
    """
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"dmr.dev/placeholder-volume": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "hostPath": {"path": f"/nonexistent/{name}"},
        },
    }


class Applier:
    """Applies objects with one field manager; discovery is cached per apiVersion."""

    def __init__(self, api_client: Any, *, field_manager: str = FIELD_MANAGER) -> None:
        self.api_client = api_client
        self.field_manager = field_manager
        # apiVersion -> kind -> (plural, namespaced)
        self._kinds: dict[str, dict[str, tuple[str, bool]]] = {}

    def apply(self, obj: Mapping[str, Any], *, namespace: str | None = None) -> dict[str, Any]:
        """Create or update ``obj``; a namespaced object without one goes to ``namespace``."""
        body = json.loads(json.dumps(obj))  # a deep copy that is plain JSON
        applied: dict[str, Any] = self._call(
            "PATCH",
            self._path(body, namespace=namespace),
            body=body,
            query=[("fieldManager", self.field_manager), ("force", "true")],
            content_type=APPLY_PATCH,
        )
        if obj["kind"] == "CustomResourceDefinition":
            self._wait_established(str(obj["metadata"]["name"]))
        return applied

    def delete(self, obj: Mapping[str, Any], *, namespace: str | None = None) -> None:
        """Delete ``obj`` (by apiVersion, kind, name, namespace); its dependents are collected."""
        self._call("DELETE", self._path(obj, namespace=namespace))

    def _path(self, obj: Mapping[str, Any], *, namespace: str | None) -> str:
        """The object's URL path; a namespaced ``obj`` without a namespace is in ``namespace``."""
        api_version, kind = str(obj["apiVersion"]), str(obj["kind"])
        plural, namespaced = self._resource(api_version, kind)
        metadata = obj["metadata"]
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if not namespaced:
            return f"{base}/{plural}/{metadata['name']}"
        target = metadata.get("namespace") or namespace
        if not target:
            raise ValueError(f"{kind}/{metadata['name']} is namespaced: give a namespace")
        return f"{base}/namespaces/{target}/{plural}/{metadata['name']}"

    def apply_all(
        self, objects: Iterable[Mapping[str, Any]], *, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return [self.apply(obj, namespace=namespace) for obj in objects]

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        known = self._kinds.get(api_version, {})
        if kind not in known:
            # A group version appears (or gains kinds) when a CRD is established: ask again.
            known = self._discover(api_version)
            self._kinds[api_version] = known
        if kind not in known:
            raise LookupError(f"the API server does not serve {kind} in {api_version}")
        return known[kind]

    def _discover(self, api_version: str) -> dict[str, tuple[str, bool]]:
        path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        try:
            listing = self._call("GET", path)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return {}
            raise
        return {
            resource["kind"]: (resource["name"], bool(resource["namespaced"]))
            for resource in listing.get("resources", [])
            if "/" not in resource["name"]  # subresources such as pods/status
        }

    def _wait_established(self, name: str) -> None:
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"

        def established() -> bool:
            conditions = (self._call("GET", path).get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for(established, timeout=CRD_ESTABLISH_TIMEOUT, message=f"CRD {name} established")

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        serialized = self.api_client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*serialized)
        response.read()
        if not 200 <= response.status < 300:
            raise kubernetes.client.ApiException(http_resp=response)
        decoded: dict[str, Any] = json.loads(response.data)
        return decoded
