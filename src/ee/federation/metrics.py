"""Per-datacenter federation metrics, registered on the CP's own Prometheus registry.

The names are a contract (rollout guardrails read them): ``ee_federation_sync_lag_seconds``
and ``ee_federation_spool_depth`` (gauges), ``ee_federation_replays_total`` and
``ee_federation_sequence_errors_total`` (counters), each labelled ``datacenter``. At the
master they describe each dc link as the master sees it; at a dc, its own outbox.

What each dc CP measures itself (its CpMetrics), the master exports too, labelled with
the dc's ``datacenter``: every ``stats_interval_s`` (and at each (re)connection), when
its figures changed, a dc spools a ``stats`` event with its cumulative figures
(``dc_stats``; registrations folded to ``MAX_STATS_LABELS`` label pairs), the master
checks it strictly (``wire.check_stats``), the dc's actor keeps the latest, and
``DcStatsCollector`` renders them at scrape time:

- ``ee_dc_registrations_total{datacenter,outcome,detail}`` (counter)
- ``ee_dc_attestation_seconds_bucket{datacenter,le}`` / ``_sum`` / ``_count``
- ``ee_dc_deployments_total{datacenter,outcome}`` (counter)
- ``ee_dc_deploy_queue_seconds_bucket{datacenter,le}`` / ``_sum`` / ``_count``
- ``ee_dc_agents{datacenter,status}`` (gauge)

The label always comes from the link the event arrived on, never from its body. A dc
restart resets its counters; they are exported as they are (``rate()`` copes). A dc no
longer enrolled has no series: the collector reads only enrolled dcs' latest stats, so
no label set outlives its dc. A master's direct agents keep the unlabelled metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ee.cp.metrics import ATTESTATION_LE, DEPLOY_QUEUE_LE
from ee.federation.wire import (
    DEPLOYMENT_OUTCOMES,
    MAX_STATS_LABELS,
    REGISTRATION_OUTCOMES,
    STATS_DETAIL,
    Histo,
    Stats,
)


class FederationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sync_lag = Gauge("ee_federation_sync_lag_seconds",
                              "Age of the newest dc state the master has applied, or time "
                              "since the dc was last heard while it is behind",
                              ["datacenter"], registry=registry)
        self.spool_depth = Gauge("ee_federation_spool_depth",
                                 "Events a dc CP holds that the master has not acknowledged",
                                 ["datacenter"], registry=registry)
        self.replays = Counter("ee_federation_replays_total",
                               "Replays from a sequence (asked by the master)",
                               ["datacenter"], registry=registry)
        self.sequence_errors = Counter("ee_federation_sequence_errors_total",
                                       "Sequences refused: replayed or out of order (gap)",
                                       ["datacenter"], registry=registry)


# ---- the dc side: its own figures, as a ``stats`` event's data ------------------------

_DETAIL_OK = re.compile(STATS_DETAIL)
OTHER = "other"


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``1.0``, ``0.0025``)."""
    return repr(float(bound))


def fold_registrations(counts: Mapping[tuple[str, str], int],
                       cap: int = MAX_STATS_LABELS) -> list[dict[str, Any]]:
    """At most *cap* (outcome, detail) pairs: the largest kept, the rest (and any detail
    not fit for a label) summed into (outcome, ``other``)."""
    clean: dict[tuple[str, str], int] = {}
    for (outcome, detail), n in counts.items():
        if outcome not in REGISTRATION_OUTCOMES:
            continue
        key = (outcome, detail if _DETAIL_OK.fullmatch(detail) else OTHER)
        clean[key] = clean.get(key, 0) + n
    ranked = sorted(clean.items(), key=lambda kv: (-kv[1], kv[0]))
    outcomes = {o for (o, _), _n in ranked}
    keep = dict(ranked[:max(0, cap - len(outcomes))]) if len(ranked) > cap else dict(ranked)
    for (outcome, detail), n in ranked:
        if (outcome, detail) not in keep:
            keep[(outcome, OTHER)] = keep.get((outcome, OTHER), 0) + n
    return [{"outcome": o, "detail": d, "count": n} for (o, d), n in sorted(keep.items())]


