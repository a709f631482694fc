"""The guardrail evaluator (pure): windows, baselines, step-back moves."""

from __future__ import annotations

import pytest

from ee.router import decision as d
from ee.router.guardrails import (
    ConfigError,
    Evaluator,
    StackInterval,
    readings,
    triggers_from_json,
)

CONFIG = d.RolloutConfig.from_json({"classes": {"A": 25, "B": 10, "C": 5, "D": 0}})
HEALTHY = StackInterval(answers=1000, errors_5xx=5, p99_s=0.010)


def test_error_rate_is_relative_to_the_old_stack_and_needs_its_whole_window() -> None:
    ev = Evaluator(triggers_from_json({"error_rate": {"window_s": 300, "threshold": 0.01}}))
    bad = StackInterval(answers=100, errors_5xx=3, p99_s=0.010)  # 3 % vs 0.5 % + 1 %
    ev, fired = ev.observe(0, HEALTHY, bad, CONFIG)
    assert fired is None and ev.since == {"error_rate": 0}
    ev, fired = ev.observe(299, HEALTHY, bad, CONFIG)
    assert fired is None
    ev, fired = ev.observe(300, HEALTHY, bad, CONFIG)
    assert fired is not None and fired.trigger == "error_rate"
    assert fired.moves == {"A": (25.0, 10.0), "B": (10.0, 5.0)}  # D is at 0, C not concerned
    assert fired.value == pytest.approx(0.03) and fired.limit == pytest.approx(0.015)
    assert ev.since == {}  # the new stage gets a fresh window
    stepped = fired.apply(CONFIG)
    assert stepped.percent("A") == 10 and stepped.percent("C") == 5


def test_a_recovery_resets_the_window_and_a_missing_interval_does_not() -> None:
    ev = Evaluator(triggers_from_json({"error_rate": {"window_s": 300}}))
    bad = StackInterval(answers=100, errors_5xx=50)
    ev, _ = ev.observe(0, HEALTHY, bad, CONFIG)
    ev, _ = ev.observe(200, HEALTHY, StackInterval(answers=100, errors_5xx=0), CONFIG)
    assert "error_rate" not in ev.since
    ev, _ = ev.observe(250, HEALTHY, bad, CONFIG)
    ev, _ = ev.observe(400, HEALTHY, StackInterval(), CONFIG)  # no traffic: no verdict
    assert ev.since == {"error_rate": 250}
    ev, fired = ev.observe(550, HEALTHY, bad, CONFIG)
    assert fired is not None


def test_when_both_stacks_fail_alike_nothing_steps_back() -> None:
    ev = Evaluator()
    both = StackInterval(answers=100, errors_5xx=20, p99_s=0.5)
    for t in range(0, 2000, 100):
        ev, fired = ev.observe(t, both, both, CONFIG)
        assert fired is None


def test_agent_triggers_step_class_c_back() -> None:
    ev = Evaluator(triggers_from_json({"registration_success": {"window_s": 0}}))
    new = StackInterval(registrations=100, registrations_admitted=90)
    ev, fired = ev.observe(0, HEALTHY, new, CONFIG)
    assert fired is not None and fired.moves == {"C": (5.0, 2.0)}
    values = readings(HEALTHY, StackInterval(agents=20, agents_stale=5, bad_frames_new=2,
                                             orders_failed_new=0, p99_s=0.05),
                      triggers_from_json(None))
    assert values["stale_agents"].breach and values["bad_frames"].breach
    assert not values["order_failures"].breach and values["latency_p99"].breach


def test_trigger_config_is_checked() -> None:
    for doc in ({"nope": {}}, {"error_rate": {"window": 1}}, {"error_rate": {"threshold": -1}},
                []):
        with pytest.raises(ConfigError):
            triggers_from_json(doc)
