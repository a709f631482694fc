"""Stand-ins for what the CP gives a CapacityPoolActor: an agent directory, a manifest
store and an event sink — all in memory, all on Trio time."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from ee.actors.pool import PoolDeps
from ee.capacity import PoolKey, PoolSettings

DC = "gcp:us-central1"
SIZE = "standard"
KEY = PoolKey(DC, SIZE)
_IDS = itertools.count(1)  # shared, so a rebuilt deps (a "CP restart") never reuses an id


def agent_view(agent_id: str, *, datacenter: str = DC, node_size: str = SIZE,
               status: str = "online", draining: bool = False, verdict: str | None = "pass",
               health: str = "healthy", deployments: tuple[str, ...] = (),
               vm_name: str | None = None) -> dict[str, Any]:
    """A dict shaped like ``AgentActor.view()`` (the fields a pool reads, and a few more)."""
    return {
        "agent_id": agent_id,
        "vm_name": vm_name or f"vm-{agent_id}",
        "node_size": node_size,
        "datacenter": datacenter,
        "gpu": False,
        "url": None,
        "status": status,
        "lifecycle": "ready",
        "draining": draining,
        "attestation": {"verdict": verdict, "provider": "sim", "mrtd": "00",
                        "tcb_status": "UpToDate", "verified_at": None, "violations": [],
                        "quarantine_reasons": []},
        "deployment": [{"deployment_id": d, "app": "a", "version": "1", "state": "running",
                        "compose_hash": None, "image_digests": {}} for d in deployments],
        "health": {"status": health, "detail": ""},
        "heartbeat_seq": 1,
        "heartbeat_age_s": 0.0,
        "last_heartbeat": None,
    }


class FakeAgentDirectory:
    """Stand-in for the CP's agent directory (``ControlPlane.describe_agents``): the
    AgentActor views, kept here as plain dicts the test edits."""

    def __init__(self, latency: float = 0.0) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.latency = latency
        self.calls = 0

    def add(self, agent_id: str, **kw: Any) -> None:
        self.agents[agent_id] = agent_view(agent_id, **kw)

    def update(self, agent_id: str, **kw: Any) -> None:
        view = self.agents[agent_id]
        args = {"datacenter": view["datacenter"], "node_size": view["node_size"],
                "status": view["status"], "draining": view["draining"],
                "verdict": view["attestation"]["verdict"],
                "health": view["health"]["status"], "vm_name": view["vm_name"],
                "deployments": tuple(d["deployment_id"] for d in view["deployment"])}
        args.update(kw)
        self.agents[agent_id] = agent_view(agent_id, **args)

    async def agent_views(self) -> list[dict[str, Any]]:
        self.calls += 1
        await trio.sleep(self.latency)  # a checkpoint: chaos can land mid-reconcile
        return [copy.deepcopy(self.agents[a]) for a in sorted(self.agents)]


class MemoryManifests:
    """Stand-in for the signed manifest store: one document per (kind, id)."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency  # a write that takes time: chaos can land mid-save
        self.docs: dict[tuple[str, str], dict[str, Any]] = {}
        self.saves = 0
        self.order_ids: set[str] = set()  # every launch order ever saved

    async def load(self, ident: str) -> Mapping[str, Any] | None:
        await trio.lowlevel.checkpoint()
        doc = self.docs.get(("pools", ident))
        return copy.deepcopy(doc) if doc is not None else None

    async def save(self, kind: str, ident: str, doc: dict[str, Any]) -> None:
        await trio.sleep(self.latency)  # crash before the write: nothing saved
        self.docs[(kind, ident)] = copy.deepcopy(doc)
        self.saves += 1
        self.order_ids.update(o["order_id"] for o in doc.get("orders", []))
        await trio.lowlevel.checkpoint()  # crash after it: saved, not acknowledged


@attrs.define
class Events:
    log: list[tuple[str, str, dict[str, Any]]] = attrs.field(factory=list)

    def emit(self, kind: str, subject: str, data: Mapping[str, Any]) -> None:
        self.log.append((kind, subject, dict(data)))

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, _, d in self.log if k == kind]


def make_deps(agents: FakeAgentDirectory, store: MemoryManifests, events: Events,
              *, settings: PoolSettings | None = None, ready: bool = True,
              latencies: list[float] | None = None) -> PoolDeps:
    return PoolDeps(
        load=store.load, save=store.save, agent_views=agents.agent_views, emit=events.emit,
        settings=settings or PoolSettings(reconcile_interval_s=1.0),
        clock=trio.current_time, ready=lambda: ready,
        new_id=lambda prefix: f"{prefix}-{next(_IDS):06d}",
        observe_claim_to_registered=(latencies.append if latencies is not None
                                     else lambda _s: None))
