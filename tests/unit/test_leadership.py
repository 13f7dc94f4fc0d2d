"""Leader-election rules (reconcile/leadership.py): expiry by observation, what a claim writes.

The election against a real kube-apiserver (two and three replicas, release, SIGKILL, a leader
that loses its lease) is in tests/integration/test_faults.py.
"""

from __future__ import annotations

import datetime

import pytest

from dmr_operator.reconcile import leadership

NOW = datetime.datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=datetime.UTC)


def view(holder: str, renew: str = "t1", transitions: int = 3) -> leadership.LeaseView:
    return leadership.LeaseView(
        holder=holder,
        duration_seconds=15,
        renew_time=renew,
        transitions=transitions,
        resource_version="7",
    )


def test_lease_view_reads_a_lease_object_and_tolerates_an_empty_spec() -> None:
    lease = {
        "metadata": {"resourceVersion": "42"},
        "spec": {
            "holderIdentity": "a",
            "leaseDurationSeconds": 15,
            "renewTime": "2026-11-22T12:00:00.000000Z",
            "leaseTransitions": 2,
        },
    }
    assert leadership.LeaseView.of(lease) == leadership.LeaseView(
        holder="a",
        duration_seconds=15,
        renew_time="2026-11-22T12:00:00.000000Z",
        transitions=2,
        resource_version="42",
    )
    empty = leadership.LeaseView.of({"metadata": {}})
    assert (empty.holder, empty.duration_seconds, empty.transitions) == ("", 0, 0)


def test_a_renewing_holder_keeps_the_lease_a_silent_one_loses_it_after_a_duration() -> None:
    seen = leadership.Observation(lease=view("a", "t1"), changed_at=100.0)
    assert not seen.free_for("b", now=114.9)
    # Renewed at 110 (this process saw renewTime change): the clock restarts from there.
    renewed = seen.after(view("a", "t2"), now=110.0)
    assert renewed.changed_at == 110.0
    assert not renewed.free_for("b", now=124.9)
    assert renewed.free_for("b", now=125.0)
    # Reading the same record again does not restart the clock.
    assert renewed.after(view("a", "t2"), now=120.0).changed_at == 110.0


def test_expiry_ignores_the_writers_clock() -> None:
    # A renewTime far in the past (a skewed node) does not free a lease this process just saw.
    seen = leadership.Observation(lease=view("a", "1999-01-01T00:00:00.000000Z"), changed_at=50.0)
    assert not seen.free_for("b", now=51.0)


def test_a_released_lease_or_our_own_is_free_at_once() -> None:
    assert leadership.Observation(lease=view(""), changed_at=100.0).free_for("b", now=100.0)
    assert leadership.Observation(lease=view("b"), changed_at=100.0).free_for("b", now=100.0)


def test_claiming_a_new_lease_a_taken_over_one_and_renewing() -> None:
    timings = leadership.LeaseTimings()
    created = leadership.claim(None, identity="b", timings=timings, now=NOW)
    assert created == {
        "holderIdentity": "b",
        "leaseDurationSeconds": 15,
        "renewTime": "2026-11-22T12:00:00.123456Z",
        "acquireTime": "2026-11-22T12:00:00.123456Z",
        "leaseTransitions": 0,
    }
    taken = leadership.claim(view("a", transitions=3), identity="b", timings=timings, now=NOW)
    assert taken["acquireTime"] == taken["renewTime"] and taken["leaseTransitions"] == 4
    renewed = leadership.claim(view("b"), identity="b", timings=timings, now=NOW)
    assert renewed == {
        "holderIdentity": "b",
        "leaseDurationSeconds": 15,
        "renewTime": "2026-11-22T12:00:00.123456Z",
    }


def test_release_frees_the_lease_for_any_reader() -> None:
    assert leadership.released() == {"holderIdentity": None, "leaseDurationSeconds": 1}


def test_timings_scale_like_client_go_and_refuse_nonsense() -> None:
    assert leadership.LeaseTimings.for_duration(15) == leadership.LeaseTimings(15, 10, 2)
    assert leadership.LeaseTimings.for_duration(6).problems() == []
    assert leadership.LeaseTimings.for_duration(0.5).problems()
    assert leadership.LeaseTimings(duration=10, renew_deadline=12, retry_period=1).problems()


@pytest.mark.parametrize("zone", [datetime.UTC, datetime.timezone(datetime.timedelta(hours=5))])
def test_micro_time_is_utc(zone: datetime.tzinfo) -> None:
    assert leadership.micro_time(NOW.astimezone(zone)) == "2026-11-22T12:00:00.123456Z"
