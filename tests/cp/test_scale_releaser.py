"""The secret releaser at scale: a pass renders only the views of the replicas it judges,
agents it does not watch do not wake it, and it still releases to the right agent
(and only to it) when an app does hold secrets."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import ee.cp
from ee.cp.secrets import ReleasePolicy, ReleaserDeps, SecretReleaser, SecretVault
from ee.protocol.messages import (
    Message,
    SecretAck,
    SecretRelease,
    SecretRevoke,
    SecretsKey,
    SecretsKeyRequest,
)
from ee.protocol.sealing import (
    open_release,
    release_aad,
    secrets_key_document,
    x25519_public_bytes,
)
from ee.protocol.signing import public_key_bytes, sign_document

AGENTS = 2000
HASH = "sha256:" + "ab" * 32


class Store:
    """The vault's durable store: one in-memory SQLite with the secrets migration."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        sql = Path(ee.cp.__file__).parent / "migrations" / "0004_secrets.sql"
        self.conn.executescript(sql.read_text())

    async def _call(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        return work(self.conn)


@attrs.define
class Identity:
    public_key: bytes


@attrs.define
class Link:
    """An agent's side of a session: proves its secrets key, opens what it is sent."""

    agent_id: str
    session_id: int = 1
    session_key: Ed25519PrivateKey = attrs.field(factory=Ed25519PrivateKey.generate)
    box: X25519PrivateKey = attrs.field(factory=X25519PrivateKey.generate)
    opened: dict[str, bytes] = attrs.field(factory=dict)
    revoked: list[str | None] = attrs.field(factory=list)

    @property
    def identity(self) -> Identity:
        return Identity(public_key_bytes(self.session_key))

    async def request(self, msg: Message, timeout: float) -> Message:
        if isinstance(msg, SecretsKeyRequest):
            pub = x25519_public_bytes(self.box)
            return SecretsKey(public_key=pub, signature=sign_document(
                secrets_key_document(msg.nonce, pub), self.session_key))
        if isinstance(msg, SecretRelease):
            aad = release_aad(deployment_id=msg.deployment_id, name=msg.name,
                              version=msg.version, nonce=msg.nonce, recipient=msg.recipient)
            self.opened[msg.name] = open_release(self.box, msg.ephemeral_key, msg.sealed, aad)
            return SecretAck(deployment_id=msg.deployment_id, state="applied", name=msg.name,
                             version=msg.version)
        assert isinstance(msg, SecretRevoke)
        self.revoked.append(msg.name)
        return SecretAck(deployment_id=msg.deployment_id, state="revoked", name=msg.name)


def _view(agent_id: str, status: str = "online") -> dict[str, Any]:
    return {"agent_id": agent_id, "status": status, "node_size": "standard",
            "datacenter": "load:z0",
            "attestation": {"verdict": "pass", "tcb_status": "UpToDate"},
            "deployment": [{"deployment_id": "d1", "compose_hash": HASH}]}


@attrs.define
class World:
    views: dict[str, dict[str, Any]]
    links: dict[str, Link]
    replicas: list[str]
    rendered: list[int] = attrs.field(factory=list)  # views rendered per pass

    def agent_views(self, ids: Collection[str]) -> list[dict[str, Any]]:
        self.rendered.append(len(ids))
        return [self.views[a] for a in sorted(ids) if a in self.views]

    async def deployments(self, app_key: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        if app_key != "acme/web":
            return []
        dep = {"deployment_id": "d1", "desired": "running", "replicas": [
            {"agent_id": a, "state": "running", "compose_hash": HASH} for a in self.replicas]}
        return [(dep, {"compose_hash": HASH, "secrets": [{"name": "db-password"}]})]


def _releaser(world: World) -> tuple[SecretReleaser, SecretVault]:
    store = Store()
    vault = SecretVault(lambda: store, secrets.token_bytes(32))

    async def policy(_app: str) -> ReleasePolicy:
        return ReleasePolicy()

    releaser = SecretReleaser(ReleaserDeps(
        vault=vault, emit=lambda kind, subject, data: None, link_for=world.links.get,
        agent_views=world.agent_views, deployments=world.deployments, policy=policy))
    return releaser, vault


def _world() -> World:
    ids = [f"agent-{i:05d}" for i in range(AGENTS)]
    return World(views={a: _view(a) for a in ids}, links={a: Link(a) for a in ids},
                 replicas=["agent-00007", "agent-01234"])


async def test_a_pass_releases_to_the_replicas_only_and_renders_only_them() -> None:
    world = _world()
    releaser, vault = _releaser(world)
    await releaser.sweep()
    assert world.rendered == []  # no app holds secrets: no view rendered at all
    await vault.put("acme/web", "db-password", b"hunter2")
    await releaser.sweep()
    assert world.rendered == [2]  # the two replicas' views, not 2,000
    holders = {a for a, link in world.links.items() if link.opened}
    assert holders == {"agent-00007", "agent-01234"}
    assert world.links["agent-00007"].opened == {"db-password": b"hunter2"}
    # One replica goes offline: its secrets are revoked, the other keeps them.
    world.views["agent-01234"] = _view("agent-01234", status="offline")
    await releaser.sweep()
    assert world.links["agent-01234"].revoked == ["db-password"]
    assert world.links["agent-00007"].revoked == []


async def test_only_events_of_watched_agents_wake_the_releaser() -> None:
    world = _world()
    releaser, vault = _releaser(world)
    await vault.put("acme/web", "db-password", b"hunter2")
    await releaser.sweep()
    assert releaser.watched == {"agent-00007", "agent-01234"}
    assert releaser.wakes("agent.status", "agent-00007")
    assert releaser.wakes("agent.quarantined", "agent-01234")
    assert not releaser.wakes("agent.status", "agent-00500")  # a bystander joining
    assert not releaser.wakes("agent.connected", "agent-00500")
    assert releaser.wakes("deployment.updated", "d1")  # not an agent's: always
    assert releaser.wakes("secret.updated", "acme/web")
    assert not releaser.wakes("agent.heartbeat", "agent-00007")  # not a wake kind
    # A holder of a delivered secret stays watched when it stops being a replica, so
    # the event that it went away wakes the pass that revokes.
    world.replicas = ["agent-00007"]
    await releaser.sweep()
    assert world.links["agent-01234"].revoked == ["db-password"]
    assert releaser.wakes("agent.status", "agent-00007")


async def test_wakes_are_coalesced_into_one_pass(autojump_clock: trio.testing.MockClock) -> None:
    world = _world()
    # Both replicas offline: the pass refuses (no sealing in a worker thread, which the
    # autojump clock would not wait for).
    for agent_id in world.replicas:
        world.views[agent_id] = _view(agent_id, status="offline")
    releaser, vault = _releaser(world)
    await vault.put("acme/web", "db-password", b"hunter2")

    @attrs.frozen
    class Event:
        kind: str
        subject: str

    send, receive = trio.open_memory_channel[Event](10_000)

    class Subscription:
        async def __aenter__(self) -> Any:
            return receive

        async def __aexit__(self, *exc: object) -> None:
            return None

    with trio.fail_after(9):  # under the periodic pass's 10 s
        async with trio.open_nursery() as nursery:
            await nursery.start(releaser.run, Subscription)
            await trio.sleep(1)
            assert releaser.passes == 0
            for i in range(AGENTS):  # a join wave: nobody watched, no pass
                send.send_nowait(Event("agent.connected", f"agent-{i:05d}"))
            await trio.sleep(1)
            assert releaser.passes == 0
            for _ in range(100):  # a burst about a deployment: one pass
                send.send_nowait(Event("replica.state", "d1"))
            await trio.sleep(1)
            assert releaser.passes == 1
            assert releaser.refused == {("agent-00007", "d1"): "AGENT_NOT_ONLINE",
                                        ("agent-01234", "d1"): "AGENT_NOT_ONLINE"}
            nursery.cancel_scope.cancel()
