"""Prometheus metrics of one CP process (its own registry, so tests can run several)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Histogram bounds that dc CPs send their master (ee.federation.wire checks them).
ATTESTATION_LE: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DEPLOY_QUEUE_LE: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class CpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.registrations = Counter(
            "ee_registrations_total", "Agent registrations by outcome and datacenter/code",
            ["outcome", "detail"], registry=r)
        self.attestation_seconds = Histogram(
            "ee_attestation_seconds", "Registration quote verification latency",
            buckets=ATTESTATION_LE, registry=r)
        self.sessions = Gauge("ee_agent_sessions", "Open agent websocket sessions", registry=r)
        self.agents = Gauge("ee_agents", "Agents by status", ["status"], registry=r)
        self.heartbeat_gap = Histogram(
            "ee_heartbeat_gap_seconds", "Time between consecutive heartbeats of an agent "
            "(the heartbeat age each one ends)",
            buckets=(1, 2, 5, 10, 15, 20, 30, 60, 120), registry=r)
        self.heartbeat_handling = Histogram(
            "ee_heartbeat_handling_seconds",
            "From reading a heartbeat frame to its AgentActor having handled it",
            # from 10 µs: handling is well under 0.5 ms, so a coarser first bucket made
            # every quantile an interpolation inside it (0.25 / 0.49 ms whatever the truth)
            buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002,
                     0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r)
        self.heartbeats = Counter("ee_heartbeats_total", "Heartbeats received", registry=r)
        self.history_dropped = Gauge(
            "ee_event_history_dropped_total", "Events not written to the history store "
            "because its queue was full (counted since the CP started)", registry=r)
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
        # what the rollout guardrails compare between two stacks (ee.router.guardrails)
        self.http_responses = Counter(
            "ee_http_responses_total", "HTTP answers of the API by status class (2xx … 5xx)",
            ["code"], registry=r)
        self.http_seconds = Histogram(
            "ee_http_request_seconds", "From an HTTP request's arrival to its answer's "
            "status line", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                    1.0, 2.5, 5.0, 10.0), registry=r)
        self.deployments = Counter(
            "ee_deployments_total", "Deployments by first outcome (healthy: running; "
            "failed: given up before running)", ["outcome"], registry=r)
        self.deploy_queue = Histogram(
            "ee_deploy_queue_seconds", "From a deployment's creation to its running",
            buckets=DEPLOY_QUEUE_LE, registry=r)
        self.order_failures = Counter(
            "ee_launch_order_failures_total", "Launch orders that failed (each once, when "
            "it fails)", registry=r)
        for outcome in ("healthy", "failed"):
            self.deployments.labels(outcome)
        for code in ("2xx", "3xx", "4xx", "5xx"):
            self.http_responses.labels(code)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def count_http(app: Any, metrics: CpMetrics) -> Any:
    """*app* (an ASGI callable) counting its HTTP answers by status class, with their
    latency."""

    async def counted(scope: Any, receive: Callable[[], Awaitable[Any]],
                      send: Callable[[Any], Awaitable[None]]) -> None:
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        started = trio.current_time()

        async def send_counted(message: Any) -> None:
            if message.get("type") == "http.response.start":
                status = int(message.get("status", 500))
                metrics.http_responses.labels(f"{min(max(status // 100, 1), 5)}xx").inc()
                metrics.http_seconds.observe(trio.current_time() - started)
            await send(message)

        await app(scope, receive, send_counted)

    return counted
