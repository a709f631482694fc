"""Metering and charging: what runs, minute by minute, paid from the tenant's balance.

Theory of operation
-------------------
*Money* is integer minor units (cents of USD) everywhere; prices are integer
micro-dollars per hour. A node size costs ``vcpus x vcpu + GiB x memory + gpu x GPU``
micro-dollars an hour, times the SLA multiplier (per mille); a minute of it is the
exact rational ``r`` cents (:class:`fractions.Fraction`, never a float). Window ``w``
(the unix minute) is charged ``floor(r*(w+1)) - floor(r*w)`` cents: each window's
amount depends on nothing but the price and the window, so any writer computes the
same amount for it, and consecutive windows telescope to the exact total (less than a
cent short, ever). The platform's fee (``platform_fee_bp`` basis points) telescopes
the same way, over the cumulative amount, so it is never lost to rounding on small
charges and never more than a window's amount; the provider who owns the capacity
gets the rest.

*Metering* (:func:`plan_observation`, pure): each tick samples the replicas the agents'
reports show running (a replica of the AppActor's deployment, state ``running``, on an
agent that is not offline) and keeps a durable *run* per replica: opened when first
seen running, its last sighting moved forward on each tick, closed when a report
shows it stopped or lost (its agent connected here and not listing it running, or
offline). A replica not seen because its agent is not (yet) connected to this CP is
neither: after a CP restart the run stays open, and when the agent's snapshot shows
the replica still running, every window in between is charged — the reports show it
ran throughout. After ``max_gap_windows`` without a sighting, the run is closed at its
last sighting instead.

*Charging* (:func:`plan_charges`, pure): a closed run is charged through its last
sighting, an open one through the window before the current one (windows are charged
once complete). The ledger (:mod:`ee.cp.store.ledger`) writes each window at most once
(its UNIQUE key), so a restart, a crash mid-pass (the pass is one database
transaction) or a second CP charging the same runs never double-charges. The runs,
the windows and the ledger live in the durable store, not in history: wiping the
history store changes nothing here.

*Funds*: a tenant whose balance falls below ``low_balance_minor`` gets a
``billing.low_balance`` event and a hold (durable, with the time it started); after
``grace_s`` its running deployments are stopped through the ordinary undeploy path,
one ``billing.suspended`` event each, and kept stopped while the hold lasts. A credit
that brings the balance back clears the hold (``billing.resumed``); it restarts nothing.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from fractions import Fraction
from math import floor
from typing import Any, Final, Literal

import attrs
import trio

from ee.cp.nodes import NodeSize
from ee.cp.records import RecordStore, RecordStoreError
from ee.cp.store import ledger
from ee.cp.store.backend import Retryable
from ee.cp.store.ledger import PassResult, Run, RunAdvance, WindowCharge
from ee.protocol.strict import check

log = logging.getLogger("ee.cp.billing")

WINDOW_S: Final = 60
MICRO_PER_MINOR: Final = 10_000  # micro-dollars in a cent
PRICE_LIMIT: Final = 10**9


def _is_rate(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= PRICE_LIMIT


def _is_bp(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10_000


_rate = check(_is_rate, f"must be an integer 0..{PRICE_LIMIT}")
_bp = check(_is_bp, "must be an integer 0..10000 (basis points)")


def _tolerance(_inst: object, _attr: object, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 3600):
        raise ValueError(f"billing.webhook_tolerance_s must be an integer 1..3600 (seconds),"
                         f" got {value!r}")


MIN_WEBHOOK_SECRET: Final = 32  # bytes, stripped
MAX_WEBHOOK_SECRET: Final = 4096
_currency = check(lambda v: v in ledger.CURRENCIES,
                  f"must be one of {', '.join(sorted(ledger.CURRENCIES))}")


@attrs.frozen
class Prices:
    """A price book's content (``PUT /api/v2/admin/prices``; integers only)."""

    vcpu_hour_micro: int = attrs.field(default=40_000, validator=_rate)  # $0.04
    gib_hour_micro: int = attrs.field(default=5_000, validator=_rate)  # $0.005
    gpu_hour_micro: int = attrs.field(default=500_000, validator=_rate)  # $0.50
    sla_multiplier_milli: int = attrs.field(default=1000, validator=_rate)
    platform_fee_bp: int = attrs.field(default=1000, validator=_bp)  # 10 %
    currency: str = attrs.field(default="USD", validator=_currency)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class PriceBook:
    version: int
    prices: Prices

    def minute_rate(self, size: NodeSize) -> Fraction:
        """Minor units per minute of *size* (exact)."""
        p = self.prices
        hourly_micro = (size.vcpus * p.vcpu_hour_micro
                        + Fraction(size.memory_mb, 1024) * p.gib_hour_micro
                        + (p.gpu_hour_micro if size.gpu else 0))
        return hourly_micro * Fraction(p.sla_multiplier_milli, 1000) / 60 / MICRO_PER_MINOR

    def window_amount(self, size: NodeSize | None, window: int) -> int:
        return self.window_split(size, window)[0]

    def window_split(self, size: NodeSize | None, window: int) -> tuple[int, int]:
        """(amount, platform fee) of *window* for *size*: both telescope (the fee is
        the fee share of the cumulative amount, rounded down, differenced), so a small
        per-minute charge still pays the platform its share over time, and the fee is
        never more than the amount."""
        if size is None:
            return 0, 0
        rate = self.minute_rate(size)
        before, after = floor(rate * window), floor(rate * (window + 1))
        share = Fraction(self.prices.platform_fee_bp, 10_000)
        return after - before, floor(share * after) - floor(share * before)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, **self.prices.to_dict()}


