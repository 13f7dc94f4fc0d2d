"""Prometheus metrics of the operator: runner calls by outcome, reconciles, models by phase.

Counted where they happen without coupling: runner calls through an httpx response hook on the
shared client, status writes and phases by the controllers. ``serve`` exposes them on a port.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PodRoom:
    """One runner pod as placement last counted it."""

    namespace: str
    pod: str
    memory_bytes: int | None  # what models are placed against (GPU, else host); None: unknown
    placed_bytes: int  # what the copies placed and held there take, by the operator's formula
    slots: int
    placed_slots: int


class _PlacementRoom:
    """Runner pods' room as placement counts it, and models short of their replicas, read from
    the placement keeper at scrape time (a pool filling up shows before a model is refused)."""

    def __init__(self) -> None:
        self.pods: Callable[[], Iterable[PodRoom]] | None = None
        self.short: Callable[[], Mapping[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["namespace", "pod"]
        families = {
            "memory": GaugeMetricFamily(
                "dmr_operator_placement_memory_bytes",
                "Memory of a runner pod that placement places models against (its GPUs', "
                "else its host's); absent while unknown.",
                labels=labels,
            ),
            "placed": GaugeMetricFamily(
                "dmr_operator_placement_placed_bytes",
                "Memory the model copies placed on (and still held by) a runner pod take.",
                labels=labels,
            ),
            "slots": GaugeMetricFamily(
                "dmr_operator_placement_slots",
                "Runner slots of a runner pod (model-runner's min(cores, 8)).",
                labels=labels,
            ),
            "placed_slots": GaugeMetricFamily(
                "dmr_operator_placement_placed_slots",
                "Runner slots the model copies placed on (and still held by) a pod take.",
                labels=labels,
            ),
        }
        for room in self.pods() if self.pods else ():
            key = [room.namespace, room.pod]
            if room.memory_bytes is not None:
                families["memory"].add_metric(key, room.memory_bytes)
            families["placed"].add_metric(key, room.placed_bytes)
            families["slots"].add_metric(key, room.slots)
            families["placed_slots"].add_metric(key, room.placed_slots)
        yield from families.values()
        short = GaugeMetricFamily(
            "dmr_operator_placement_short_models",
            "Placed DMRModels on fewer pods than their placement.replicas (Insufficient).",
            labels=["namespace"],
        )
        for namespace, count in sorted((self.short() if self.short else {}).items()):
            short.add_metric([namespace], count)
        yield short


PLACEMENT = _PlacementRoom()
prometheus_client.REGISTRY.register(PLACEMENT)

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
