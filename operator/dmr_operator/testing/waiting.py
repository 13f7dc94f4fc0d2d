"""Polling with a deadline: the one way tests and benchmarks wait for the cluster to converge.

Used by tests/integration (fixtures and tests), the node simulator's callers and benchmarks; it has
no neighbours of its own. ``wait_for`` is for threads, ``wait_for_async`` for coroutines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time (an AssertionError, so pytest reports it plainly)."""


def _timeout_error(
    *, message: str, timeout: float, last_value: object, last_error: BaseException | None
) -> WaitTimeout:
    detail = (
        f"last error: {last_error!r}" if last_error is not None else f"last value: {last_value!r}"
    )
    return WaitTimeout(f"timed out after {timeout:g}s waiting for {message} ({detail})")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Exceptions listed in ``ignore`` count as "not yet" (e.g. a 404 before an object exists).
    """
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as error:
            last_error = error
        else:
            if value:
                return value
            last_value, last_error = value, None
        if time.monotonic() >= deadline:
            raise _timeout_error(
                message=message, timeout=timeout, last_value=last_value, last_error=last_error
            )
        time.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - the same signature as wait_for
    interval: float = 0.1,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Like :func:`wait_for` for coroutines; ``predicate`` may be sync or async."""
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        try:
            outcome = predicate()
            value: T = await outcome if isinstance(outcome, Awaitable) else outcome
        except ignore as error:
            last_error = error
        else:
            if value:
                return value
            last_value, last_error = value, None
        if time.monotonic() >= deadline:
            raise _timeout_error(
                message=message, timeout=timeout, last_value=last_value, last_error=last_error
            )
        await asyncio.sleep(interval)
