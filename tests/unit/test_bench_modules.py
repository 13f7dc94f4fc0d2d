"""The benchmark modules (bench/, not collected as tests) import and their pure parts work.

No cluster: percentile, the audit-log parser and counter, the report table and its in-place
update of BENCHMARKS.md, the floor operator's body (the same one dmr-operator sends), and the
placement benchmarks' workloads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    audit,
    floor_operator,
    placement,
    placement_scale,
    report,
    run,
)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert run.percentile(values, 0.5) == 50
    assert run.percentile(values, 0.99) == 99
    assert run.percentile([3.0], 0.99) == 3


def test_audit_counts_operator_reads_and_writes_once_per_request() -> None:
    def line(audit_id: str, agent: str, verb: str, stage: str, at: str) -> str:
        return json.dumps(
            {
                "auditID": audit_id,
                "stage": stage,
                "verb": verb,
                "userAgent": agent,
                "objectRef": {"resource": "dmrmodels", "namespace": "n", "subresource": "status"},
                "requestReceivedTimestamp": at,
            }
        )

    lines = [
        line("1", "dmr-operator/0.1.0", "patch", "ResponseComplete", "2026-01-01T00:00:01.000000Z"),
        line("2", "kopf/1.45", "watch", "ResponseStarted", "2026-01-01T00:00:02.000000Z"),
        line("2", "kopf/1.45", "watch", "ResponseComplete", "2026-01-01T00:00:02.000000Z"),
        line("3", "kubectl/v1.20", "get", "ResponseComplete", "2026-01-01T00:00:03.000000Z"),
        line("4", "dmr-operator/0.1.0", "patch", "ResponseComplete", "2026-01-01T00:01:00.000000Z"),
    ]
    requests = list(audit.parse(lines))
    start = requests[0].received
    counts = audit.count(requests, since=start, until=start + 10)
    assert (counts.reads, counts.writes) == (1, 1)
    assert counts.by_verb == {"patch dmrmodels/status": 1, "watch dmrmodels/status": 1}


def test_report_replaces_only_its_block(tmp_path: Path) -> None:
    args = run.parse_args(["--quick"])
    assert (args.latency_models, args.scale_models, args.idle_minutes) == (20, 100, 1.0)
    table = report.render(
        [report.Row("m", "1 ms", "< 2 ms", True)], args=args, cluster="Kubernetes v1.37.2"
    )
    assert "| m | 1 ms | < 2 ms | yes |" in table
    assert ") on Kubernetes v1.37.2; " in table
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# head\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    report.write_into(path, table)
    text = path.read_text()
    assert text.startswith("# head\n") and text.endswith("tail\n") and "old" not in text
    assert isinstance(run.parse_args([]), argparse.Namespace)


def test_floor_sends_the_operators_configure_body() -> None:
    body = {"metadata": {"name": "m", "namespace": "n"}, "spec": run.spec_for("lat", 7)}
    assert floor_operator.configure_body(body) == {
        "model": "ai/lat-0007:latest",
        "context-size": 4096,
    }


def test_the_scale_workload_fits_its_pools_so_all_ready_is_reachable() -> None:
    # 200 models per namespace on 30 pods of 8 slots and 24 GiB: every model must fit a pod
    # with room to spare, or "time to all Ready" would measure Insufficient models instead.
    models = placement_scale.catalogue()
    assert len(models) == placement_scale.CATALOGUE_MODELS <= 30 * 8
    largest = max(placement_scale.needs_bytes(model) for model in models)
    assert largest * 8 < 24 * 2**30
    # The pack benchmark's models: some fit only the 80 GiB GPUs, none fits nowhere.
    sizes = [
        placement.needs_bytes(placement.catalogue_model(f"m{i}", g))
        for i, g in enumerate(placement.SIZES_GIB)
    ]
    assert max(sizes) < 80 * 2**30 and max(sizes) > 24 * 2**30 // 2
