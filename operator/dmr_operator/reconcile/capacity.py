"""What one runner pod can hold, and whether the models assigned to it fit. Pure.

model-runner has ``min(NumCPU, 8)`` runner slots per process and no GPU-memory admission
(real-peers.md M6): past either it evicts idle models (even ``keepAlive: "-1"``) or makes
requests wait, silently. The operator says so first, on every DMRModel of an over-full runner.
Inputs: the runner's node (CPU capacity; GPU memory per GPU from GPU feature discovery's
``nvidia.com/gpu.memory`` label, in MiB) and the GPUs its pod asks for; the models' sizes as the
runner's store reports them (``config.size``: weights only, so the GPU check is a lower bound:
the KV cache comes on top).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

MAX_SLOTS: Final = 8
GPU_MEMORY_LABEL: Final = "nvidia.com/gpu.memory"  # MiB per GPU
_SIZE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)\s*$")
_UNITS: Final = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


@dataclass(frozen=True)
class RunnerCapacity:
    slots: int
    gpu_memory: int | None  # bytes on the pod's GPUs, None when unknown or no GPU


def capacity_of(node: Mapping[str, Any], *, pod_gpus: int) -> RunnerCapacity | None:
    """The capacity of a runner on ``node`` (a Node object) whose pod asks ``pod_gpus``."""
    cpu = _cpu_count(((node.get("status") or {}).get("capacity") or {}).get("cpu"))
    if cpu is None:
        return None
    labels = (node.get("metadata") or {}).get("labels") or {}
    per_gpu = labels.get(GPU_MEMORY_LABEL)
    gpu_memory = None
    if pod_gpus > 0 and isinstance(per_gpu, str) and per_gpu.isdigit():
        gpu_memory = pod_gpus * int(per_gpu) * 2**20
    return RunnerCapacity(slots=min(cpu, MAX_SLOTS), gpu_memory=gpu_memory)


def size_in_bytes(label: str | None) -> int | None:
    """``config.size`` as model-runner prints it (``235.16MiB``, ``4.68 GiB``) in bytes."""
    matched = _SIZE.match(label or "")
    if matched is None:
        return None
    return int(float(matched.group(1)) * _UNITS[matched.group(2)])


def over_capacity(
    capacity: RunnerCapacity, *, runner: str, model_sizes: Sequence[int | None]
) -> str | None:
    """Why the models assigned to ``runner`` do not fit it, with the numbers, or None."""
    problems = []
    if len(model_sizes) > capacity.slots:
        problems.append(
            f"{len(model_sizes)} models are assigned to runner {runner}, which has "
            f"{capacity.slots} runner slots (min(cores, {MAX_SLOTS})): beyond that model-runner "
            "evicts every idle model at once (even keepAlive -1) to load another, or makes "
            "requests wait"
        )
    known = [size for size in model_sizes if size is not None]
    if capacity.gpu_memory is not None and sum(known) > capacity.gpu_memory:
        problems.append(
            f"the weights of its models alone need {_gib(sum(known))} "
            f"(KV caches come on top), its GPUs have {_gib(capacity.gpu_memory)}"
        )
    return "; ".join(problems) or None


def _cpu_count(quantity: Any) -> int | None:
    """Whole CPUs of a capacity quantity (``8``, ``7500m``): what Go's NumCPU would see."""
    text = str(quantity or "")
    if text.endswith("m") and text[:-1].isdigit():
        return max(1, int(text[:-1]) // 1000)
    return int(text) if text.isdigit() else None


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
