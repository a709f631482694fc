"""Guardrails: when the new stack misbehaves for long enough, step the rollout back.

Theory of operation. Every ``interval_s`` the router takes one *observation* of each
stack over the interval just ended: what it saw itself (answers and 5xx per stack,
upstream latencies) and counter deltas / gauges scraped from each stack's ``/metrics``
(registrations by outcome, agents by status, failed launch orders, refused agent
frames). ``Evaluator.observe`` is pure: it turns the observation into one value per
trigger, compares it with that trigger's threshold (often relative to the old stack,
the baseline) and keeps, per trigger, the time since when it has been breaching. A
trigger *fires* once it has breached continuously for its window; the evaluator then
answers a ``StepBack``: the classes the trigger concerns, each to the stage below its
percentage, with the numbers that fired it. Firing resets every trigger's breach clock
(the new stage gets a fresh window). An interval without the data a trigger needs
(no traffic, no scrape) neither breaches nor clears it.

Triggers (name: value compared, default threshold, default window, classes):

* ``error_rate``: new 5xx share - old 5xx share > 0.01 for 300 s (A B D)
* ``latency_p99``: new p99 / old p99 > 2.0 for 600 s (A B D)
* ``registration_success``: admitted / all registrations on new < 0.99 for 300 s (C)
* ``stale_agents``: stale / all agents on new > 0.05 for 300 s (C)
* ``order_failures``: launch orders newly failed on new > 0 for 300 s (B)
* ``sequence_errors``: refused agent frames on new > 0 for 300 s (C)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from ee.router.decision import ConfigError, RolloutConfig, previous_stage


@attrs.frozen
class Trigger:
    window_s: float
    threshold: float
    classes: tuple[str, ...]


DEFAULT_TRIGGERS: Final[Mapping[str, Trigger]] = {
    "error_rate": Trigger(300, 0.01, ("A", "B", "D")),
    "latency_p99": Trigger(600, 2.0, ("A", "B", "D")),
    "registration_success": Trigger(300, 0.99, ("C",)),
    "stale_agents": Trigger(300, 0.05, ("C",)),
    "order_failures": Trigger(300, 0.0, ("B",)),
    "sequence_errors": Trigger(300, 0.0, ("C",)),
}
_LOWER_IS_BAD: Final = frozenset({"registration_success"})


def triggers_from_json(doc: Any) -> dict[str, Trigger]:
    """``{"error_rate": {"window_s": 300, "threshold": 0.01}, …}`` over the defaults."""
    out = dict(DEFAULT_TRIGGERS)
    if doc is None:
        return out
    if not isinstance(doc, dict):
        raise ConfigError("guardrails: an object of trigger name -> {window_s, threshold}")
    for name, spec in doc.items():
        if name not in DEFAULT_TRIGGERS:
            raise ConfigError(f"guardrails.{name}: unknown trigger "
                              f"(known: {', '.join(DEFAULT_TRIGGERS)})")
        if not isinstance(spec, dict) or set(spec) - {"window_s", "threshold"}:
            raise ConfigError(f"guardrails.{name}: {{window_s, threshold}}")
        base = DEFAULT_TRIGGERS[name]
        window = spec.get("window_s", base.window_s)
        threshold = spec.get("threshold", base.threshold)
        for field, v in (("window_s", window), ("threshold", threshold)):
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"guardrails.{name}.{field}: a number >= 0")
        out[name] = Trigger(float(window), float(threshold), base.classes)
    return out


@attrs.frozen
class StackInterval:
    """One stack over one interval (None: not known this interval)."""

    answers: int = 0
    errors_5xx: int = 0
    p99_s: float | None = None
    registrations: int | None = None
    registrations_admitted: int | None = None
    agents: int | None = None
    agents_stale: int | None = None
    orders_failed_new: int | None = None
    bad_frames_new: int | None = None


@attrs.frozen
class Reading:
    value: float
    limit: float
    breach: bool


def readings(old: StackInterval, new: StackInterval,
             triggers: Mapping[str, Trigger]) -> dict[str, Reading]:
    """Each trigger's value this interval (triggers without data are left out)."""
    out: dict[str, Reading] = {}

    def put(name: str, value: float, limit: float) -> None:
        breach = value < limit if name in _LOWER_IS_BAD else value > limit
        out[name] = Reading(value, limit, breach)

    t = triggers
    if new.answers and old.answers:
        base = old.errors_5xx / old.answers
        put("error_rate", new.errors_5xx / new.answers, base + t["error_rate"].threshold)
    if new.p99_s is not None and old.p99_s:
        put("latency_p99", new.p99_s / old.p99_s, t["latency_p99"].threshold)
    if new.registrations and new.registrations_admitted is not None:
        put("registration_success", new.registrations_admitted / new.registrations,
            t["registration_success"].threshold)
    if new.agents and new.agents_stale is not None:
        put("stale_agents", new.agents_stale / new.agents, t["stale_agents"].threshold)
    if new.orders_failed_new is not None:
        put("order_failures", float(new.orders_failed_new), t["order_failures"].threshold)
    if new.bad_frames_new is not None:
        put("sequence_errors", float(new.bad_frames_new), t["sequence_errors"].threshold)
    return out


@attrs.frozen
class StepBack:
    trigger: str
    value: float
    limit: float
    window_s: float
    moves: Mapping[str, tuple[float, float]]  # class -> (from pct, to pct)

    def to_dict(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "value": self.value, "limit": self.limit,
                "window_s": self.window_s,
                "classes": {c: {"from": a, "to": b} for c, (a, b) in self.moves.items()}}

    def apply(self, config: RolloutConfig) -> RolloutConfig:
        points = dict(config.points)
        for c, (_, to) in self.moves.items():
            points[c] = round(to * 100)
        return attrs.evolve(config, points=points)


@attrs.frozen
class Evaluator:
    """Breach clocks per trigger (``since``: when its current breach began)."""

    triggers: Mapping[str, Trigger] = DEFAULT_TRIGGERS
    since: Mapping[str, float] = attrs.field(factory=dict)

    def observe(self, now: float, old: StackInterval, new: StackInterval,
                config: RolloutConfig) -> tuple[Evaluator, StepBack | None]:
        since = dict(self.since)
        for name, reading in readings(old, new, self.triggers).items():
            if not reading.breach:
                since.pop(name, None)
                continue
            began = since.setdefault(name, now)
            trigger = self.triggers[name]
            if now - began < trigger.window_s:
                continue
            moves = {c: (config.percent(c), float(previous_stage(config.percent(c))))
                     for c in trigger.classes if config.percent(c) > 0}
            if not moves or config.kill_switch:
                continue  # nothing on the new stack to take back
            fired = StepBack(name, reading.value, reading.limit, trigger.window_s, moves)
            return attrs.evolve(self, since={}), fired
        return attrs.evolve(self, since=since), None


def p99(samples: list[float]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(name, labels): value}`` of a Prometheus text exposition (samples only)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def total(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
