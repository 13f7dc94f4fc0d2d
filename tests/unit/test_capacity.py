"""What a runner can hold (reconcile.capacity): slots from the node's CPUs, GPU memory from GPU
feature discovery's label, model sizes as model-runner prints them."""

from __future__ import annotations

import pytest

from dmr_operator.reconcile import capacity


def node(cpu: str, gpu_memory_mib: str | None = None) -> dict[str, object]:
    labels = {capacity.GPU_MEMORY_LABEL: gpu_memory_mib} if gpu_memory_mib else {}
    return {"metadata": {"labels": labels}, "status": {"capacity": {"cpu": cpu}}}


@pytest.mark.parametrize(
    ("label", "size"),
    [
        ("235.16MiB", int(235.16 * 2**20)),  # the real server's spelling
        ("4.68 GiB", int(4.68 * 2**30)),  # the emulator's
        ("512 B", 512),
        ("", None),
        (None, None),
        ("lots", None),
    ],
)
def test_sizes(label: str | None, size: int | None) -> None:
    assert capacity.size_in_bytes(label) == size


def test_slots_are_min_of_cpus_and_eight_and_gpu_memory_is_per_requested_gpu() -> None:
    assert capacity.capacity_of(node("2"), pod_gpus=0) == capacity.RunnerCapacity(2, None)
    assert capacity.capacity_of(node("64", "81920"), pod_gpus=2) == capacity.RunnerCapacity(
        8, 2 * 81920 * 2**20
    )
    assert capacity.capacity_of(node("7500m", "81920"), pod_gpus=0) == capacity.RunnerCapacity(
        7, None
    )
    assert capacity.capacity_of({"status": {}}, pod_gpus=1) is None


def test_over_capacity_names_the_numbers_and_is_none_when_it_fits() -> None:
    room = capacity.RunnerCapacity(slots=2, gpu_memory=10 * 2**30)
    assert capacity.over_capacity(room, runner="r", model_sizes=[2**30, None]) is None
    too_many = capacity.over_capacity(room, runner="r", model_sizes=[1, 1, 1])
    assert too_many is not None and "3 models are assigned to runner r" in too_many
    too_big = capacity.over_capacity(room, runner="r", model_sizes=[6 * 2**30, 5 * 2**30])
    assert too_big == (
        "the weights of its models alone need 11.00 GiB (KV caches come on top), "
        "its GPUs have 10.00 GiB"
    )
