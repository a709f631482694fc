"""Per-datacenter federation metrics, registered on the CP's own Prometheus registry.

The names are a contract (rollout guardrails read them): ``ee_federation_sync_lag_seconds``
and ``ee_federation_spool_depth`` (gauges), ``ee_federation_replays_total`` and
``ee_federation_sequence_errors_total`` (counters), each labelled ``datacenter``. At the
master they describe each dc link as the master sees it; at a dc, its own outbox.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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
