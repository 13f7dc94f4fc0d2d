"""Prometheus metrics of the operator: runner calls by outcome, reconciles, models by phase.

Counted where they happen without coupling: runner calls through an httpx response hook on the
shared client, status writes and phases by the controllers. ``serve`` exposes them on a port.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import httpx
import prometheus_client
from prometheus_client.core import GaugeMetricFamily

RUNNER_REQUESTS = prometheus_client.Counter(
    "dmr_operator_runner_requests",
    "HTTP requests the operator sent to model-runner, by route and status code.",
    ["method", "route", "code"],
)
STATUS_WRITES = prometheus_client.Counter(
    "dmr_operator_status_writes",
    "Status patches written, by kind.",
    ["kind"],
)
RECONCILE_SECONDS = prometheus_client.Histogram(
    "dmr_operator_runner_sync_seconds",
    "Duration of one runner worker pass (read-back, pulls, configures, verification).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LEADER = prometheus_client.Gauge(
    "dmr_operator_leader",
    "1 while this replica holds the leader-election lease (or runs without election), else 0.",
)


class _ModelsByPhase:
    """``dmr_operator_models{phase}``: read from the controller at scrape time, so it is right
    after a restart and after deletions without bookkeeping."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "dmr_operator_models",
            "DMRModels by phase (Ready = configured and verified on every runner).",
            labels=["phase"],
        )
        for phase, count in sorted((self.source() if self.source else {}).items()):
            family.add_metric([phase], count)
        yield family


MODELS = _ModelsByPhase()
prometheus_client.REGISTRY.register(MODELS)

# Model references and backends appear in paths; collapse them so label cardinality is bounded.
_ROUTES = (
    (re.compile(r"^/engines/[^/]+/_configure$"), "/engines/{backend}/_configure"),
    (re.compile(r"^/models/create$"), "/models/create"),
    (re.compile(r"^/models/.+$"), "/models/{ref}"),
    (re.compile(r"^/engines/[^/]+/v1/.*$"), "/engines/{backend}/v1/..."),
)


def route_of(path: str) -> str:
    for pattern, route in _ROUTES:
        if pattern.match(path):
            return route
    return path


async def record_runner_response(response: httpx.Response) -> None:
    request = response.request
    RUNNER_REQUESTS.labels(
        method=request.method, route=route_of(request.url.path), code=str(response.status_code)
    ).inc()


def serve(port: int) -> None:
    prometheus_client.start_http_server(port)