# ---- metering (pure) ---------------------------------------------------------------


@attrs.frozen
class Sighting:
    """A replica the agents' reports show running now."""

    deployment_id: str
    replica_id: str  # the agent id
    account_id: str
    node_size: str
    provider: str  # ledger account of who owns the capacity


@attrs.frozen
class Observation:
    new: tuple[Run, ...]
    seen: tuple[tuple[Run, int], ...]
    closed: tuple[Run, ...]


def plan_observation(open_runs: Sequence[Run], sightings: Sequence[Sighting],
                     present: frozenset[str] | set[str], window: int,
                     max_gap_windows: int) -> Observation:
    """What one meter tick writes (see the module docstring). *present*: the agents
    this CP has a view of (connected, or known offline)."""
    by_key = {(s.deployment_id, s.replica_id): s for s in sightings}
    new: list[Run] = []
    seen: list[tuple[Run, int]] = []
    closed: list[Run] = []
    covered: set[tuple[str, str]] = set()
    for run in open_runs:
        key = (run.deployment_id, run.replica_id)
        stale = window - run.seen_window > max_gap_windows
        if key in by_key and not stale:
            seen.append((run, window))
            covered.add(key)
        elif key in by_key or stale or run.replica_id in present:
            closed.append(run)
    for key, s in sorted(by_key.items()):
        if key not in covered:
            new.append(Run(s.deployment_id, s.replica_id, window, s.account_id, s.node_size,
                           s.provider, window, window - 1, False))
    return Observation(tuple(new), tuple(seen), tuple(closed))


def plan_charges(runs: Sequence[Run], window: int, book: PriceBook,
                 sizes: Mapping[str, NodeSize], max_windows: int
                 ) -> tuple[list[WindowCharge], list[RunAdvance]]:
    """The windows due (closed runs through their last sighting, open ones through the
    window before *window*), at most *max_windows* of them, and how far each run is
    then charged."""
    charges: list[WindowCharge] = []
    advances: list[RunAdvance] = []
    for run in runs:
        due = run.seen_window if run.closed else min(run.seen_window, window - 1)
        last = min(due, run.charged_through + max(0, max_windows - len(charges)))
        if last <= run.charged_through:
            continue
        size = sizes.get(run.node_size)
        for w in range(run.charged_through + 1, last + 1):
            amount, fee = book.window_split(size, w)
            charges.append(WindowCharge(run.deployment_id, run.replica_id, w,
                                        run.account_id, run.node_size, run.provider,
                                        book.version, amount, fee, book.prices.currency))
        advances.append(RunAdvance(run.deployment_id, run.replica_id, run.started_window,
                                   last))
    return charges, advances


