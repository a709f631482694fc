"""The pure restart bookkeeping, tested directly (no Trio)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ee.supervisors import Backoff, Restart, RestartWindow, Strategy, plan_restart, wants_restart

P, TR, TE = Restart.PERMANENT, Restart.TRANSIENT, Restart.TEMPORARY


@pytest.mark.parametrize(
    ("restart", "abnormal", "expected"),
    [(P, False, True), (P, True, True), (TR, False, False), (TR, True, True),
     (TE, False, False), (TE, True, False)],
)
def test_restart_types(restart: Restart, abnormal: bool, expected: bool) -> None:
    assert wants_restart(restart, abnormal) is expected


def test_window_allows_exactly_max_restarts_then_exceeds() -> None:
    window = RestartWindow(max_restarts=3, period=10.0)
    for t in (0.0, 1.0, 2.0):
        window, exceeded = window.record(t)
        assert not exceeded
    _, exceeded = window.record(3.0)
    assert exceeded


def test_window_forgets_restarts_older_than_period() -> None:
    window = RestartWindow(max_restarts=2, period=10.0)
    window, _ = window.record(0.0)
    window, _ = window.record(5.0)
    # t=10 still sees the restart at 0 (inclusive, like OTP): three in the window.
    assert window.record(10.0)[1] is True
    # t=10.5: the one at 0 has fallen out.
    window, exceeded = window.record(10.5)
    assert not exceeded
    assert window.stamps == (5.0, 10.5)


def test_zero_intensity_gives_up_on_first_restart() -> None:
    assert RestartWindow(max_restarts=0, period=1.0).record(0.0)[1] is True


CHILDREN = [("a", P), ("b", TE), ("c", TR), ("d", P)]


def test_plan_one_for_one() -> None:
    plan = plan_restart(Strategy.ONE_FOR_ONE, CHILDREN, "c")
    assert (plan.stop, plan.start, plan.remove) == ((), ("c",), ())


def test_plan_one_for_all_stops_in_reverse_and_drops_temporaries() -> None:
    plan = plan_restart(Strategy.ONE_FOR_ALL, CHILDREN, "c")
    assert plan.stop == ("d", "b", "a")
    assert plan.start == ("a", "c", "d")
    assert plan.remove == ("b",)


def test_plan_rest_for_one() -> None:
    plan = plan_restart(Strategy.REST_FOR_ONE, CHILDREN, "b")
    assert plan.stop == ("d", "c")
    assert plan.start == ("b", "c", "d")  # the failed child itself is restarted
    assert plan.remove == ()
    with pytest.raises(ValueError):
        plan_restart(Strategy.REST_FOR_ONE, CHILDREN, "zz")


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(base=0.1, factor=2.0, maximum=1.0, jitter=0.0, reset_after=10.0)
    assert [b.delay(n, 0.5) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.next_attempt(4, ran_for=0.5) == 5
    assert b.next_attempt(4, ran_for=10.0) == 1
    with pytest.raises(ValueError):
        b.delay(0, 0.5)


@given(attempt=st.integers(1, 10_000), u=st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_jitter_stays_within_bounds(attempt: int, u: float) -> None:
    b = Backoff(base=0.05, factor=2.0, maximum=5.0, jitter=0.2)
    raw = min(5.0, 0.05 * 2.0 ** min(attempt - 1, 64))
    assert raw * 0.8 - 1e-12 <= b.delay(attempt, u) <= raw * 1.2 + 1e-12
