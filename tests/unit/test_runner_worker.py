"""One runner worker (``controllers.runner_worker``) against an in-process model-runner emulator,
passes driven by hand on a clock the test moves: how a runner that stops answering is reported.

The same faults on a real apiserver, with the worker's own timing, are in
tests/integration/test_faults.py; here the count of missed attempts, which timing there blurs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from dmr_operator.controllers import dmrmodels, runner_worker
from dmr_operator.reconcile import dmrmodel
from dmr_operator.testing import cluster
from dmr_operator.testing.emulator import ModelRunnerEmulator

CONFIGURE = "/engines/llama.cpp/_configure"
SETTINGS = dmrmodels.ControllerSettings(verify_interval=60.0, unreachable_tolerance=3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class EventsOnly:
    """The Kubernetes client as far as a runner worker uses it here: Events, recorded."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def post_event(self, *, reason: str, **_: Any) -> None:
        self.reasons.append(reason)


@pytest.fixture
async def one_runner(
    emulator: ModelRunnerEmulator, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., OneRunner]]:
    """``one_runner(clock=None)``: the controller, on the test's clock unless one is given."""
    async with httpx.AsyncClient() as http:
        yield lambda clock=None: OneRunner(emulator, monkeypatch, http, clock)


def runner_pod(port: int) -> dict[str, Any]:
    container = {"name": "model-runner", "ports": [{"name": "dmr", "containerPort": port}]}
    return {
        "metadata": {
            "name": "r0",
            "namespace": "ns",
            "uid": "uid-r0",
            "labels": {"dmr.dev/pool": "default"},
        },
        "spec": {"nodeName": "n1", "containers": [container]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "containerStatuses": [{"name": "model-runner", "ready": True, "restartCount": 0}],
        },
    }


class OneRunner:
    """A controller with one runner pod (the emulator) and one DMRModel on it."""

    def __init__(
        self,
        emulator: ModelRunnerEmulator,
        monkeypatch: pytest.MonkeyPatch,
        http: httpx.AsyncClient,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.clock = Clock()
        self.controller = dmrmodels.DMRModelController(
            http=http,
            kube=EventsOnly(),  # type: ignore[arg-type]
            settings=SETTINGS,
            clock=clock or self.clock,
        )
        monkeypatch.setattr(self.controller, "_sync_workers", lambda touched: None)

        async def no_node(name: str) -> None:
            return None

        monkeypatch.setattr(self.controller, "node", no_node)
        self.emulator = emulator
        self.controller.pod_changed(runner_pod(int(emulator.url.rsplit(":", 1)[1])))
        body = cluster.dmrmodel("smol", {"model": "ai/smollm2"})  # the default pool
        body["metadata"] |= {"namespace": "ns", "uid": "uid-smol", "generation": 1}
        self.controller.model_changed(body)
        self.controller._reassign()  # inside a loop it waits for the next pass; not here
        runner = self.controller._assigned_runner("ns/r0")
        assert runner is not None, "the pod is the model's runner"
        self.worker = runner_worker.RunnerWorker(self.controller, runner)

    def placement(self) -> dmrmodel.Placement:
        (placement,) = self.controller.placements.values()
        return placement

    async def pass_at_next_deadline(self) -> dmrmodel.Placement:
        self.clock.now = max(self.clock.now, self.worker._next_deadline())
        await self.worker.sync()
        return self.placement()


async def test_a_serving_copy_is_reported_unreachable_only_after_three_attempts_in_a_row(
    emulator: ModelRunnerEmulator, one_runner: Callable[..., OneRunner]
) -> None:
    runner = one_runner()
    assert (await runner.pass_at_next_deadline()).state == "Configured"
    await emulator.stop_listening()
    # The periodic read-back and its first retry fail: the copy is still configured there.
    for _ in range(SETTINGS.unreachable_tolerance - 1):
        placement = await runner.pass_at_next_deadline()
        assert (placement.state, placement.reason) == ("Configured", dmrmodel.Reason.CONFIGURED)
    placement = await runner.pass_at_next_deadline()
    assert (placement.state, placement.reason) == ("Failed", dmrmodel.Reason.RUNNER_UNREACHABLE)
    await emulator.start_listening()
    assert (await runner.pass_at_next_deadline()).state == "Configured"
    assert len(emulator.calls("POST", CONFIGURE)) == 1


async def test_a_blip_shorter_than_the_tolerance_is_forgotten_once_the_runner_answers(
    emulator: ModelRunnerEmulator, one_runner: Callable[..., OneRunner]
) -> None:
    runner = one_runner()
    await runner.pass_at_next_deadline()
    for _ in range(2):  # two blips, each one attempt short of the tolerance
        await emulator.stop_listening()
        for _ in range(SETTINGS.unreachable_tolerance - 1):
            assert (await runner.pass_at_next_deadline()).state == "Configured"
        await emulator.start_listening()
        assert (await runner.pass_at_next_deadline()).state == "Configured"
        # Answering again starts the count afresh: the next blip is tolerated as long.
        assert runner.worker.state.runner_backoff.attempts == 0


async def test_a_model_not_yet_configured_on_the_runner_is_told_at_the_first_failure(
    emulator: ModelRunnerEmulator, one_runner: Callable[..., OneRunner]
) -> None:
    runner = one_runner()
    await emulator.stop_listening()
    placement = await runner.pass_at_next_deadline()
    assert (placement.state, placement.reason) == ("Failed", dmrmodel.Reason.RUNNER_UNREACHABLE)


async def passes_in(runner: OneRunner, seconds: float) -> int:
    """How many passes the worker's own loop makes in ``seconds`` of real time."""
    passes = 0
    sync = runner.worker.sync

    async def counted() -> None:
        nonlocal passes
        passes += 1
        await sync()

    runner.worker.sync = counted  # type: ignore[method-assign]
    runner.worker.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        runner.worker.stop()
        await runner.worker.join()
    return passes


async def test_a_worker_backing_off_an_unreachable_runner_waits_for_its_retry(
    emulator: ModelRunnerEmulator, one_runner: Callable[..., OneRunner]
) -> None:
    runner = one_runner(time.monotonic)
    await runner.worker.sync()
    await emulator.stop_listening()
    runner.worker.state.next_verify = 0.0  # the read-back is due: it fails, retry in 1 s
    # One pass now, one at the retry a second later (and one more at most); a worker woken at
    # once after every pass would make thousands.
    assert await passes_in(runner, 1.5) <= 3


async def test_a_retry_left_by_a_deleted_model_wakes_its_worker_no_more(
    emulator: ModelRunnerEmulator, one_runner: Callable[..., OneRunner]
) -> None:
    emulator.fail_pull("ai/smollm2")
    runner = one_runner(time.monotonic)
    await runner.worker.sync()
    assert runner.placement().reason == dmrmodel.Reason.PULL_FAILED  # retry in 5 s
    runner.controller.model_gone("ns", "smol")
    runner.worker.state.backoff["ns/smol"].retry_at = time.monotonic()  # the retry is due
    assert await passes_in(runner, 0.5) <= 2


async def test_the_worker_of_a_runner_not_ready_yet_waits_for_its_pod(
    one_runner: Callable[..., OneRunner],
) -> None:
    # A Sidecar Agent's pod has a worker from the start (its readiness gate must be told), and
    # may stay Pending for long: unschedulable, or pulling a large image.
    runner = one_runner(time.monotonic)
    runner.worker.update(dataclasses.replace(runner.worker.runner, ready=False))
    assert await passes_in(runner, 0.5) <= 1