HoldAction = Literal["none", "warn", "keep", "suspend", "enforce", "clear"]


def hold_step(balance: int, threshold: int, hold: tuple[int, int | None] | None, now: int,
              grace_s: int) -> HoldAction:
    """What to do about one account's funds (pure). *hold*: (low since, suspended at)."""
    if balance >= threshold:
        return "clear" if hold is not None else "none"
    if hold is None:
        return "warn"
    low_since, suspended_at = hold
    if suspended_at is not None:
        return "enforce"
    return "suspend" if now - low_since >= grace_s else "keep"


# ---- the service -----------------------------------------------------------------


@attrs.frozen
class BillingSettings:
    interval_s: float = 20.0
    grace_s: int = 3600
    low_balance_minor: int = 0
    max_gap_windows: int = 1440
    max_windows_per_pass: int = 200_000
    prices: Prices = Prices()
    webhook_secret_file: str | None = None
    webhook_tolerance_s: int = attrs.field(default=300, validator=_tolerance)
    datacenter_owners: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_config(cls, doc: Mapping[str, Any] | None) -> BillingSettings:
        """The settings, checked: a webhook secret file that cannot be read or holds
        under :data:`MIN_WEBHOOK_SECRET` bytes is refused here, at config and start."""
        doc = dict(doc or {})
        try:
            prices = Prices(**doc.pop("prices", {}))
            settings = cls(prices=prices, **doc)
        except TypeError as exc:
            raise ValueError(f"billing: {exc}") from None
        if settings.webhook_secret_file:
            read_webhook_secret(settings.webhook_secret_file)
        return settings


class WebhookSecretError(ValueError):
    """The payment webhook's secret file is unreadable or too short to sign with."""


def read_webhook_secret(path: str) -> bytes:
    """The webhook secret in *path*, stripped; :class:`WebhookSecretError` when the file
    cannot be read or holds under :data:`MIN_WEBHOOK_SECRET` bytes (an empty secret
    would let anyone sign a payment)."""
    try:
        with open(path, "rb") as f:
            secret = f.read(MAX_WEBHOOK_SECRET + 1).strip()
    except OSError as exc:
        raise WebhookSecretError(
            f"billing.webhook_secret_file {path!r} cannot be read: {exc.strerror}") from None
    if not MIN_WEBHOOK_SECRET <= len(secret) <= MAX_WEBHOOK_SECRET:
        raise WebhookSecretError(
            f"billing.webhook_secret_file {path!r} must hold {MIN_WEBHOOK_SECRET}.."
            f"{MAX_WEBHOOK_SECRET} bytes of secret (surrounding whitespace stripped), "
            f"not {len(secret)}: write a random secret, e.g. `openssl rand -hex 32`")
    return secret


@attrs.frozen
class BillingDeps:
    store: Callable[[], RecordStore | None]  # the durable store, once open
    sightings: Callable[[], Awaitable[tuple[list[Sighting], set[str]]]]
    stop_account: Callable[[str], Awaitable[list[str]]]  # → deployments it stopped
    emit: Callable[[str, str, Mapping[str, Any]], None]
    sizes: Mapping[str, NodeSize]
    cp_name: str = "cp"
    wall: Callable[[], float] = time.time  # unix time: windows outlive the process


def at_text(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).replace(tzinfo=None).isoformat(
        timespec="microseconds") + "Z"