def _histo(samples: Iterable[Any], name: str, bounds: tuple[float, ...]) -> dict[str, Any]:
    by_le: dict[str, int] = {}
    total, count = 0.0, 0
    for s in samples:
        if s.name == f"{name}_bucket":
            by_le[s.labels["le"]] = int(s.value)
        elif s.name == f"{name}_sum":
            total = max(0.0, float(s.value))
        elif s.name == f"{name}_count":
            count = int(s.value)
    buckets = [by_le.get(_le(b), 0) for b in bounds] + [by_le.get("+Inf", count)]
    return {"le": list(bounds), "buckets": buckets, "sum": total, "count": buckets[-1]}


def dc_stats(families: Iterable[Metric], agents: Mapping[str, int]) -> dict[str, Any]:
    """A ``stats`` event's data from a dc CP's registry (``registry.collect()``) and its
    agents by status (the directory's counts: ``ee_agents`` is set only at scrape)."""
    by_name = {f.name: f for f in families}
    regs: dict[tuple[str, str], int] = {}
    deployments: dict[str, int] = {}
    if "ee_registrations" in by_name:
        for s in by_name["ee_registrations"].samples:
            if s.name == "ee_registrations_total":
                key = (s.labels.get("outcome", ""), s.labels.get("detail", ""))
                regs[key] = regs.get(key, 0) + int(s.value)
    if "ee_deployments" in by_name:
        for s in by_name["ee_deployments"].samples:
            if s.name == "ee_deployments_total":
                deployments[s.labels.get("outcome", "")] = int(s.value)
    att = by_name.get("ee_attestation_seconds")
    queue = by_name.get("ee_deploy_queue_seconds")
    return {"registrations": fold_registrations(regs),
            "attestation": _histo(att.samples if att else (), "ee_attestation_seconds",
                                  ATTESTATION_LE),
            "deployments": {k: v for k, v in deployments.items()
                            if k in DEPLOYMENT_OUTCOMES},
            "deploy_queue": _histo(queue.samples if queue else (), "ee_deploy_queue_seconds",
                                   DEPLOY_QUEUE_LE),
            "agents": dict(agents)}


# ---- the master side: every enrolled dc's latest stats, at scrape time --------------


def _add_histo(family: HistogramMetricFamily, label: str, h: Histo) -> None:
    buckets = [(_le(le), float(n)) for le, n in zip(h.le, h.buckets, strict=False)]
    family.add_metric([label], [*buckets, ("+Inf", float(h.buckets[-1]))], h.sum)


class DcStatsCollector(Collector):
    """The ``ee_dc_*`` families from *source* (datacenter -> its latest ``Stats``)."""

    def __init__(self, source: Callable[[], Mapping[str, Stats]]) -> None:
        self.source = source

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily,
                                 CounterMetricFamily, HistogramMetricFamily,
                                 GaugeMetricFamily]:
        return (
            CounterMetricFamily("ee_dc_registrations", "Agent registrations at a dc CP by "
                                "outcome and datacenter/code",
                                labels=["datacenter", "outcome", "detail"]),
            HistogramMetricFamily("ee_dc_attestation_seconds", "A dc CP's registration "
                                  "quote verification latency", labels=["datacenter"]),
            CounterMetricFamily("ee_dc_deployments", "Deployments at a dc CP by first "
                                "outcome", labels=["datacenter", "outcome"]),
            HistogramMetricFamily("ee_dc_deploy_queue_seconds", "At a dc CP, from a "
                                  "deployment's creation to its running",
                                  labels=["datacenter"]),
            GaugeMetricFamily("ee_dc_agents", "A dc CP's agents by status",
                              labels=["datacenter", "status"]))

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        regs, att, deps, queue, agents = self._families()
        for label, st in sorted(self.source().items()):
            for r in st.registrations:
                regs.add_metric([label, r.outcome, r.detail], float(r.count))
            _add_histo(att, label, st.attestation)
            for outcome, n in sorted(st.deployments.items()):
                deps.add_metric([label, outcome], float(n))
            _add_histo(queue, label, st.deploy_queue)
            for status, n in sorted(st.agents.items()):
                agents.add_metric([label, status], float(n))
        yield from (regs, att, deps, queue, agents)
