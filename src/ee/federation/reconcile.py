"""A dc CP runs the deployment intents of the master's signed snapshot.

Intents arrive only in a snapshot whose signature verified with the pinned master key
(``DcFederation.offer_snapshot``/``apply_snapshot``): nothing else creates them. Each
intent with ``datacenter`` equal to this dc's label becomes, under the reserved account
(``FEDERATED_ACCOUNT``), an app ``federated.<master app key>`` with the intent's version,
and a local deployment with the master's deployment id, run by today's AppActor (so the
dc picks the agent, with today's placement and reason codes). An intent that names
another dc, or is stopped, stops the local deployment; a local deployment of the reserved
account that no intent names is stopped too (it was moved, or never came from the
master).

After every pass the outcome of each intent (``placed``, ``running``, ``unsatisfiable``
with the placement reason codes, ``failed``, ``stopped``) is spooled as a ``placement``
event when it changed since the last one sent (all of them again after a reconnection,
so a master that restarted learns them). The event carries the local deployment as the
tenant would see it here (replicas with their agent, VM, node size, state and compose
hash; version, update, failure and failure count), so the master can show and bill it.

A changed intent (a master PATCH or rollback: its ``generation`` grows) is applied with
the local AppActor's own ``UpdateDeployment`` (a rollback whose target is the local
previous version: ``RollbackDeployment``), the rolling update a direct deployment gets.
A generation is applied once per reconciler life (``applied``): a dc whose health gate
rolled the update back does not retry it every pass; a restarted dc applies the intent
once more (a no-op when the local deployment already runs it).

Stuck: an intent placed here whose local deployment later cannot be kept placed (a
replica failed or its agent left, and no agent here fits: the AppActor is back in
``placing`` with fewer active replicas than wanted) for ``stuck_after_s`` without a
break is reported ``unsatisfiable`` with ``UNPLACED_REPLICAS`` (``stuck_for``), so the
master tries another dc. A deployment merely starting (its replicas pending, pulling,
starting) is never stuck; any pass that finds it placed again restarts the clock, so a
brief shortfall never moves it. The bound is well under the AppActor's own placing
timeout (``DeploySettings.placing_s``), which would fail it here for good.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final

import attrs
import trio

from ee.actors.app import (
    AddVersion,
    CreateDeployment,
    GetDeployment,
    RollbackDeployment,
    StopDeployment,
    UpdateDeployment,
)
from ee.actors.directory import AgentDirectory
from ee.federation.placement import FEDERATED_ACCOUNT, UNPLACED_REPLICAS, reason_counts
from ee.placement import MAX_REPLICAS, Constraints, ConstraintsError
from ee.runtime import ActorError, Registry

log = logging.getLogger("ee.federation")

INTENT_REFUSED = "intent_refused"


@attrs.frozen
class LocalApps:
    """What the dc CP lends the reconciler: its app creation, registry and index."""

    create_app: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
    registry: Registry
    index: MutableMapping[str, str]  # deployment id -> app key
    directory: AgentDirectory | None = None  # the replicas' VM names and node sizes


def local_key(master_app_key: str) -> str:
    return f"{FEDERATED_ACCOUNT}.{master_app_key}"


class IntentError(ValueError):
    pass


@attrs.frozen
class Intent:
    deployment_id: str
    app: str  # the master's app key
    version: dict[str, Any]
    replicas: int
    constraints: Constraints
    running: bool
    generation: int = 0  # grows with every master PATCH / rollback
    change: str = "create"  # what made this generation: create | update | rollback


def read_intent(deployment_id: str, doc: Any, label: str) -> Intent | None:
    """An intent for *label* (None: another dc's), or ``IntentError``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("app"), str) \
            or not isinstance(doc.get("version"), dict):
        raise IntentError("intent needs app and version")
    if doc.get("datacenter") != label:
        return None
    version = doc["version"]
    for field, kind in (("version", str), ("compose_hash", str), ("compose", str),
                        ("expose_port", int), ("health_path", str)):
        if not isinstance(version.get(field), kind):  # what a deploy frame is made of
            raise IntentError(f"version needs {field}")
    replicas = doc.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) \
            or not 1 <= replicas <= MAX_REPLICAS:
        raise IntentError("replicas out of range")
    try:
        c = Constraints.from_json(doc.get("constraints") or {})
    except ConstraintsError as exc:
        raise IntentError(f"constraints: {exc}") from None
    generation = doc.get("generation") or 0
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise IntentError("generation must be a count")
    change = doc.get("change") or "create"
    if change not in ("create", "update", "rollback"):
        raise IntentError("change must be create, update or rollback")
    return Intent(deployment_id, doc["app"], version, replicas,
                  attrs.evolve(c, datacenter=label), doc.get("desired") == "running",
                  generation, change)


