"""Collateral from PCS/PCCS, cached per FMSPC and refreshed before it expires.

Theory of operation
-------------------
The CP keeps one `CacheEntry` per configured FMSPC: collateral that was checked
against the bundle's trusted roots (chains, signatures, CRLs: `check_collateral`)
when it arrived, with its validity window (the earliest ``nextUpdate`` of TCB info,
QE identity and CRLs, and the latest issue date). A fetched document that does not
check, is not yet valid, is already expired, or is for another FMSPC never replaces
the cached one: it is a failure, counted and reported, and the cached copy keeps
serving.

Timing is a pure function (`plan`), fed unix time from outside:

* after a success the next refresh is at ``fetched + refresh_interval`` but never
  later than ``next_update - lead`` (so a copy is renewed before it runs out), minus a
  random jitter of up to ``jitter_fraction`` of the wait (CPs of one fleet spread out);
* after a failure it retries with exponential backoff (``backoff_s`` doubling up to
  ``max_backoff_s``), still never later than the renewal deadline.

What registration does with the cache is `freshness` + the stale policy:

* ``fresh`` -- the cached collateral is used;
* ``stale`` (past ``next_update``): policy ``strict`` uses it anyway, so the verifier
  refuses with "... expired" (the honest reason); policy ``warn`` admits for at most
  ``grace_s`` past ``next_update`` by judging the quote at the collateral's last valid
  instant and recording a ``collateral_stale`` violation on the agent (`GraceJudge`);
  beyond the grace it is strict;
* ``missing`` -- no collateral: the measurement policy's ``require_collateral``
  decides (the default refuses: "TCB status unknown").

Copies are kept on disk (``DATA_DIR/collateral/<FMSPC>.json``, PCS JSON shape plus the
fetch time) and re-checked on load, so a restarted CP whose PCCS is down keeps
serving while its copy is valid.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import attrs
import trio
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ee.actors.identity import Identity
from ee.attestation.collateral import Collateral, TrustAnchors, check_collateral
from ee.attestation.errors import CollateralFormatError
from ee.attestation.pccs import PCK_CAS, PccsError
from ee.cp.registration import Admission, Judge, Refusal
from ee.protocol.messages import Attestation, Register

log = logging.getLogger("ee.cp.collateral")
_T = TypeVar("_T")

StalePolicy = Literal["strict", "warn"]
STALE_POLICIES: tuple[StalePolicy, ...] = ("strict", "warn")
Freshness = Literal["fresh", "stale", "missing", "not_yet_valid"]


@attrs.frozen
class RefreshSettings:
    refresh_interval_s: float = 86400.0
    lead_s: float = 3600.0
    jitter_fraction: float = 0.1
    backoff_s: float = 5.0
    max_backoff_s: float = 600.0
    stale: StalePolicy = "strict"
    grace_s: float = 7 * 86400.0
    ca: str = "platform"

    def __attrs_post_init__(self) -> None:
        if self.stale not in STALE_POLICIES:
            raise ValueError(f"stale collateral policy must be strict or warn, not "
                             f"{self.stale!r}")
        if self.ca not in PCK_CAS:
            raise ValueError(f"PCK CA must be one of {', '.join(PCK_CAS)}")


@attrs.frozen
class CacheEntry:
    """Checked collateral for one FMSPC (unix times)."""

    fmspc: bytes
    collateral: Collateral
    fetched_at: float
    issued_at: float
    next_update: float


def admit_fetched(fmspc: bytes, collateral: Collateral, anchors: TrustAnchors, *,
                  now: float) -> CacheEntry:
    """Check fetched *collateral* for the cache (CPU-bound: call from a worker thread).

    Raises `PccsError` (kind ``untrusted``, ``expired`` or ``mismatch``) when it must
    not replace a cached copy.
    """
    check = check_collateral(collateral, anchors)
    if check.problems:
        raise PccsError("untrusted", "collateral refused: " + "; ".join(check.problems[:3]))
    assert check.tcb_info is not None and check.qe_identity is not None
    if check.tcb_info.fmspc != fmspc:
        raise PccsError("mismatch", f"collateral is for FMSPC "
                        f"{check.tcb_info.fmspc.hex().upper()}, not {fmspc.hex().upper()}")
    problems = check.time_problems(now)
    if problems:
        raise PccsError("expired", "collateral refused: " + "; ".join(problems[:3]))
    next_update = check.next_update
    assert next_update is not None
    issued = max(check.tcb_info.issue_date, check.qe_identity.issue_date)
    return CacheEntry(fmspc, collateral, now, float(issued), float(next_update))


def freshness(entry: CacheEntry | None, now: float) -> Freshness:
    if entry is None:
        return "missing"
    if now < entry.issued_at:
        return "not_yet_valid"
    return "fresh" if now < entry.next_update else "stale"


def plan(entry: CacheEntry | None, now: float, failures: int, settings: RefreshSettings,
         jitter: float) -> float:
    """Seconds until the next fetch (pure; *jitter* in [0, 1))."""
    deadline = (entry.next_update - settings.lead_s) if entry is not None else now
    if failures:
        wait = min(settings.backoff_s * 2.0 ** (failures - 1), settings.max_backoff_s)
        if entry is not None and now < deadline:
            wait = min(wait, deadline - now)
        return max(wait, 0.0)
    assert entry is not None
    due = min(entry.fetched_at + settings.refresh_interval_s, deadline)
    wait = max(due - now, 0.0)
    return wait - wait * settings.jitter_fraction * jitter


# --- metrics ----------------------------------------------------------------------------


class CollateralMetrics:
    """``ee_collateral_*``: fetches and failures (counters), age and time left (gauges,
    computed at scrape time from the cache)."""

    def __init__(self, registry: CollectorRegistry, cache: Callable[[], dict[bytes, CacheEntry]],
                 clock: Callable[[], float]) -> None:
        self.fetches = Counter("ee_collateral_fetches_total",
                               "Collateral fetched from PCS/PCCS and accepted", ["fmspc"],
                               registry=registry)
        self.failures = Counter("ee_collateral_fetch_failures_total",
                                "Collateral fetches that failed or were refused, by kind",
                                ["fmspc", "kind"], registry=registry)
        registry.register(_Gauges(cache, clock))


class _Gauges(Collector):
    def __init__(self, cache: Callable[[], dict[bytes, CacheEntry]],
                 clock: Callable[[], float]) -> None:
        self.cache = cache
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self.clock()
        age = GaugeMetricFamily("ee_collateral_age_seconds",
                                "Seconds since the cached collateral was fetched", labels=["fmspc"])
        left = GaugeMetricFamily("ee_collateral_valid_seconds",
                                 "Seconds until the cached collateral's next update (negative: "
                                 "stale)", labels=["fmspc"])
        for fmspc, entry in sorted(self.cache().items()):
            age.add_metric([fmspc.hex().upper()], now - entry.fetched_at)
            left.add_metric([fmspc.hex().upper()], entry.next_update - now)
        yield age
        yield left


# --- the refresher ----------------------------------------------------------------------


def _cache_path(directory: Path, fmspc: bytes) -> Path:
    return directory / f"{fmspc.hex().upper()}.json"


def save_entry(directory: Path, entry: CacheEntry) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = _cache_path(directory, entry.fmspc)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fetched_at": entry.fetched_at,
                               "collateral": entry.collateral.to_json()}))
    tmp.replace(path)


def load_entry(directory: Path, fmspc: bytes, anchors: TrustAnchors, now: float
               ) -> CacheEntry | None:
    """A cached copy from disk, checked again; None when absent or unusable."""
    path = _cache_path(directory, fmspc)
    try:
        doc = json.loads(path.read_text())
        # Windows are checked at the fetch time: a stale copy still loads (`freshness`
        # then says it is stale).
        fetched_at = float(doc["fetched_at"])
        entry = admit_fetched(fmspc, Collateral.from_json(doc["collateral"]), anchors,
                              now=min(now, fetched_at))
        return attrs.evolve(entry, fetched_at=fetched_at)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, CollateralFormatError, PccsError) as exc:
        log.warning("ignoring cached collateral %s: %s", path, exc)
        return None


class Offload(Protocol):
    """How blocking work runs (`trio.to_thread.run_sync`; tests on an autojump clock
    run it inline so that virtual time does not jump while a thread works)."""

    async def __call__(self, fn: Callable[[], _T], /) -> _T: ...


class CollateralSource(Protocol):
    """Where collateral comes from (`ee.attestation.pccs.PccsClient`)."""

    async def fetch(self, fmspc: bytes, *, ca: str = "platform") -> Collateral: ...


class CollateralRefresher:
    """Keeps `cache` filled for *fmspcs* from one PCS/PCCS (a supervised CP child)."""

    def __init__(self, client: CollateralSource, fmspcs: Sequence[bytes],
                 roots: Iterable[x509.Certificate], settings: RefreshSettings, *,
                 registry: CollectorRegistry, emit: Callable[[str, str, Any], None],
                 directory: Path | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 offload: Offload = trio.to_thread.run_sync) -> None:
        self.client = client
        self.fmspcs = tuple(dict.fromkeys(fmspcs))
        self.anchors = TrustAnchors(roots)
        self.settings = settings
        self.emit = emit
        self.directory = directory
        self.clock = clock
        self.rng = rng or random.Random()
        self.cache: dict[bytes, CacheEntry] = {}
        self.last_error: dict[bytes, str] = {}
        self.metrics = CollateralMetrics(registry, lambda: self.cache, clock)
        self.attempts = 0
        self.offload = offload  # CPU work (signature checks) off the event loop

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load copies from disk, try one fetch per FMSPC, report started, keep refreshing."""
        failures: dict[bytes, int] = {}
        for fmspc in self.fmspcs:
            if self.directory is not None:
                entry = await self.offload(functools.partial(
                    load_entry, self.directory, fmspc, self.anchors, self.clock()))
                if entry is not None:
                    self.cache[fmspc] = entry
            failures[fmspc] = 0 if await self.refresh(fmspc) else 1
        task_status.started()
        async with trio.open_nursery() as nursery:
            for fmspc in self.fmspcs:
                nursery.start_soon(self._loop, fmspc, failures[fmspc])

    async def _loop(self, fmspc: bytes, failures: int) -> None:
        while True:
            await trio.sleep(plan(self.cache.get(fmspc), self.clock(), failures, self.settings,
                                  self.rng.random()))
            failures = 0 if await self.refresh(fmspc) else failures + 1

    async def refresh(self, fmspc: bytes) -> bool:
        """One fetch; True when it replaced the cached copy."""
        label = fmspc.hex().upper()
        self.attempts += 1
        try:
            collateral = await self.client.fetch(fmspc, ca=self.settings.ca)
            now = self.clock()
            entry = await self.offload(
                lambda: admit_fetched(fmspc, collateral, self.anchors, now=now))
        except PccsError as exc:
            self.metrics.failures.labels(label, exc.kind).inc()
            self.last_error[fmspc] = str(exc)
            cached = freshness(self.cache.get(fmspc), self.clock())
            log.warning("collateral for FMSPC %s: %s (serving: %s)", label, exc, cached)
            self.emit("collateral.fetch_failed", label, {"kind": exc.kind, "error": str(exc),
                                                        "cached": cached})
            return False
        self.cache[fmspc] = entry
        self.last_error.pop(fmspc, None)
        self.metrics.fetches.labels(label).inc()
        self.emit("collateral.refreshed", label, {"next_update": entry.next_update})
        if self.directory is not None:
            try:
                directory = self.directory
                await self.offload(lambda: save_entry(directory, entry))
            except OSError as exc:
                log.warning("cannot keep collateral for FMSPC %s on disk: %s", label, exc)
        return True

    def choose(self, now: float) -> tuple[Collateral | None, float | None]:
        """What registration uses now: (collateral, grace instant for a warn-stale judge).

        One FMSPC at a time: the first configured one with cached collateral (the
        verifier refuses collateral of another FMSPC than the quote's PCK names).
        """
        for fmspc in self.fmspcs:
            entry = self.cache.get(fmspc)
            state = freshness(entry, now)
            if entry is None or state == "missing":
                continue
            if (state == "stale" and self.settings.stale == "warn"
                    and now - entry.next_update <= self.settings.grace_s):
                return entry.collateral, entry.next_update - 1
            return entry.collateral, None
        return None, None

    def describe(self, now: float) -> list[dict[str, Any]]:
        out = []
        for fmspc in self.fmspcs:
            entry = self.cache.get(fmspc)
            out.append({
                "fmspc": fmspc.hex().upper(),
                "state": freshness(entry, now),
                "fetched_at": entry.fetched_at if entry else None,
                "next_update": entry.next_update if entry else None,
                "last_error": self.last_error.get(fmspc),
            })
        return out


@attrs.frozen
class GraceJudge(Judge):
    """Judges at the stale collateral's last valid instant (stale policy ``warn``) and
    marks every admitted agent with a ``collateral_stale`` violation."""

    grace_at: float = 0.0

    def _stale(self, now: float) -> str:
        return (f"collateral_stale: collateral expired {int(now - self.grace_at)} s ago; "
                "admitted on the stale copy (stale policy warn)")

    def admit(self, msg: Register, nonce: bytes, *, now: float,
              known: Identity | None = None) -> Admission:
        admission = super().admit(msg, nonce, now=min(now, self.grace_at), known=known)
        if admission.identity is None:
            return admission
        identity = attrs.evolve(admission.identity, verdict="warn", verified_at=now,
                                violations=(*admission.identity.violations, self._stale(now)))
        return attrs.evolve(admission, identity=identity)

    def reattest(self, quote: bytes, nonce: bytes, identity: Identity, *,
                 now: float) -> Refusal | None:
        return super().reattest(quote, nonce, identity, now=min(now, self.grace_at))

    def reattest_answer(self, answer: Attestation, nonce: bytes, identity: Identity, *,
                        now: float) -> Refusal | None:
        return super().reattest_answer(answer, nonce, identity, now=min(now, self.grace_at))
