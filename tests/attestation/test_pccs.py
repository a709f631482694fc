"""The PCS/PCCS client against a stand-in on real loopback HTTP, and the collateral
cache's refresh timing and stale policy (autojump clock where no network is involved)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ee.attestation import Collateral, Verifier
from ee.attestation.collateral import TrustAnchors
from ee.attestation.pccs import PccsClient, PccsError, normalise_fmspc, raw_member
from ee.attestation.providers.sim import SIM_FMSPC, SimTD
from ee.cp.collateral_refresh import (
    CollateralRefresher,
    RefreshSettings,
    admit_fetched,
    freshness,
    plan,
)

from .conftest import UPTODATE, UPTODATE_COLLATERAL, UPTODATE_NOW
from .pccs_standin import running_standin

SAMPLE_FMSPC = "B0C06F000000"
DAY = 86400.0


@pytest.fixture(scope="module")
def td() -> SimTD:
    return SimTD.create()


def sim_collateral(td: SimTD, issued_at: float, validity_s: float = 30 * DAY) -> Collateral:
    return td.collateral(issued_at=issued_at, validity_s=validity_s)


# --- the client over real HTTP ---------------------------------------------------------


async def test_real_collateral_round_trips_byte_exact(samples: Path) -> None:
    """Served as a PCCS serves it, the real collateral comes back with the exact signed
    bytes, and the real quote verifies UpToDate against Intel's root with it."""
    original = Collateral.from_json((samples / UPTODATE_COLLATERAL).read_text())
    with trio.fail_after(20):
        async with running_standin({SAMPLE_FMSPC: original}) as pccs:
            fetched = await PccsClient(pccs.url).fetch(normalise_fmspc(SAMPLE_FMSPC))
            assert pccs.requests == ["/sgx/certification/v4/pckcrl", "/tdx/certification/v4/tcb",
                                     "/tdx/certification/v4/qe/identity",
                                     "/sgx/certification/v4/rootcacrl"]
    assert fetched == original and fetched.digest == original.digest
    quote = (samples / UPTODATE).read_bytes()
    result = Verifier.intel().verify(quote, now=UPTODATE_NOW, collateral=fetched)
    assert result.ok, result.reasons
    assert result.tcb_status == "UpToDate"


async def test_root_crl_from_distribution_point_when_pcs_has_no_route(td: SimTD) -> None:
    # The sim root has no CRL DP: the client says so instead of guessing.
    c = sim_collateral(td, 1_700_000_000)
    with trio.fail_after(20):
        async with running_standin({SIM_FMSPC.hex().upper(): c}, pcs_root_crl=True) as pccs:
            with pytest.raises(PccsError, match="no CRL distribution point") as exc:
                await PccsClient(pccs.url).fetch(SIM_FMSPC)
    assert exc.value.kind == "format"


@pytest.mark.parametrize(("mode", "kind", "text"), [
    ("fail", "http", "HTTP 500"),
    ("garbage", "format", "not a PCS answer"),
    ("wrong_fmspc", "mismatch", "the PCCS answered with FMSPC 000000000000"),
    ("huge", "too_large", "larger than"),
    ("deep_json", "format", "nested too deeply"),
])
async def test_misbehaving_pccs_gives_clear_errors(td: SimTD, mode: str, kind: str,
                                                   text: str) -> None:
    c = sim_collateral(td, 1_700_000_000)
    with trio.fail_after(20):
        async with running_standin({SIM_FMSPC.hex().upper(): c}, mode=mode) as pccs:
            with pytest.raises(PccsError) as exc:
                await PccsClient(pccs.url).fetch(SIM_FMSPC)
    assert exc.value.kind == kind
    assert text in str(exc.value) and "\n" not in str(exc.value)


async def test_an_undecodable_issuer_chain_is_a_format_error(td: SimTD) -> None:
    """With no rootcacrl route the client reads the CRL distribution point out of the
    served (not yet checked) chain: garbage there is a PccsError, never a ValueError
    that would crash the CP's refresher."""
    c = sim_collateral(td, 1_700_000_000)
    with trio.fail_after(20):
        async with running_standin({SIM_FMSPC.hex().upper(): c}, mode="bad_chain",
                                   pcs_root_crl=True) as pccs:
            with pytest.raises(PccsError) as exc:
                await PccsClient(pccs.url).fetch(SIM_FMSPC)
    assert exc.value.kind == "format" and "\n" not in str(exc.value)