class Billing:
    def __init__(self, settings: BillingSettings, deps: BillingDeps) -> None:
        self.settings = settings
        self.deps = deps
        self.last_pass: dict[str, Any] | None = None

    async def suspended(self, account_id: str) -> bool:
        """Whether the account's deployments were stopped for insufficient funds."""
        return bool(await self._db(lambda conn: ledger.suspended(conn, account_id)))

    async def _db(self, work: Callable[[Any], Any]) -> Any:
        store = self.deps.store()
        if store is None:
            raise RecordStoreError("durable store", "not open yet")
        for attempt in range(5):
            try:
                return await store._call(work)
            except Retryable:
                if attempt == 4:
                    raise
                await trio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def price_book(self) -> PriceBook:
        """The current price book (the configured one becomes version 1 if none)."""
        now = at_text(self.deps.wall())
        books = await self._db(lambda c: ledger.price_books(c, 1))
        if not books:
            await self._db(lambda c: ledger.add_price_book(
                c, self.settings.prices.to_dict(), "config", now, only_if_none=True))
            books = await self._db(lambda c: ledger.price_books(c, 1))
        version, _, _, doc = books[0]
        return PriceBook(version, Prices(**doc))

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.settings.interval_s)
            try:
                await self.tick()
            except (RecordStoreError, Retryable) as exc:
                log.warning("billing tick failed (retried next tick): %s", exc)

    async def tick(self) -> PassResult:
        """One meter tick: observe what runs and charge what is due (one database
        transaction: a crash leaves neither or both), then act on low balances."""
        sightings, present = await self.deps.sightings()
        result = await self.charge_pass(int(self.deps.wall() // WINDOW_S), sightings,
                                        frozenset(present))
        await self.enforce_funds()
        return result

    async def charge_pass(self, window: int, sightings: Sequence[Sighting] | None = None,
                          present: frozenset[str] = frozenset()) -> PassResult:
        """Observe *sightings* (None: observe nothing) and charge every due window."""
        book = await self.price_book()
        s = self.settings
        actor = f"meter:{self.deps.cp_name}"
        now = at_text(self.deps.wall())

        def work(conn: Any) -> PassResult:
            with conn.transaction():
                if sightings is not None:
                    plan = plan_observation(ledger.open_runs(conn), sightings, present,
                                            window, s.max_gap_windows)
                    ledger.observe_in(conn, plan.new, plan.seen, plan.closed)
                charges, advances = plan_charges(ledger.runs_to_charge(conn), window, book,
                                                 self.deps.sizes, s.max_windows_per_pass)
                result = ledger.charge_in(conn, charges, advances, actor, now)
                if result.windows:
                    ledger.record_pass(conn, now, self.deps.cp_name, result, 0)
                return result

        started = trio.current_time()
        result: PassResult = await self._db(work)
        ms = round((trio.current_time() - started) * 1000)
        self.last_pass = {"at": now, "windows": result.windows,
                          "amount_minor": result.amount, "duration_ms": ms}
        if result.windows:
            self.deps.emit("billing.charged", self.deps.cp_name, self.last_pass)
        return result

    async def enforce_funds(self) -> None:
        s = self.settings
        now = int(self.deps.wall())
        low = await self._db(lambda c: [
            (a.removeprefix("tenant:"), b) for a, cur, b in ledger.balances(c, "tenant:")
            if cur == s.prices.currency])
        held = await self._db(ledger.holds)
        balances = dict(low)
        for account_id in sorted(set(balances) | set(held)):
            balance = balances.get(account_id, 0)
            hold = held.get(account_id)
            action = hold_step(balance, s.low_balance_minor, hold, now, s.grace_s)
            if action == "warn":
                await self._db(functools.partial(ledger.set_hold, account_id=account_id,
                                                 low_since=now, suspended_at=None))
                self.deps.emit("billing.low_balance", account_id, {
                    "balance_minor": balance, "threshold_minor": s.low_balance_minor,
                    "grace_s": s.grace_s})
            elif action in ("suspend", "enforce"):
                assert hold is not None
                if action == "suspend":
                    await self._db(functools.partial(ledger.set_hold, account_id=account_id,
                                                     low_since=hold[0], suspended_at=now))
                for deployment_id in await self.deps.stop_account(account_id):
                    self.deps.emit("billing.suspended", deployment_id, {
                        "account_id": account_id, "balance_minor": balance})
            elif action == "clear":
                await self._db(functools.partial(ledger.clear_hold, account_id=account_id))
                self.deps.emit("billing.resumed", account_id, {"balance_minor": balance})


# ---- what the CP's actors say runs -------------------------------------------------


def order_owners(orders: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """VM name → the provisioner whose launch order brought it (pure). Only
    ``registered_vm`` counts: the CP sets it when a VM registers with that order's
    bootstrap token, while ``vm_name`` is whatever the provisioner reported at fulfil
    (it could name another provider's VM). A VM that two orders name belongs to
    neither: it falls back to the datacenter's owner, else the platform."""
    named: dict[str, list[str | None]] = {}
    for order in orders:
        vm = order.get("registered_vm")
        if vm:
            claimed = order.get("claimed_by")
            named.setdefault(str(vm), []).append(str(claimed) if claimed else None)
    return {vm: owners[0] for vm, owners in named.items()
            if len(owners) == 1 and owners[0] is not None}


async def cp_sightings(registry: Any, deployment_index: Mapping[str, str],
                       agent_views: Callable[[], Awaitable[list[dict[str, Any]]]] | None,
                       order_views: Callable[[], Awaitable[list[dict[str, Any]]]],
                       owners: Mapping[str, str], *,
                       agent_ids: Callable[[], Iterable[str]] | None = None,
                       views_of: Callable[[Iterable[str]], list[dict[str, Any]]] | None = None,
                       ) -> tuple[list[Sighting], set[str]]:
    """Running replicas per the AppActors (members that passed the stray and hash
    checks, state ``running``) on agents whose own view is not offline; and the agents
    this CP has a view of. The provider is the provisioner whose launch order brought
    the agent's VM (:func:`order_owners`), else the datacenter's configured owner, else
    the platform.

    With *agent_ids* (the agents this CP has a view of) and *views_of* (the views of
    the agents named), only the agents a running replica names are rendered, not every
    agent (a tick at 10,000 agents and a few deployments); else *agent_views* gives
    every agent's view.

    A dc names its agents itself: an agent id that another dc's deployments (or a
    direct one's) also name is never made present by it, so a dc cannot close another
    dc's (or a direct agent's) open runs by claiming their agents' ids.

    At a dc CP, the deployments it runs for its master (the reserved account
    ``FEDERATED_ACCOUNT``) are not metered: the master bills their tenants from this
    dc's reports (charged here too, the reserved account would run into debt and have
    every deployment of the master suspended)."""
    from ee.actors.app import GetDeployment
    from ee.federation.placement import FEDERATED_ACCOUNT
    from ee.runtime import ActorError

    deps: list[tuple[str, str, dict[str, Any]]] = []
    for deployment_id, app_key in sorted(deployment_index.items()):
        name = f"app/{app_key}"
        if name not in registry or app_key.startswith(f"{FEDERATED_ACCOUNT}."):
            continue
        try:
            dep = await registry.ref(name).ask(GetDeployment(deployment_id), timeout=5)
        except ActorError:
            continue
        if dep is not None:
            deps.append((deployment_id, app_key.split(".", 1)[0], dep))
    if agent_ids is not None and views_of is not None:
        present = set(agent_ids())
        running = {r["agent_id"] for _, _, dep in deps if dep.get("federated") is None
                   for r in dep["replicas"] if r["state"] == "running"}
        views = {v["agent_id"]: v for v in views_of(running)}
    elif agent_views is not None:
        views = {v["agent_id"]: v for v in await agent_views()}
        present = set(views)
    else:
        raise TypeError("cp_sightings needs agent_views, or agent_ids and views_of")
    by_vm = order_owners(await order_views()) if views else {}
    claims: dict[str, set[str]] = {}  # agent id -> the dcs ("": direct) naming it
    for _, _, dep in deps:
        where = str((dep.get("federated") or {}).get("datacenter", ""))
        for replica in dep["replicas"]:
            claims.setdefault(str(replica["agent_id"]), set()).add(where)
    shared = {agent_id for agent_id, where in claims.items() if len(where) > 1}
    out: list[Sighting] = []
    for deployment_id, account_id, dep in deps:
        fed = dep.get("federated")
        if fed is not None:
            out.extend(_dc_sightings(deployment_id, account_id, dep, owners, present,
                                     shared))
            continue
        for replica in dep["replicas"]:
            view = views.get(replica["agent_id"])
            if replica["state"] != "running" or view is None or view["status"] == "offline":
                continue
            owner = by_vm.get(str(view.get("vm_name"))) or owners.get(
                str(view.get("datacenter")))
            provider = ledger.provider_account(owner) if owner else ledger.PLATFORM_REVENUE
            out.append(Sighting(deployment_id, replica["agent_id"], account_id,
                                str(view.get("node_size")), provider))
    return out, present


def _dc_sightings(deployment_id: str, account_id: str, dep: Mapping[str, Any],
                  owners: Mapping[str, str], present: set[str],
                  shared: frozenset[str] | set[str] = frozenset()) -> list[Sighting]:
    """A deployment a dc CP runs for this master (``MasterFederation.view``): its running
    replicas as the dc reported them (agents that dc reported as its own, the compose
    hash the intent's, node size as that dc reported the agent, the agent not reported
    offline). A degraded dc's replicas are neither seen nor present: their runs stay
    open, and are charged through the windows its reports show when it is back (as for
    an agent away). The dc's word is capped by the tenant's: at most the replicas
    wanted (one more while an update rolls: its surge), none once stopping, so a dc
    reporting more replicas than it was given never bills the tenant for them."""
    fed = dep["federated"]
    if fed.get("degraded"):
        return []
    label = str(fed.get("datacenter"))
    owner = owners.get(label)
    provider = ledger.provider_account(owner) if owner else ledger.PLATFORM_REVENUE
    update = dep.get("update") or {}
    cap = 0 if dep.get("desired") == "stopped" else int(dep.get("replicas_wanted") or 0) + (
        1 if update.get("state") == "rolling" else 0)
    out: list[Sighting] = []
    for replica in dep["replicas"]:
        if replica["agent_id"] not in shared:  # (*shared*: named elsewhere too)
            present.add(replica["agent_id"])
        if replica["state"] == "running" and replica.get("node_size") and len(out) < cap:
            out.append(Sighting(deployment_id, replica["agent_id"], account_id,
                                str(replica["node_size"]), provider))
    return out


async def stop_account_deployments(registry: Any, deployment_index: Mapping[str, str],
                                   account_id: str) -> list[str]:
    """Stop (the tenant's own undeploy path) every deployment of *account_id* that is
    meant to run; the ids stopped."""
    from ee.actors.app import GetDeployment, StopDeployment
    from ee.runtime import ActorError

    stopped = []
    for deployment_id, app_key in sorted(deployment_index.items()):
        if not app_key.startswith(f"{account_id}.") or f"app/{app_key}" not in registry:
            continue
        ref = registry.ref(f"app/{app_key}")
        try:
            view = await ref.ask(GetDeployment(deployment_id), timeout=5)
            if view is None or view.get("desired") == "stopped":
                continue
            await ref.ask(StopDeployment(deployment_id), timeout=30)
        except ActorError as exc:
            log.warning("billing: cannot stop %s: %s", deployment_id, exc)
            continue
        stopped.append(deployment_id)
    return stopped


__all__ = ["Billing", "BillingDeps", "BillingSettings", "PriceBook", "Prices", "Sighting",
           "WebhookSecretError", "cp_sightings", "hold_step", "order_owners", "plan_charges",
           "plan_observation", "read_webhook_secret", "stop_account_deployments"]


async def pool_orders(registry: Any, keys: Any) -> list[dict[str, Any]]:
    """Every pool's launch orders (finished ones too: they name who made a VM)."""
    from ee.actors.pool import ListOrders
    from ee.runtime import ActorError

    out: list[dict[str, Any]] = []
    for key in keys:
        try:
            out.extend(await registry.ref(key.actor_name).ask(ListOrders(True), timeout=10))
        except ActorError:
            continue
    return out
