"""The benchmark table: rows, rendering as Markdown, and writing it into BENCHMARKS.md.

``bench/run.py`` produces ``Row``s; ``render`` adds the machine facts and date so a table always
says where and when it was measured; ``write_into`` replaces only the text between the
``bench:results`` markers, leaving the hand-written method and fault matrix alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


@dataclasses.dataclass(frozen=True)
class Row:
    metric: str
    value: str
    goal: str
    ok: bool | None = None


def machine_facts() -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if found:
            model = found.group(1).strip()
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        found = re.search(r"^MemTotal:\s*(\d+)", meminfo.read_text(), re.MULTILINE)
        if found:
            memory = f", {int(found.group(1)) / 2**20:.1f} GiB RAM"
    return (
        f"{model}, {os.cpu_count()} cores{memory}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def cluster_facts(apiserver_version: str, etcd: Path) -> str:
    """The Kubernetes release as the apiserver reports it (``/version``) and etcd's version."""
    completed = subprocess.run(
        [str(etcd), "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    found = re.search(r"etcd Version:\s*(\S+)", completed.stdout)
    return f"Kubernetes {apiserver_version}, etcd {found.group(1) if found else 'unknown'}"


def render(rows: list[Row], *, args: argparse.Namespace, cluster: str) -> str:
    mode = "--quick" if args.quick else "full"
    lines = [
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} ({mode}: "
        f"{args.latency_models} latency objects, {args.scale_models} scale objects, "
        f"{args.agents} agents, "
        f"{args.recovery_models} recovery objects, {args.idle_minutes:g} idle min, "
        f"--verify-interval {args.verify_interval:g} s) on {cluster}; {machine_facts()}.",
        "",
        "| Measurement | Result | Goal | Met |",
        "|---|---|---|---|",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row.ok]
        lines.append(f"| {row.metric} | {row.value} | {row.goal} | {met} |")
    return "\n".join(lines) + "\n"


def write_into(path: Path, table: str) -> None:
    """Replace the text between the markers (appending them if the file has none)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