async def test_unknown_fmspc_slow_and_unreachable_pccs(td: SimTD) -> None:
    c = sim_collateral(td, 1_700_000_000)
    with trio.fail_after(20):
        async with running_standin({SIM_FMSPC.hex().upper(): c}) as pccs:
            with pytest.raises(PccsError, match="HTTP 404") as exc:
                await PccsClient(pccs.url).fetch(bytes(6))
            assert exc.value.kind == "http"
            pccs.delay_s = 5
            with pytest.raises(PccsError, match=r"did not answer within 0\.3 s") as exc:
                await PccsClient(pccs.url, timeout_s=0.3).fetch(SIM_FMSPC)
            assert exc.value.kind == "timeout"
            url = pccs.url
    with trio.fail_after(20):
        with pytest.raises(PccsError) as exc:
            await PccsClient(url, timeout_s=2).fetch(SIM_FMSPC)
    assert exc.value.kind == "unreachable"


def test_raw_member_keeps_the_signed_text() -> None:
    body = ' {"signature" : "ab", "tcbInfo" : {"b":1,  "a": ["}", {"x": null}]} }'
    assert raw_member(body, "tcbInfo") == '{"b":1,  "a": ["}", {"x": null}]}'
    with pytest.raises(ValueError):
        raw_member(body, "enclaveIdentity")
    with pytest.raises(ValueError):
        raw_member("[1]", "tcbInfo")


# --- what the cache accepts ------------------------------------------------------------


def test_cache_refuses_untrusted_expired_and_foreign_collateral(td: SimTD) -> None:
    anchors = TrustAnchors([td.root_cert])
    now = 1_700_000_000.0
    entry = admit_fetched(SIM_FMSPC, sim_collateral(td, now - 60), anchors, now=now)
    assert freshness(entry, now) == "fresh" and entry.next_update == now - 60 + 30 * DAY
    assert freshness(entry, entry.next_update) == "stale"
    other = SimTD.create()
    with pytest.raises(PccsError) as exc:  # signed under another root
        admit_fetched(SIM_FMSPC, sim_collateral(other, now - 60), anchors, now=now)
    assert exc.value.kind == "untrusted"
    with pytest.raises(PccsError) as exc:  # past its next update
        admit_fetched(SIM_FMSPC, sim_collateral(td, now - 31 * DAY), anchors, now=now)
    assert exc.value.kind == "expired"
    with pytest.raises(PccsError) as exc:  # for another platform
        admit_fetched(bytes(6), sim_collateral(td, now - 60), anchors, now=now)
    assert exc.value.kind == "mismatch"


# --- refresh timing (pure) -------------------------------------------------------------


def test_plan_refreshes_before_next_update_with_jitter_and_backs_off(td: SimTD) -> None:
    s = RefreshSettings(refresh_interval_s=DAY, lead_s=3600, jitter_fraction=0.1,
                        backoff_s=5, max_backoff_s=600)
    now = 1_700_000_000.0
    entry = admit_fetched(SIM_FMSPC, sim_collateral(td, now - 60), TrustAnchors([td.root_cert]),
                          now=now)
    assert plan(entry, now, 0, s, 0.0) == DAY
    assert plan(entry, now, 0, s, 0.5) == pytest.approx(DAY * 0.95)
    short = admit_fetched(SIM_FMSPC, sim_collateral(td, now - 60, validity_s=7200),
                          TrustAnchors([td.root_cert]), now=now)
    assert plan(short, now, 0, s, 0.0) == pytest.approx(7200 - 60 - 3600)  # before nextUpdate
    assert [plan(entry, now, n, s, 0.0) for n in (1, 2, 3, 8, 20)] == [5, 10, 20, 600, 600]
    assert plan(short, now + 3500, 5, s, 0.0) == pytest.approx(7200 - 60 - 3600 - 3500)
    assert plan(None, now, 3, s, 0.0) == 20


# --- the refresher (autojump clock; an in-memory source) -------------------------------


class Source:
    """Collateral from a function of the fetch time; `fail` makes fetches fail."""

    def __init__(self, make: Callable[[float], Collateral], clock: Callable[[], float]) -> None:
        self.make = make
        self.clock = clock
        self.fail = False
        self.times: list[float] = []

    async def fetch(self, fmspc: bytes, *, ca: str = "platform") -> Collateral:
        self.times.append(self.clock())
        if self.fail:
            raise PccsError("http", "PCK CRL: answered HTTP 500")
        return self.make(self.clock())


def refresher(td: SimTD, source: Source, clock: Callable[[], float], events: list[Any],
              **settings: Any) -> CollateralRefresher:
    return CollateralRefresher(source, [SIM_FMSPC], [td.root_cert], RefreshSettings(**settings),
                               registry=CollectorRegistry(), emit=lambda *e: events.append(e),
                               clock=clock, rng=random.Random(7), offload=inline)


