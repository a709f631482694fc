"""Prometheus metrics of one CP process (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class CpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.registrations = Counter(
            "ee_registrations_total", "Agent registrations by outcome and datacenter/code",
            ["outcome", "detail"], registry=r)
        self.attestation_seconds = Histogram(
            "ee_attestation_seconds", "Registration quote verification latency",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.sessions = Gauge("ee_agent_sessions", "Open agent websocket sessions", registry=r)
        self.agents = Gauge("ee_agents", "Agents by status", ["status"], registry=r)
        self.heartbeat_gap = Histogram(
            "ee_heartbeat_gap_seconds", "Time between consecutive heartbeats of an agent "
            "(the heartbeat age each one ends)",
            buckets=(1, 2, 5, 10, 15, 20, 30, 60, 120), registry=r)
        self.heartbeat_handling = Histogram(
            "ee_heartbeat_handling_seconds",
            "From reading a heartbeat frame to its AgentActor having handled it",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r)
        self.heartbeats = Counter("ee_heartbeats_total", "Heartbeats received", registry=r)
        self.bad_frames = Counter("ee_bad_frames_total", "Refused agent frames", ["reason"],
                                  registry=r)
        self.plane_faults = Counter(
            "ee_agent_plane_faults_total",
            "Unexpected exceptions while serving one agent connection, by stage (verify: "
            "the quote verifier raised; session: the connection handler; transport: the "
            "websocket layer). Each closed or refused only that connection; each is logged "
            "with its traceback.", ["stage"], registry=r)
        self.claim_to_registered = Histogram(
            "ee_launch_order_claim_to_registered_seconds",
            "From a provisioner claiming a launch order to its VM's agent registering",
            buckets=(5, 15, 30, 60, 120, 300, 600, 1800), registry=r)
        self.pool_gauge = Gauge("ee_pool", "Capacity pool numbers",
                                ["datacenter", "node_size", "what"], registry=r)
        self.orders_gauge = Gauge("ee_launch_orders", "Launch orders by state",
                                  ["datacenter", "node_size", "state"], registry=r)
        self.restarts = Gauge("ee_actor_restarts", "Restarts by actor kind", ["kind"],
                              registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
