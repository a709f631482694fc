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

Where the answers and latencies come from: ``ee-router`` counts what it relayed itself
(``Seen``); where the router is the Cloudflare Worker, which keeps no counters, the
guard (``eectl rollout guard``) takes them from each stack's own HTTP metrics
(``ee_http_responses_total{code}``, ``ee_http_request_seconds``). Either way a scrape of
``/metrics`` that fails counts as one answered 5xx of that stack: a new stack too broken
to answer its metrics must breach ``error_rate`` rather than go unobserved.

Triggers (name: value compared, default threshold, default window, classes):

* ``error_rate``: new 5xx share - old 5xx share > 0.01 for 300 s (A B D)
* ``latency_p99``: new p99 / old p99 > 2.0 for 600 s (A B D); p99 of fewer than
  ``MIN_LATENCY_SAMPLES`` answers is no verdict
* ``registration_success``: admitted / all registrations on new < 0.99 for 300 s (C)
* ``stale_agents``: stale / all agents on new > 0.05 for 300 s (C)
* ``order_failures``: launch orders newly failed on new
  (``ee_launch_order_failures_total``) > 0 for 300 s (B)
* ``bad_frames``: refused agent frames on new > 0 for 300 s (C)
* ``deploy_success``: healthy / (healthy + failed) deployments on new < 0.95 (the
  SLO) for 600 s (B)
* ``federation_lag``: the largest federation sync lag of new (seconds, any
  datacenter) > 60 for 300 s (E)
* ``sequence_errors``: federation sequence errors newly counted on new > 0 for 300 s (E)
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
    "bad_frames": Trigger(300, 0.0, ("C",)),
    "deploy_success": Trigger(600, 0.95, ("B",)),
    "federation_lag": Trigger(300, 60.0, ("E",)),
    "sequence_errors": Trigger(300, 0.0, ("E",)),
}
_LOWER_IS_BAD: Final = frozenset({"registration_success", "deploy_success"})
MIN_LATENCY_SAMPLES: Final = 20
"""A p99 of fewer answers is one slow request, not a trend: no latency verdict."""


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
    deploys: int | None = None  # deployments that reached an outcome
    deploys_healthy: int | None = None
    federation_lag_s: float | None = None  # the largest, over datacenters
    sequence_errors_new: int | None = None


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
        put("bad_frames", float(new.bad_frames_new), t["bad_frames"].threshold)
    if new.deploys and new.deploys_healthy is not None:
        put("deploy_success", new.deploys_healthy / new.deploys,
            t["deploy_success"].threshold)
    if new.federation_lag_s is not None:
        put("federation_lag", new.federation_lag_s, t["federation_lag"].threshold)
    if new.sequence_errors_new is not None:
        put("sequence_errors", float(new.sequence_errors_new), t["sequence_errors"].threshold)
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

    def apply(self, config: RolloutConfig, now: float | None = None) -> RolloutConfig:
        """*config* with each moved class at its target, never above where it is now
        (the operator may have lowered it meanwhile); *now* (unix time) restarts the
        moved classes' soak clocks (``changed_at``)."""
        points = dict(config.points)
        changed = dict(config.extra.get("changed_at") or {})
        for c, (_, to) in self.moves.items():
            points[c] = min(points.get(c, 0), round(to * 100))
            if now is not None:
                changed[c] = now
        extra = {**config.extra, "changed_at": changed} if now is not None else config.extra
        return attrs.evolve(config, points=points, extra=extra)


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
    if len(samples) < MIN_LATENCY_SAMPLES:
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


Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


def histogram_quantile(q: float, now: Samples, before: Samples | None, name: str
                       ) -> tuple[float | None, int]:
    """The *q* quantile of histogram *name* over the interval (bucket deltas), linearly
    interpolated inside its bucket as Prometheus does, and the interval's count."""
    def buckets(samples: Samples | None) -> dict[float, float]:
        out: dict[float, float] = {}
        for (n, labels), v in (samples or {}).items():
            if n == f"{name}_bucket":
                le = dict(labels).get("le")
                if le is not None:
                    bound = float(le)
                    out[bound] = out.get(bound, 0.0) + v
        return out

    after, prior = buckets(now), buckets(before)
    bounds = sorted(after)
    cumulative = [max(0.0, after[b] - prior.get(b, 0.0)) for b in bounds]
    count = int(cumulative[-1]) if cumulative else 0
    if count < MIN_LATENCY_SAMPLES:
        return None, count
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for bound, c in zip(bounds, cumulative, strict=True):
        if c >= rank:
            if bound == float("inf"):
                return lower_bound, count  # past the last finite bucket: its bound
            width = c - lower_count
            share = (rank - lower_count) / width if width else 1.0
            return lower_bound + (bound - lower_bound) * share, count
        lower_bound, lower_count = bound, c
    return lower_bound, count


@attrs.frozen
class Seen:
    """What a router relayed to one stack over the interval (None: it relays nothing
    it can count, as the Worker)."""

    answers: int = 0
    errors_5xx: int = 0
    latencies: tuple[float, ...] = ()


def stack_interval(seen: Seen | None, now: Samples | None, before: Samples | None,
                   failed_scrapes: int = 0) -> StackInterval:
    """One stack's ``StackInterval`` from the router's own counts (*seen*) or, without
    them, its HTTP metrics; and from its ``/metrics`` now and at the last scrape."""
    kw: dict[str, Any] = {}
    if seen is not None:
        kw.update(answers=seen.answers, errors_5xx=seen.errors_5xx,
                  p99_s=p99(list(seen.latencies)))
    if now is not None:
        kw["agents"] = int(total(now, "ee_agents"))
        kw["agents_stale"] = int(total(now, "ee_agents", status="stale"))
        lags = [v for (n, _), v in now.items() if n == "ee_federation_sync_lag_seconds"]
        if lags:
            kw["federation_lag_s"] = max(lags)
    if now is not None and before is not None:
        def delta(name: str, **labels: str) -> int:
            assert now is not None and before is not None
            return max(0, int(total(now, name, **labels) - total(before, name, **labels)))

        kw["registrations"] = delta("ee_registrations_total")
        kw["registrations_admitted"] = delta("ee_registrations_total", outcome="admitted")
        kw["orders_failed_new"] = delta("ee_launch_order_failures_total")
        kw["bad_frames_new"] = delta("ee_bad_frames_total")
        kw["deploys"] = delta("ee_deployments_total")
        kw["deploys_healthy"] = delta("ee_deployments_total", outcome="healthy")
        if any(n == "ee_federation_sequence_errors_total" for n, _ in now):
            kw["sequence_errors_new"] = delta("ee_federation_sequence_errors_total")
        if seen is None:
            kw["answers"] = delta("ee_http_responses_total")
            kw["errors_5xx"] = delta("ee_http_responses_total", code="5xx")
            kw["p99_s"] = histogram_quantile(0.99, now, before, "ee_http_request_seconds")[0]
    if failed_scrapes:
        kw["answers"] = kw.get("answers", 0) + failed_scrapes
        kw["errors_5xx"] = kw.get("errors_5xx", 0) + failed_scrapes
    return StackInterval(**kw)