async def inline(fn: Callable[[], Any]) -> Any:
    return fn()


async def test_refresher_renews_daily_backs_off_and_keeps_serving(td: SimTD,
        autojump_clock: trio.testing.MockClock) -> None:
    base = 1_700_000_000.0

    def clock() -> float:
        return base + trio.current_time()

    source = Source(lambda t: sim_collateral(td, t - 60, validity_s=3 * DAY), clock)
    events: list[Any] = []
    r = refresher(td, source, clock, events, refresh_interval_s=DAY, jitter_fraction=0.1,
                  backoff_s=10, max_backoff_s=3600)
    with trio.fail_after(30 * DAY):  # virtual time
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            first = r.cache[SIM_FMSPC]
            await trio.sleep(DAY + 1)
            assert len(source.times) == 2  # renewed once, within (0.9 d, 1 d]
            assert 0.9 * DAY <= source.times[1] - source.times[0] <= DAY
            assert r.cache[SIM_FMSPC].fetched_at > first.fetched_at
            source.fail = True
            kept = r.cache[SIM_FMSPC]
            await trio.sleep(DAY + 100)
            # Backoff 10, 20, 40, ... capped at an hour: many tries, the copy kept serving.
            gaps = [b - a for a, b in zip(source.times[2:], source.times[3:], strict=False)]
            assert gaps[:4] == pytest.approx([10, 20, 40, 80])
            assert max(gaps) <= 3600
            assert r.cache[SIM_FMSPC] is kept
            assert r.choose(clock()) == (kept.collateral, None)
            assert events[-1][0] == "collateral.fetch_failed" and events[-1][2]["cached"] == "fresh"
            failures = r.metrics.failures.labels(SIM_FMSPC.hex().upper(), "http")._value.get()
            assert failures == len(source.times) - 2
            # Past next update the strict policy hands the stale copy to the verifier
            # (which refuses it as expired); the PCCS comes back and it is replaced.
            await trio.sleep(kept.next_update - clock() + 1)
            assert freshness(kept, clock()) == "stale"
            assert r.choose(clock()) == (kept.collateral, None)
            source.fail = False
            await trio.sleep(3600 + 1)
            assert freshness(r.cache[SIM_FMSPC], clock()) == "fresh"
            nursery.cancel_scope.cancel()


async def test_stale_policy_warn_grants_a_bounded_grace(td: SimTD,
        autojump_clock: trio.testing.MockClock) -> None:
    base = 1_700_000_000.0

    def clock() -> float:
        return base + trio.current_time()

    source = Source(lambda t: sim_collateral(td, t - 60, validity_s=DAY), clock)
    events: list[Any] = []
    r = refresher(td, source, clock, events, stale="warn", grace_s=DAY)
    with trio.fail_after(30 * DAY):
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            source.fail = True
            entry = r.cache[SIM_FMSPC]
            await trio.sleep(entry.next_update - clock() + 10)
            assert r.choose(clock()) == (entry.collateral, entry.next_update - 1)
            await trio.sleep(DAY)
            assert r.choose(clock()) == (entry.collateral, None)  # past the grace: strict
            nursery.cancel_scope.cancel()


async def test_refresher_keeps_copies_on_disk(td: SimTD, tmp_path: Path,
        autojump_clock: trio.testing.MockClock) -> None:
    base = 1_700_000_000.0

    def clock() -> float:
        return base + trio.current_time()

    source = Source(lambda t: sim_collateral(td, t - 60), clock)
    r = refresher(td, source, clock, [])
    r.directory = tmp_path
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            nursery.cancel_scope.cancel()
    source.fail = True
    again = refresher(td, source, clock, [])
    again.directory = tmp_path
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(again.run)
            assert again.cache[SIM_FMSPC].collateral == r.cache[SIM_FMSPC].collateral
            nursery.cancel_scope.cancel()
    # A tampered copy on disk is not loaded.
    path = tmp_path / f"{SIM_FMSPC.hex().upper()}.json"
    doc = json.loads(path.read_text())
    doc["collateral"]["tcb_info"] = doc["collateral"]["tcb_info"].replace("UpToDate", "Revoked")
    path.write_text(json.dumps(doc))
    third = refresher(td, source, clock, [])
    third.directory = tmp_path
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(third.run)
            assert SIM_FMSPC not in third.cache
            nursery.cancel_scope.cancel()