def outcome_of(view: Mapping[str, Any] | None, replicas: int) -> tuple[str, int, str | None]:
    """(outcome, running replicas, error) from a local deployment view."""
    if view is None:
        return "stopped", 0, None
    running = sum(1 for r in view.get("replicas") or () if r.get("state") == "running")
    state = view.get("state")
    if state == "stopped":
        return "stopped", 0, None
    if state == "failed":
        return "failed", running, view.get("error")
    if state == "running" and running >= replicas:
        return "running", running, None
    return "placed", running, view.get("error")


STUCK_AFTER_S: Final = 60.0  # short of agents this long without a break: unsatisfiable


def unplaced(view: Mapping[str, Any] | None) -> int:
    """Replicas the local deployment wants but has no agent for: 0 unless it is back in
    ``placing`` (the AppActor found no agent for a missing replica) while running is
    desired; replicas pending, pulling or starting count as placed."""
    if view is None or view.get("desired") != "running" or view.get("state") != "placing":
        return 0
    active = sum(1 for r in view.get("replicas") or ()
                 if r.get("state") not in ("failed", "stopped"))
    wanted = view.get("replicas_wanted")
    return max(0, (wanted if isinstance(wanted, int) else 0) - active)


def stuck_for(since: float | None, missing: int, now: float, bound: float
              ) -> tuple[float | None, bool]:
    """(when the shortfall began, or None; whether it has lasted *bound* seconds)."""
    if missing <= 0:
        return None, False
    began = now if since is None else since
    return began, now - began >= bound


MAX_REPORT_TEXT = 300


def local_state(view: Mapping[str, Any] | None, directory: AgentDirectory | None
                ) -> dict[str, Any]:
    """The local deployment as a ``placement`` event carries it up (bounded: at most
    MAX_REPLICAS replicas, strings capped; the master checks it again)."""
    if view is None:
        return {"replicas": [], "failure": None, "failures": 0, "update": None}
    replicas = []
    for r in list(view.get("replicas") or ())[:MAX_REPLICAS]:
        record = directory.get(r["agent_id"]) if directory is not None else None
        ident = record.identity if record is not None else None
        error = r.get("error")
        replicas.append({"agent_id": r["agent_id"], "state": r["state"],
                         "version": r.get("version") or view.get("version"),
                         "compose_hash": r.get("compose_hash"),
                         "vm_name": ident.vm_name if ident is not None else None,
                         "node_size": ident.node_size if ident is not None else None,
                         # the agent's HTTP API as it registered here (a direct
                         # deployment's replica url)
                         "url": ident.url if ident is not None else None,
                         "error": None if error is None else str(error)[:MAX_REPORT_TEXT]})
    failure = view.get("failure")
    return {"version": view.get("version"), "replicas": replicas,
            "failure": None if not failure else {
                **failure, "lines": [str(x)[:MAX_REPORT_TEXT]
                                     for x in list(failure.get("lines") or ())[-20:]]},
            "failures": int(view.get("failures") or 0), "update": view.get("update")}


