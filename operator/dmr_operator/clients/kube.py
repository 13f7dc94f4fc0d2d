"""The operator's own Kubernetes API client: async, over httpx, with kopf's credentials.

kopf watches and handles objects; everything the operator writes on its own initiative (status of
DMRModels and Agents, Events, readiness-gate conditions on pods, an Agent's children) goes through
this module. It uses the same credentials kopf logged in with (``kopf.ConnectionInfo``) so there
is one source of truth for authentication, and it chooses the patch content type explicitly
(merge patch for status, strategic merge for pod conditions, server-side apply for children),
which the generated ``kubernetes`` client does not do for dicts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import ssl
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from dmr_operator import constants

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "dmr-operator"
# Requests to the apiserver at once (and connections kept): enough to overlap its latency.
MAX_IN_FLIGHT = 32

# Plural resource paths of the kinds this operator touches, so callers speak in kinds.
_RESOURCES: Mapping[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{ns}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("v1", "Node"): "/api/v1/nodes",
    ("v1", "Secret"): "/api/v1/namespaces/{ns}/secrets",
    ("v1", "Event"): "/api/v1/namespaces/{ns}/events",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    ("apps/v1", "StatefulSet"): "/apis/apps/v1/namespaces/{ns}/statefulsets",
    ("coordination.k8s.io/v1", "Lease"): "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
    ("resource.k8s.io/v1", "ResourceClaimTemplate"): (
        "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaimtemplates"
    ),
    ("resource.k8s.io/v1", "ResourceClaim"): (
        "/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims"
    ),
    (constants.API_VERSION, constants.DMRMODEL_KIND): (
        f"/apis/{constants.API_VERSION}/namespaces/{{ns}}/{constants.DMRMODEL_PLURAL}"
    ),
    (constants.API_VERSION, constants.AGENT_KIND): (
        f"/apis/{constants.API_VERSION}/namespaces/{{ns}}/{constants.AGENT_PLURAL}"
    ),
}


class KubeError(Exception):
    """An API request failed; ``status`` is the HTTP status (0 when no answer came)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status


class NotFound(KubeError):
    pass


def refused_for_good(error: KubeError) -> bool:
    """A read no retry will change: no right to it (403), or nothing there (404)."""
    return error.status in (403, 404)


class Conflict(KubeError):
    pass


Credentials = Mapping[str, Any]
CredentialsSource = Callable[[], Awaitable[Credentials]]


