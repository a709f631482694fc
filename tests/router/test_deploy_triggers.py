"""The triggers with CP metrics of their own: deploy success (``ee_deployments_total``,
fed from the event stream), federation sync lag and sequence errors; the CP HTTP
metrics the Worker's guard compares; from synthetic metrics text and a real CP."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cpkit import free_port
from test_adoption import control_plane, deploy
from test_tenants import reach_state, setup_app, tenant

from ee.cp.deploy_metrics import DeployTally, Outcome
from ee.router import decision as d
from ee.router.guard import scrape
from ee.router.guardrails import (
    Evaluator,
    histogram_quantile,
    parse_prometheus,
    readings,
    stack_interval,
    triggers_from_json,
)

CONFIG = d.RolloutConfig.from_json({"classes": {"A": 25, "B": 10, "C": 5, "E": 50}})


def metrics(healthy: int = 0, failed: int = 0, lag: dict[str, float] | None = None,
            seq: dict[str, int] | None = None, ok: int = 0, errors: int = 0,
            fast: int = 0, slow: int = 0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A CP's /metrics text with these numbers, parsed as the guard parses it."""
    lines = ["# TYPE ee_deployments_total counter",
             f'ee_deployments_total{{outcome="healthy"}} {healthy}',
             f'ee_deployments_total{{outcome="failed"}} {failed}',
             "# TYPE ee_http_responses_total counter",
             f'ee_http_responses_total{{code="2xx"}} {ok}',
             f'ee_http_responses_total{{code="5xx"}} {errors}',
             "# TYPE ee_http_request_seconds histogram",
             f'ee_http_request_seconds_bucket{{le="0.01"}} {fast}',
             f'ee_http_request_seconds_bucket{{le="0.1"}} {fast}',
             f'ee_http_request_seconds_bucket{{le="1.0"}} {fast + slow}',
             f'ee_http_request_seconds_bucket{{le="+Inf"}} {fast + slow}',
             f"ee_http_request_seconds_count {fast + slow}",
             "ee_http_request_seconds_sum 0"]
    if lag is not None:
        lines.append("# TYPE ee_federation_sync_lag_seconds gauge")
        lines += [f'ee_federation_sync_lag_seconds{{datacenter="{dc}"}} {v}'
                  for dc, v in lag.items()]
    if seq is not None:
        lines.append("# TYPE ee_federation_sequence_errors_total counter")
        lines += [f'ee_federation_sequence_errors_total{{datacenter="{dc}"}} {v}'
                  for dc, v in seq.items()]
    return parse_prometheus("\n".join(lines) + "\n")


def test_deploy_success_below_the_slo_steps_tenant_writes_back_after_600_s() -> None:
    ev = Evaluator(triggers_from_json(None))
    old = stack_interval(None, metrics(healthy=50, ok=100), metrics(ok=50))
    before = metrics(healthy=10, failed=0)
    bad = stack_interval(None, metrics(healthy=19, failed=1), before)  # 90 % < 95 %
    assert (bad.deploys, bad.deploys_healthy) == (10, 9)
    assert readings(old, bad, ev.triggers)["deploy_success"].breach
    ok = stack_interval(None, metrics(healthy=30, failed=0), before)
    assert not readings(old, ok, ev.triggers)["deploy_success"].breach
    ev, fired = ev.observe(0, old, bad, CONFIG)
    assert fired is None and "deploy_success" in ev.since
    ev, fired = ev.observe(599, old, bad, CONFIG)
    assert fired is None
    ev, fired = ev.observe(600, old, bad, CONFIG)
    assert fired is not None and fired.trigger == "deploy_success"
    assert fired.moves == {"B": (10.0, 5.0)} and fired.value == pytest.approx(0.9)
    # no deployment reached an outcome: no verdict either way
    idle = stack_interval(None, before, before)
    assert "deploy_success" not in readings(old, idle, ev.triggers)


def test_federation_lag_and_sequence_errors_step_federation_back() -> None:
    t = triggers_from_json({"federation_lag": {"window_s": 0},
                            "sequence_errors": {"window_s": 0}})
    old = stack_interval(None, metrics(), metrics())
    lagging = stack_interval(None, metrics(lag={"dc-a": 5, "dc-b": 61}), metrics())
    assert lagging.federation_lag_s == 61
    r = readings(old, lagging, t)
    assert r["federation_lag"].breach and r["federation_lag"].limit == 60
    assert not readings(old, stack_interval(None, metrics(lag={"dc-a": 60}), metrics()),
                        t)["federation_lag"].breach
    _, fired = Evaluator(t).observe(0, old, lagging, CONFIG)
    assert fired is not None and fired.trigger == "federation_lag"
    assert fired.moves == {"E": (50.0, 25.0)}
    # sequence errors: the increase counts, not the total
    steady = stack_interval(None, metrics(seq={"dc-a": 4}), metrics(seq={"dc-a": 4}))
    assert steady.sequence_errors_new == 0
    assert not readings(old, steady, t)["sequence_errors"].breach
    rising = stack_interval(None, metrics(seq={"dc-a": 4, "dc-b": 1}), metrics(seq={"dc-a": 4}))
    assert rising.sequence_errors_new == 1
    _, fired = Evaluator(t).observe(0, old, rising, CONFIG)
    assert fired is not None and fired.trigger == "sequence_errors"
    assert fired.moves == {"E": (50.0, 25.0)}
    # a stack without federation metrics: neither trigger has a verdict
    assert {"federation_lag", "sequence_errors"}.isdisjoint(
        readings(old, stack_interval(None, metrics(), metrics()), t))