async def test_refresher_over_http_survives_a_failing_pccs(td: SimTD) -> None:
    """Real loopback HTTP: a PCCS that starts failing or serves garbage never replaces
    the cached copy; failures are counted by kind."""
    import time

    c = sim_collateral(td, time.time() - 60)
    events: list[Any] = []
    with trio.fail_after(30):
        async with running_standin({SIM_FMSPC.hex().upper(): c}) as pccs:
            r = CollateralRefresher(PccsClient(pccs.url, timeout_s=5), [SIM_FMSPC],
                                    [td.root_cert], RefreshSettings(),
                                    registry=CollectorRegistry(),
                                    emit=lambda *e: events.append(e))
            assert await r.refresh(SIM_FMSPC)
            for mode in ("fail", "garbage", "wrong_fmspc"):
                pccs.mode = mode
                assert not await r.refresh(SIM_FMSPC)
            assert r.cache[SIM_FMSPC].collateral == c
            label = SIM_FMSPC.hex().upper()
            counts = {k: r.metrics.failures.labels(label, k)._value.get()
                      for k in ("http", "format", "mismatch")}
            assert counts == {"http": 1, "format": 1, "mismatch": 1}
            assert r.describe(time.time())[0]["state"] == "fresh"
            assert "FMSPC" in (r.describe(time.time())[0]["last_error"] or "")


def test_der_crl_ending_in_whitespace_byte_is_kept() -> None:
    from ee.attestation.pccs import _crl_der

    td = SimTD.create()
    c = td.chain
    for _ in range(2000):  # CRL signatures vary: find one whose DER ends in whitespace
        der = td._crl(c.pck_ca_cert, c.pck_ca_key, 1_700_000_000, 1_700_086_400, ())
        if der[-1:] in (b" ", b"\n", b"\t", b"\r"):
            break
    else:
        raise AssertionError("no CRL ending in a whitespace byte in 2000 tries")
    assert _crl_der("PCK CRL", der) == der
    assert _crl_der("PCK CRL", der.hex().encode() + b"\n") == der


def eectl_trust(*argv: str) -> int:
    import argparse

    from ee.ctl.collateral import register_collateral

    parser = argparse.ArgumentParser(prog="eectl")
    trust = parser.add_subparsers(dest="group").add_parser("trust")
    register_collateral(trust.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trust", *argv])
    code: int = args.handler(args)
    return code


def test_eectl_trust_collateral_fetch_and_show(
        samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from .pccs_standin import standin_in_thread

    original = Collateral.from_json((samples / UPTODATE_COLLATERAL).read_text())
    out = tmp_path / "collateral.json"
    td = SimTD.create()
    root = tmp_path / "root.pem"
    root.write_bytes(td.root_pem())
    with standin_in_thread({SAMPLE_FMSPC: original,
                            SIM_FMSPC.hex().upper(): sim_collateral(td, 1_700_000_000)}) as pccs:
        # The real collateral expired in 2025: fetched, checked, refused as expired.
        assert eectl_trust("collateral", "fetch", "--pccs", pccs.url, "--quote",
                           str(samples / UPTODATE), "--out", str(out), "--json") == 1
        view = json.loads(capsys.readouterr().out)
        assert view["fmspc"] == SAMPLE_FMSPC and not view["valid"]
        assert any("expired" in p for p in view["problems"]) and not out.exists()
        # Fresh sim collateral under its own root: written, readable by verify-quote.
        fresh = sim_collateral(td, __import__("time").time() - 60)
        pccs.platforms = {SIM_FMSPC.hex().upper(): fresh}  # CRLs, QE identity: sim's
        assert eectl_trust("collateral", "fetch", "--pccs", pccs.url, "--fmspc",
                           SIM_FMSPC.hex(), "--root", str(root), "--out", str(out)) == 0
        assert Collateral.from_json(out.read_text()) == fresh
        pccs.mode = "fail"
        assert eectl_trust("collateral", "fetch", "--pccs", pccs.url, "--fmspc",
                           SIM_FMSPC.hex(), "--root", str(root)) == 1
        assert "HTTP 500" in capsys.readouterr().err
    (tmp_path / "real.json").write_text(json.dumps(original.to_json()))
    capsys.readouterr()
    assert eectl_trust("collateral", "show", str(tmp_path / "real.json"), "--now",
                       str(UPTODATE_NOW), "--json") == 0
    assert json.loads(capsys.readouterr().out)["valid"]
    assert eectl_trust("collateral", "show", str(tmp_path / "real.json")) == 1
    assert eectl_trust("collateral", "fetch", "--pccs", "ftp://x", "--fmspc", "00") == 2