class KubeClient:
    """A small async client for the handful of calls the operator makes.

    ``credentials`` returns kopf-style connection facts (server, token or client certificate,
    CA); it is called again after a 401 so rotated tokens are picked up.
    """

    def __init__(self, credentials: CredentialsSource, *, timeout: float = 30.0) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self._files: list[str] = []
        # httpcore matches every waiting request against every connection whenever one frees:
        # a thousand status writes queued in the pool at once cost more CPU than the writes.
        # Waiting here instead is a plain FIFO.
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for path in self._files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._files.clear()

    async def _client(self, *, renew: bool = False) -> httpx.AsyncClient:
        async with self._lock:
            if self._http is not None and not renew:
                return self._http
            if self._http is not None:
                await self._http.aclose()
            self._http = self._build(await self._credentials())
            return self._http

    def _build(self, info: Credentials) -> httpx.AsyncClient:
        headers = {"User-Agent": f"{FIELD_MANAGER}/{_version()}"}
        if info.get("token"):
            headers["Authorization"] = f"Bearer {info['token']}"
        context = ssl.create_default_context(
            cafile=info.get("ca_path"),
            cadata=_decode(info.get("ca_data")),
        )
        if info.get("insecure"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        certificate = info.get("certificate_path") or self._temp_file(info.get("certificate_data"))
        key = info.get("private_key_path") or self._temp_file(info.get("private_key_data"))
        if certificate and key:
            context.load_cert_chain(certificate, key)
        auth = None
        if info.get("username") and info.get("password"):
            auth = httpx.BasicAuth(str(info["username"]), str(info["password"]))
        return httpx.AsyncClient(
            base_url=str(info["server"]).rstrip("/"),
            headers=headers,
            verify=context,
            auth=auth,
            timeout=self._timeout,
            # As many kept alive as opened: a connection closed after each burst is a TLS
            # handshake at the next one (the apiserver's CPU and ours).
            limits=httpx.Limits(
                max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT
            ),
        )

    def _temp_file(self, data: Any) -> str | None:
        if not data:
            return None
        content = data if isinstance(data, bytes) else _decode_bytes(data)
        handle, path = tempfile.mkstemp(prefix="dmr-operator-")
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        self._files.append(path)
        return path

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call; returns the decoded JSON body. Raises KubeError subclasses."""
        headers = {"Content-Type": content_type} if content_type else None
        for attempt in range(2):
            client = await self._client(renew=attempt > 0)
            try:
                async with self._in_flight:
                    response = await client.request(
                        method, path, json=body, content=content, headers=headers, params=params
                    )
            except httpx.HTTPError as error:
                raise KubeError(0, f"{method} {path}: {error!r}") from error
            if response.status_code == 401 and attempt == 0:
                continue  # credentials rotated: log in again once
            break
        if response.status_code >= 400:
            message = _status_message(response)
            error_type = {404: NotFound, 409: Conflict}.get(response.status_code, KubeError)
            raise error_type(response.status_code, f"{method} {path}: {message}")
        return response.json() if response.content else None

    # --- the calls the operator makes -------------------------------------------------------

    async def patch_status(
        self, *, api_version: str, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> Any:
        """Merge-patch ``status`` of a custom resource (keys set to None are removed)."""
        path = f"{_collection(api_version, kind, namespace)}/{name}/status"
        return await self.request(
            "PATCH", path, body={"status": dict(status)}, content_type=MERGE_PATCH
        )

    async def set_pod_condition(
        self, *, namespace: str, name: str, condition_type: str, status: str, message: str = ""
    ) -> Any:
        """Set one condition on a pod's status (used for readiness gates)."""
        path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
        condition = {
            "type": condition_type,
            "status": status,
            "lastTransitionTime": now_rfc3339(),
            "reason": "ModelsConfigured" if status == "True" else "ModelsNotConfigured",
            "message": message,
        }
        body = {"status": {"conditions": [condition]}}
        return await self.request("PATCH", path, body=body, content_type=STRATEGIC_MERGE_PATCH)

    async def label_pod(
        self, *, namespace: str, name: str, labels: Mapping[str, str | None]
    ) -> Any:
        """Set (or, with None, remove) labels on a pod: a merge patch of its metadata only."""
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"
        body = {"metadata": {"labels": dict(labels)}}
        return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def apply(self, body: Mapping[str, Any], *, force: bool = True) -> Any:
        """Server-side apply of a namespaced object owned by the operator."""
        metadata = body["metadata"]
        collection = _collection(body["apiVersion"], body["kind"], metadata["namespace"])
        path = f"{collection}/{metadata['name']}"
        params = {"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"}
        return await self.request(
            "PATCH",
            path,
            content=json.dumps(body).encode(),
            content_type=APPLY_PATCH,
            params=params,
        )

    async def get(self, *, api_version: str, kind: str, namespace: str, name: str) -> Any:
        try:
            return await self.request("GET", f"{_collection(api_version, kind, namespace)}/{name}")
        except NotFound:
            return None

    async def create(self, body: Mapping[str, Any]) -> Any:
        """Create a namespaced object; ``Conflict`` if it already exists."""
        collection = _collection(body["apiVersion"], body["kind"], body["metadata"]["namespace"])
        return await self.request("POST", collection, body=dict(body))

    async def replace(self, body: Mapping[str, Any]) -> Any:
        """Replace a namespaced object; ``Conflict`` unless its resourceVersion is current."""
        metadata = body["metadata"]
        collection = _collection(body["apiVersion"], body["kind"], metadata["namespace"])
        return await self.request("PUT", f"{collection}/{metadata['name']}", body=dict(body))

    async def delete(self, *, api_version: str, kind: str, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self.request("DELETE", f"{_collection(api_version, kind, namespace)}/{name}")

    async def post_event(
        self,
        *,
        involved: Mapping[str, Any],
        type_: str,
        reason: str,
        message: str,
    ) -> None:
        """Record a core/v1 Event about ``involved`` (an object's apiVersion/kind/metadata)."""
        metadata = involved.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{metadata.get('name')}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": metadata.get("name"),
                "namespace": namespace,
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": os.environ.get("HOSTNAME", FIELD_MANAGER),
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)


def _collection(api_version: str, kind: str, namespace: str) -> str:
    try:
        template = _RESOURCES[(api_version, kind)]
    except KeyError:
        raise KubeError(0, f"the operator does not manage {kind} ({api_version})") from None
    return template.format(ns=namespace)


def _status_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return response.text.strip()[:500]


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decode(data: Any) -> str | None:
    if not data:
        return None
    return _decode_bytes(data).decode()


def _decode_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    text = str(data)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return text.encode()


def _version() -> str:
    from dmr_operator import __version__

    return __version__