def test_http_metrics_give_the_worker_guard_its_error_rate_and_p99() -> None:
    before = metrics(ok=100, errors=0, fast=100)
    now = metrics(ok=190, errors=10, fast=180, slow=20)
    iv = stack_interval(None, now, before)
    assert (iv.answers, iv.errors_5xx) == (100, 10)
    # 80 fast + 20 in (0.1, 1.0]: the 99th is 95 % of the way through that bucket
    assert iv.p99_s == pytest.approx(0.1 + 0.9 * 19 / 20)
    assert histogram_quantile(0.5, now, before, "ee_http_request_seconds")[0] == \
        pytest.approx(0.01 * 50 / 80)
    # too few answers for a p99
    assert stack_interval(None, metrics(fast=10), metrics()).p99_s is None
    # a failed scrape is one 5xx answer more (none at all: the scrape alone)
    assert (stack_interval(None, now, before, failed_scrapes=2).errors_5xx) == 12
    dead = stack_interval(None, None, before, failed_scrapes=3)
    assert (dead.answers, dead.errors_5xx) == (3, 3)


def test_deploy_tally_counts_each_deployment_once_by_its_first_outcome() -> None:
    t = DeployTally()
    assert t.see("deployment.state", "d0", {"state": "running"}, 1) is None  # rehydrated
    t.see("deployment.created", "d1", {}, 10)
    t.see("deployment.created", "d2", {}, 11)
    t.see("deployment.created", "d3", {}, 12)
    assert t.see("deployment.state", "d1", {"state": "placing"}, 13) is None
    assert t.see("deployment.state", "d1", {"state": "running"}, 15) == \
        Outcome("d1", "healthy", 5)
    assert t.see("deployment.state", "d1", {"state": "failed"}, 20) is None  # once
    assert t.see("deployment.state", "d2", {"state": "failed", "error": "x"}, 16) == \
        Outcome("d2", "failed", None)
    assert t.see("deployment.state", "d3", {"state": "stopping"}, 17) is None
    assert t.see("deployment.state", "d3", {"state": "running"}, 18) is None  # stopped
    assert t.see("deployment.state", "d4", "junk", 19) is None
    assert not t.pending


async def test_a_real_cp_counts_a_failed_and_a_healthy_deployment(tmp_path: Path) -> None:
    """deploy_success against a real CP: a deployment whose agent fails it, then one
    that runs; the guard's reading of the CP's /metrics breaches the SLO (1 of 2)."""
    import httpx

    data, listen = tmp_path / "cp", f"127.0.0.1:{free_port()}"
    with trio.fail_after(90):
        async with trio.open_nursery() as agents, \
                control_plane(data, listen, max_attempts=1) as cp, \
                httpx.AsyncClient() as scraper:
            url = f"{cp.env.http}/metrics"
            before, failed = await scrape(scraper, url)
            assert before is not None and failed == 0
            [agent] = await cp.start(agents, "vm-0", fail_deploys=True)
            http = await tenant(cp.env, "t")
            async with http:
                await setup_app(http)
                await reach_state(http, await deploy(http), "failed")
                agent.fail_deploys = False
                await reach_state(http, await deploy(http), "running")
            now, _ = await scrape(scraper, url)
            assert now is not None
            iv = stack_interval(None, now, before)
            assert (iv.deploys, iv.deploys_healthy) == (2, 1)
            r = readings(stack_interval(None, now, before), iv, triggers_from_json(None))
            assert r["deploy_success"].breach and r["deploy_success"].value == 0.5
            queue = {labels: v for (n, labels), v in now.items()
                     if n == "ee_deploy_queue_seconds_count"}
            assert list(queue.values()) == [1.0]
            # and the CP counted its HTTP answers (what the Worker's guard compares)
            assert iv.answers is not None and iv.answers >= 5
            agents.cancel_scope.cancel()


async def test_each_failed_launch_order_counts_once_for_order_failures() -> None:
    """``order_failures`` reads a counter fed by ``order.failed`` events: an order
    failing while another leaves the failed state is still one failure (the
    ``ee_launch_orders`` gauge's delta would read 0)."""
    from prometheus_client import generate_latest

    from ee.cp.deploy_metrics import run_deploy_metrics
    from ee.cp.events import EventBus
    from ee.cp.metrics import CpMetrics

    bus, cp_metrics = EventBus(), CpMetrics()
    failed_gauge = cp_metrics.orders_gauge.labels("sim:a", "small", "failed")
    failed_gauge.set(1)  # o0 failed earlier
    before = parse_prometheus(generate_latest(cp_metrics.registry).decode())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_deploy_metrics, bus.subscribe, cp_metrics)
            bus.emit("order.opened", "sim:a/small", {"order_id": "o1"})
            bus.emit("order.failed", "sim:a/small", {"order_id": "o1", "error": "boom"})
            bus.emit("order.claimed", "sim:a/small", {"order_id": "o2"})
            failed_gauge.set(1)  # o0 pruned, o1 failed: the gauge did not move
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    now = parse_prometheus(generate_latest(cp_metrics.registry).decode())
    iv = stack_interval(None, now, before)
    assert iv.orders_failed_new == 1
    r = readings(stack_interval(None, now, before), iv, triggers_from_json(None))
    assert r["order_failures"].breach
