"""The agent's secret store (tmpfs files, atomic replace, wipe, refusals) and the session
path of secret writes (signed like every CP write; the key proof)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.agent.secrets import SecretStore
from ee.protocol.messages import (
    SecretAck,
    SecretRelease,
    SecretRevoke,
    SecretsKey,
    SecretsKeyRequest,
)
from ee.protocol.sealing import release_aad, seal_release, secrets_key_document
from ee.protocol.signing import verify_document

from .agentkit import StandInCp, agent_config, running_agent


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    path = Path("/dev/shm") / f"ee-test-{secrets.token_hex(6)}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def release(store: SecretStore, value: bytes, *, version: int = 1, dep: str = "dep-1",
            name: str = "db") -> SecretRelease:
    nonce = secrets.token_bytes(32)
    aad = release_aad(deployment_id=dep, name=name, version=version, nonce=nonce,
                      recipient=store.public_key)
    ephemeral, sealed = seal_release(store.public_key, value, aad)
    return SecretRelease(deployment_id=dep, name=name, version=version, nonce=nonce,
                         recipient=store.public_key, ephemeral_key=ephemeral, sealed=sealed)


def test_apply_rotate_revoke_on_tmpfs(root: Path) -> None:
    store = SecretStore(root)
    assert not root.exists()  # made when first needed
    assert store.apply(release(store, b"one"), True).state == "applied"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    path = store.directory("dep-1") / "db"
    assert path.read_bytes() == b"one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    holder = os.open(path, os.O_RDONLY)  # a workload process holding the old file
    try:
        assert store.apply(release(store, b"two", version=2), True).state == "applied"
        assert path.read_bytes() == b"two"
        assert os.pread(holder, 16, 0) == b""  # the old inode was wiped
    finally:
        os.close(holder)
    assert [p.name for p in store.directory("dep-1").iterdir()] == ["db"]  # no temp left
    ack = store.apply(release(store, b"old", version=1), True)
    assert (ack.state, ack.code) == ("refused", "SECRET_STALE")
    assert path.read_bytes() == b"two"
    assert store.apply(release(store, b"again", version=2), True).state == "applied"
    ack = store.revoke(SecretRevoke(deployment_id="dep-1", name="db", reason="test"))
    assert ack.state == "revoked" and not path.exists()
    store.forget("dep-1")
    assert not root.exists()  # the last deployment's directory took the root with it


def test_refusals_write_nothing(root: Path) -> None:
    store = SecretStore(root)
    other = SecretStore(root / "other")
    msg = release(store, b"v")
    for ack in (other.apply(msg, True), store.apply(msg, False),
                store.apply(attrs.evolve(msg, sealed=msg.sealed[:-1] + bytes(
                    [msg.sealed[-1] ^ 1])), True)):  # one flipped bit (not "set to 0":
            # one release in 256 ends in a zero byte already)
        assert ack.state == "refused"
    assert [a.code for a in (other.apply(msg, True), store.apply(msg, False))] == [
        "SECRET_NOT_FOR_ME", "SECRET_UNKNOWN_DEPLOYMENT"]
    assert not (store.directory("dep-1") / "db").exists()
    assert store.apply(msg, True).state == "applied"
    assert store.apply(msg, True).code == "SECRET_REPLAYED"


def test_a_new_process_wipes_what_the_last_one_held(root: Path) -> None:
    store = SecretStore(root)
    store.apply(release(store, b"held"), True)
    directory = store.directory("dep-1")
    SecretStore(root)  # an agent restart: new key, old values gone, directory kept
    assert directory.is_dir() and list(directory.iterdir()) == []


def test_key_proof_is_signed_by_the_session_key(root: Path) -> None:
    store = SecretStore(root)
    key = Ed25519PrivateKey.generate()
    nonce = secrets.token_bytes(32)
    verify_document(secrets_key_document(nonce, store.public_key), store.prove(nonce, key),
                    key.public_key())


async def test_secret_writes_need_the_cp_envelope_and_the_key_request_answers(
        tmp_path: Path) -> None:
    """Through a real agent session: an unsigned release is refused with the envelope
    code; a signed one for a deployment the agent does not run is refused by the store;
    ``secrets_key`` is answered with a proof by the registration's session key."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp().run)
            config = agent_config(tmp_path / "agent", peer.url)
            async with running_agent(config) as agent:
                try:
                    nonce = secrets.token_bytes(32)
                    rid = await peer.send(SecretsKeyRequest(nonce=nonce), with_id=True)
                    _, key = await peer.wait_for(lambda f, _m: f.re == rid)
                    assert isinstance(key, SecretsKey)
                    assert key.public_key == agent.secret_store.public_key
                    from ee.protocol.signing import public_key_from_bytes

                    verify_document(secrets_key_document(nonce, key.public_key),
                                    key.signature,
                                    public_key_from_bytes(peer.registers[-1].public_key))
                    msg = release(agent.secret_store, b"v")
                    rid = await peer.send(msg, with_id=True)  # StandInCp signs no secrets
                    _, ack = await peer.wait_for(lambda f, _m: f.re == rid)
                    assert isinstance(ack, SecretAck)
                    assert (ack.state, ack.code) == ("refused", "ENVELOPE_MISSING")
                    assert peer.signer is not None
                    signed: Any = peer.signer.sign(msg)  # type: ignore[arg-type]
                    rid = await peer.send(signed, with_id=True)
                    _, ack = await peer.wait_for(lambda f, _m: f.re == rid)
                    assert isinstance(ack, SecretAck)
                    assert (ack.state, ack.code) == ("refused", "SECRET_UNKNOWN_DEPLOYMENT")
                finally:
                    shutil.rmtree(agent.secret_store.root, ignore_errors=True)
            nursery.cancel_scope.cancel()
