"""A dc CP's own metrics at the master, per datacenter (``stats`` events).

Pure: the structuring refuses what a hostile or broken dc could send (negative counts,
NaN, unknown bounds, labels beyond the cap, a datacenter in the body), and the dc folds
any number of refusal codes into at most ``MAX_STATS_LABELS``. Real processes: a master
and a dc CP with sim agents, an admitted and a refused registration at the dc show up in
the master's /metrics under that dc's label within the (short) interval. A rogue link:
the label comes from the link, never the body; a bad stats event is refused
(``bad_frame``), nothing of it applied, and the link stays up.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from ee.cp.metrics import ATTESTATION_LE, DEPLOY_QUEUE_LE, CpMetrics
from ee.federation.metrics import DcStatsCollector, dc_stats, fold_registrations
from ee.federation.wire import (
    MAX_STATS_LABELS,
    Stats,
    WireError,
    check_stats,
)

from .fedkit import agent, dc, event_log, eventually, join_token, master, refused, sim_td
from .test_refusals import LABEL, link, rogue_master

A, B = "sim:dc-a", "sim:dc-b"


def _good() -> dict[str, Any]:
    return {"registrations": [{"outcome": "admitted", "detail": "sim:a", "count": 2},
                              {"outcome": "rejected", "detail": "WRONG_DATACENTER",
                               "count": 1}],
            "attestation": {"le": list(ATTESTATION_LE), "buckets": [0, 0, 1, 1, 1, 1, 1, 2,
                                                                     2, 2],
                            "sum": 0.2, "count": 2},
            "deployments": {"healthy": 1, "failed": 0},
            "deploy_queue": {"le": list(DEPLOY_QUEUE_LE), "buckets": [0] * 12, "sum": 0,
                             "count": 0},
            "agents": {"online": 1, "stale": 0, "offline": 0, "quarantined": 0}}


def _set(path: str, value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return mutate


@pytest.mark.parametrize("mutate", [
    _set("registrations.0.count", -1),  # a negative count
    _set("attestation.sum", float("nan")),  # NaN
    _set("attestation.sum", float("inf")),
    _set("attestation.sum", -0.5),
    _set("agents.online", True),  # a bool is not a count
    _set("agents.online", 1.5),
    _set("agents.online", 2**64),  # past MAX_COUNT
    _set("deployments.healthy", "3"),
    _set("agents.bogus", 1),  # an unknown status
    _set("deployments.bogus", 1),
    _set("registrations.0.outcome", "maybe"),
    _set("registrations.0.detail", 'x"} 1\nee_evil{a="'),  # not a label value
    _set("attestation.le", [1.0] * len(ATTESTATION_LE)),  # unknown bucket bounds
    _set("deploy_queue.le", list(ATTESTATION_LE)),
    _set("attestation.buckets", [1, 0, 1, 1, 1, 1, 1, 2, 2, 2]),  # not cumulative
    _set("attestation.count", 3),  # +Inf bucket != count
    _set("attestation.buckets", [0, 1]),  # wrong length
    _set("datacenter", B),  # the label is the link's, never the body's
    _set("registrations", [{"outcome": "rejected", "detail": f"C{i}", "count": 1}
                           for i in range(10_000)]),  # 10,000 labels
    _set("registrations", [{"outcome": "admitted", "detail": "sim:a", "count": 1}] * 2),
    _set("registrations", 5),  # not a list (crashed the dc's actor: TypeError in len)
    _set("registrations", True),
    _set("registrations", {"outcome": "admitted"}),
])
def test_a_bad_stats_event_is_refused(mutate: Any) -> None:
    check_stats(_good())  # the base is fine
    doc = copy.deepcopy(_good())
    mutate(doc)
    with pytest.raises(WireError) as err:
        check_stats(doc)
    assert err.value.code == "bad_frame"


def test_the_dc_reads_its_registry_and_folds_labels() -> None:
    m = CpMetrics()
    m.registrations.labels("admitted", A).inc(3)
    for i in range(10_000):  # a flood of refusal codes: at most MAX_STATS_LABELS kept
        m.registrations.labels("rejected", f"CODE_{i}").inc()
    m.registrations.labels("rejected", "WRONG_DATACENTER").inc(50)
    m.attestation_seconds.observe(0.003)
    m.deploy_queue.observe(7)
    m.deployments.labels("healthy").inc()
    doc = dc_stats(m.registry.collect(), {"online": 2, "stale": 0, "offline": 1,
                                          "quarantined": 0})
    stats = check_stats(doc)  # what a dc sends passes the master's check
    regs = {(r.outcome, r.detail): r.count for r in stats.registrations}
    assert len(regs) <= MAX_STATS_LABELS
    assert regs[("admitted", A)] == 3 and regs[("rejected", "WRONG_DATACENTER")] == 50
    assert sum(n for (o, _), n in regs.items() if o == "rejected") == 10_050  # none lost
    assert regs[("rejected", "other")] > 0
    assert stats.attestation.count == 1 and stats.attestation.buckets[2] == 1
    assert stats.deploy_queue.count == 1 and stats.deploy_queue.sum == 7.0
    assert stats.deployments == {"healthy": 1, "failed": 0}
    assert stats.agents["online"] == 2
    # The bounds the wire knows are the CP's own (a change there must change both).
    for family, bounds in (("ee_attestation_seconds", ATTESTATION_LE),
                           ("ee_deploy_queue_seconds", DEPLOY_QUEUE_LE)):
        les = [s.labels["le"] for f in m.registry.collect() if f.name == family
               for s in f.samples if s.name.endswith("_bucket")]
        assert les == [repr(b) for b in bounds] + ["+Inf"]
    # A detail unfit for a label is folded, never sent.
    assert fold_registrations({("rejected", "a b"): 1}) == [
        {"outcome": "rejected", "detail": "other", "count": 1}]


def test_the_collector_exports_only_what_its_source_holds() -> None:
    held: dict[str, Stats] = {A: check_stats(_good())}
    reg = CollectorRegistry()
    reg.register(DcStatsCollector(lambda: held))
    text = generate_latest(reg).decode()
    assert f'ee_dc_registrations_total{{datacenter="{A}",detail="WRONG_DATACENTER",' \
           'outcome="rejected"} 1.0' in text
    assert f'ee_dc_attestation_seconds_bucket{{datacenter="{A}",le="+Inf"}} 2.0' in text
    assert f'ee_dc_agents{{datacenter="{A}",status="online"}} 1.0' in text
    held.clear()  # a dc gone: no series of it left behind
    assert A not in generate_latest(reg).decode()


def _series(text: str, name: str, datacenter: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'datacenter="{datacenter}"' in line:
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


async def test_dc_registrations_show_at_the_master_per_datacenter(tmp_path: Path) -> None:
    m = master(tmp_path)
    a = dc(tmp_path, m, A, "dc-a")
    with trio.fail_after(120):
        await m.start()
        try:
            await a.start("--join-token", await join_token(m, A), "--federation-stats-s",
                          "0.5")
            td = sim_td()
            async with trio.open_nursery() as nursery:
                good = agent(a, "fm-good", A, td)
                await nursery.start(good.run)
                assert good.registered is not None, good.rejected
                wrong = agent(a, "fm-wrong", B, td)
                await nursery.start(wrong.run)
                assert wrong.rejected is not None

                async def seen() -> str | None:
                    async with m.client() as c:
                        text = (await c.get("/metrics")).text
                    regs = _series(text, "ee_dc_registrations_total", A)
                    ok = any('outcome="admitted"' in k and v >= 1 for k, v in regs.items()) \
                        and any('detail="WRONG_DATACENTER"' in k and 'outcome="rejected"' in k
                                and v >= 1 for k, v in regs.items()) \
                        and _series(text, "ee_dc_agents", A).get(
                            f'ee_dc_agents{{datacenter="{A}",status="online"}}') == 1.0
                    return text if ok else None

                text = await eventually(seen, 20, "the dc's registrations at the master")
                count = _series(text, "ee_dc_attestation_seconds_count", A)
                assert list(count.values()) == [2.0]  # both quotes were verified
                assert _series(text, "ee_dc_deployments_total", A)
                assert _series(text, "ee_dc_deploy_queue_seconds_bucket", A)
                # The master's own (direct) registrations stay unlabelled and apart.
                assert re.search(r'^ee_registrations_total\{detail="[^"]*",outcome=', text,
                                 re.M) is None
                nursery.cancel_scope.cancel()
        finally:
            await a.stop()
            await m.stop()


async def test_a_rogue_dc_cannot_set_another_dcs_series(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with rogue_master(tmp_path) as (m, home):
            async with event_log(m) as events, link(home) as (send, recv):
                await send({"type": "hello", "dc": LABEL, "first_unacked": 1, "next_seq": 1,
                            "snapshot_version": 0, "spool_depth": 0})
                assert await recv() == {"type": "ack", "upto": 0}

                def ev(seq: int, data: dict[str, Any], dc: str = LABEL) -> dict[str, Any]:
                    return {"type": "events", "dc": dc, "spool_depth": 0,
                            "snapshot_version": 0, "sent_at": 0.0, "last_seq": seq,
                            "events": [{"seq": seq, "kind": "stats", "at": 0.0,
                                        "data": data}]}

                # The body names another dc: refused, nothing applied, consumed.
                await send(ev(1, {**_good(), "datacenter": B}))
                assert (await recv())["code"] == "bad_frame"
                assert await recv() == {"type": "ack", "upto": 1}
                # A negative count: refused likewise.
                bad = _good()
                bad["registrations"][0]["count"] = -5
                await send(ev(2, bad))
                assert (await recv())["code"] == "bad_frame"
                assert await recv() == {"type": "ack", "upto": 2}
                # The frame names another dc: refused at the link.
                await send(ev(3, _good(), dc=B))
                assert (await recv())["code"] == "datacenter_mismatch"
                async with m.client() as c:
                    text = (await c.get("/metrics")).text
                assert "ee_dc_" not in text.replace("# HELP ee_dc_", "").replace(
                    "# TYPE ee_dc_", "")  # nothing of the refused ones applied
                # The link is still up: a good one applies, under the link's label only.
                await send(ev(3, _good()))
                assert await recv() == {"type": "ack", "upto": 3}
                async with m.client() as c:
                    text = (await c.get("/metrics")).text
                assert _series(text, "ee_dc_registrations_total", LABEL) == {
                    f'ee_dc_registrations_total{{datacenter="{LABEL}",detail="sim:a",'
                    'outcome="admitted"}': 2.0,
                    f'ee_dc_registrations_total{{datacenter="{LABEL}",'
                    'detail="WRONG_DATACENTER",outcome="rejected"}': 1.0}
                assert f'datacenter="{B}"' not in text
                await trio.sleep(0.3)
            assert len(refused(events, "bad_frame")) >= 2
