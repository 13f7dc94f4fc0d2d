"""Counting Kubernetes API requests per client from kube-apiserver's own audit log.

``AuditedControlPlane`` is the test control plane (``dmr_operator.testing.controlplane``) with
kube-apiserver writing one JSON line per request (policy level Metadata: no bodies). ``count``
attributes requests to a client by User-Agent (the operator's own client sends
``dmr-operator/<version>``, kopf sends ``kopf/<version>``) within a time window, split into reads
and writes; ``last`` finds when the operator last did something (e.g. applied a Deployment).
Used by ``bench/run.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

from dmr_operator.testing import controlplane

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
"""
READ_VERBS = frozenset({"get", "list", "watch"})
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
OPERATOR_AGENTS = ("dmr-operator/", "kopf/")


class AuditedControlPlane(controlplane.ControlPlane):
    """A control plane whose kube-apiserver keeps an audit log in its work directory."""

    @property
    def audit_log_path(self) -> Path:
        return self.work_dir / "audit.log"

    def _spawn(self, name: str, argv: Sequence[str]) -> controlplane._Process:
        if name == "kube-apiserver":
            policy = self.work_dir / "audit-policy.yaml"
            policy.write_text(AUDIT_POLICY)
            argv = [
                *argv,
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log_path}",
                "--audit-log-format=json",
                "--audit-log-maxsize=0",
            ]
        return super()._spawn(name, argv)


@dataclasses.dataclass(frozen=True)
class Request:
    user_agent: str
    verb: str
    resource: str
    subresource: str
    namespace: str
    received: float  # seconds since the epoch


@dataclasses.dataclass(frozen=True)
class Counts:
    reads: int
    writes: int
    by_verb: dict[str, int]

    @property
    def total(self) -> int:
        return self.reads + self.writes


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse(lines: Iterable[str]) -> Iterator[Request]:
    """One ``Request`` per audit ID (a watch logs ResponseStarted and later ResponseComplete)."""
    seen: set[str] = set()
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        audit_id = event.get("auditID", "")
        if audit_id in seen:
            continue
        seen.add(audit_id)
        ref = event.get("objectRef") or {}
        yield Request(
            user_agent=event.get("userAgent", ""),
            verb=event.get("verb", ""),
            resource=ref.get("resource", ""),
            subresource=ref.get("subresource", ""),
            namespace=ref.get("namespace", ""),
            received=_timestamp(event["requestReceivedTimestamp"]),
        )


def read(path: Path) -> list[Request]:
    if not path.exists():
        return []
    with path.open() as lines:
        return list(parse(lines))


def count(
    requests: Iterable[Request],
    *,
    since: float,
    until: float,
    agents: Sequence[str] = OPERATOR_AGENTS,
) -> Counts:
    """Requests from clients whose User-Agent starts with one of ``agents`` in [since, until]."""
    verbs: Counter[str] = Counter()
    for request in requests:
        if since <= request.received <= until and request.user_agent.startswith(tuple(agents)):
            resource = request.resource + (f"/{request.subresource}" if request.subresource else "")
            verbs[f"{request.verb} {resource}"] += 1
    reads = sum(n for key, n in verbs.items() if key.split()[0] in READ_VERBS)
    writes = sum(n for key, n in verbs.items() if key.split()[0] in WRITE_VERBS)
    return Counts(reads=reads, writes=writes, by_verb=dict(verbs.most_common()))


def last(
    requests: Iterable[Request],
    *,
    verb: str,
    resource: str,
    since: float,
    agents: Sequence[str] = OPERATOR_AGENTS,
) -> float | None:
    """When the last ``verb`` on ``resource`` (e.g. "deployments", "agents/status") was received."""
    return max(
        (
            request.received
            for request in requests
            if request.received >= since
            and request.verb == verb
            and request.user_agent.startswith(tuple(agents))
            and resource
            == request.resource + (f"/{request.subresource}" if request.subresource else "")
        ),
        default=None,
    )


def wait_quiet(path: Path, *, since: float, quiet: float = 3.0, timeout: float = 60.0) -> float:
    """Wait until the operator's last write (in the audit log at ``path``, after ``since``) is
    ``quiet`` seconds old, at most ``timeout``; returns the time then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(1)
        last = max(
            (
                r.received
                for r in read(path)
                if r.received >= since
                and r.verb in WRITE_VERBS
                and r.user_agent.startswith(OPERATOR_AGENTS)
            ),
            default=since,
        )
        if time.time() - last >= quiet:
            return time.time()
    return time.time()