class DcReconciler:
    def __init__(self, label: str, local: LocalApps,
                 report: Callable[[dict[str, Any]], Awaitable[None]],
                 emit: Callable[[str, str, Any], None]) -> None:
        self.label = label
        self.local = local
        self.report = report
        self.emit = emit
        self.sent: dict[str, dict[str, Any]] = {}  # last outcome reported, by deployment
        self.applied: dict[str, int] = {}  # deployment -> intent generation applied
        self.refused: set[str] = set()
        self.short_since: dict[str, float] = {}  # deployment -> Trio time (stuck_for)
        self.stuck_after_s = STUCK_AFTER_S
        self.wake = trio.Event()

    def nudge(self, *, resend: bool = False) -> None:
        if resend:
            self.sent.clear()
        self.wake.set()

    async def run(self, desired: Callable[[], Mapping[str, Any]], period: float,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.wake = trio.Event()
            try:
                await self.pass_once(desired())
            except ActorError as exc:  # an app restarting: the next pass tries again
                log.info("federation: reconcile pass: %s", exc)
            with trio.move_on_after(period):
                await self.wake.wait()

    async def pass_once(self, desired: Mapping[str, Any]) -> None:
        intents: dict[str, Intent] = {}
        for dep_id, doc in dict(desired.get("deployments") or {}).items():
            try:
                got = read_intent(dep_id, doc, self.label)
            except IntentError as exc:
                if dep_id not in self.refused:
                    self.refused.add(dep_id)
                    self.emit("federation.refused", "master", {
                        "code": INTENT_REFUSED, "detail": f"{dep_id[:80]}: {exc}"})
                continue
            if got is not None:
                intents[dep_id] = got
        for intent in intents.values():
            await self._one(intent)
        # Local deployments of the reserved account that no intent of ours names.
        for dep_id, key in sorted(self.local.index.items()):
            if key.startswith(f"{FEDERATED_ACCOUNT}.") and dep_id not in intents:
                await self._stop(key, dep_id)

    async def _stop(self, key: str, dep_id: str) -> dict[str, Any] | None:
        name = f"app/{key}"
        if name not in self.local.registry:
            return None
        ref = self.local.registry.ref(name)
        view: dict[str, Any] | None = await ref.ask(GetDeployment(dep_id), timeout=10)
        if view is not None and view.get("desired") != "stopped":
            view = await ref.ask(StopDeployment(dep_id), timeout=30)
            self.emit("federation.intent_stopped", dep_id, {"app": key})
        return view

    async def _one(self, intent: Intent) -> None:
        key = local_key(intent.app)
        dep_id = intent.deployment_id
        reasons: dict[str, int] = {}
        if not intent.running:
            view = await self._stop(key, dep_id)
        else:
            name = f"app/{key}"
            if name not in self.local.registry:
                await self.local.create_app(key, {"app_key": key, "name": intent.app,
                                                  "account_id": FEDERATED_ACCOUNT})
            ref = self.local.registry.ref(name)
            await ref.ask(AddVersion(intent.version), timeout=30)
            view = await ref.ask(GetDeployment(dep_id), timeout=10)
            if view is None:
                made = await ref.ask(CreateDeployment(
                    dep_id, intent.version["version"], intent.replicas,
                    intent.constraints), timeout=60)
                if made.get("error") == "not_placeable":
                    reasons = reason_counts(made["placement"])
                    await self._send(dep_id, "unsatisfiable", reasons, 0, None)
                    return
                if made.get("error"):
                    await self._send(dep_id, "failed", {}, 0, str(made["error"]))
                    return
                self.local.index[dep_id] = key
                self.applied[dep_id] = intent.generation
                self.emit("federation.intent_placed", dep_id, {"app": key})
                view = await ref.ask(GetDeployment(dep_id), timeout=10)
            elif intent.generation > self.applied.get(dep_id, 0):
                view = await self._change(ref, intent, view)
        outcome, running, error = outcome_of(view, intent.replicas)
        missing = unplaced(view) if intent.running else 0
        since, stuck = stuck_for(self.short_since.get(dep_id), missing,
                                 trio.current_time(), self.stuck_after_s)
        if since is None:
            self.short_since.pop(dep_id, None)
        else:
            self.short_since[dep_id] = since
        if stuck:  # the master tries another dc (the view still goes up with it)
            outcome, reasons = "unsatisfiable", {UNPLACED_REPLICAS: missing}
        await self._send(dep_id, outcome, reasons, running, error, view, intent.generation)

    async def _change(self, ref: Any, intent: Intent, view: Mapping[str, Any]
                      ) -> dict[str, Any] | None:
        """Apply a new intent generation with the AppActor's own update machinery."""
        dep_id = intent.deployment_id
        self.applied[dep_id] = intent.generation
        version = str(intent.version["version"])
        msg: RollbackDeployment | UpdateDeployment
        if intent.change == "rollback" and view.get("previous_version") == version \
                and view.get("version") != version:
            msg = RollbackDeployment(dep_id)
        else:
            msg = UpdateDeployment(dep_id, version, intent.replicas)
        result = await ref.ask(msg, timeout=60)
        error = None if result is None else result.get("error")
        self.emit("federation.intent_changed", dep_id, {
            "generation": intent.generation, "change": intent.change, "version": version,
            "replicas": intent.replicas, "error": error})
        got: dict[str, Any] | None = await ref.ask(GetDeployment(dep_id), timeout=10)
        return got

    async def _send(self, dep_id: str, outcome: str, reasons: dict[str, int], running: int,
                    error: str | None, view: Mapping[str, Any] | None = None,
                    generation: int = 0) -> None:
        data = {"deployment_id": dep_id, "outcome": outcome, "reasons": reasons,
                "running": running, "error": None if error is None else error[:500],
                **local_state(view, self.local.directory), "generation": generation}
        if self.sent.get(dep_id) == data:
            return
        self.sent[dep_id] = data
        await self.report(data)
