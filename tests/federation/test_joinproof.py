"""The join proof: a dc never sends its join token's secret (``pki.join_body``).

Whoever answers at ``--upstream`` (a stand-in upstream here, recording what it gets)
learns the token's public id and an HMAC over the dc's label and public keys: neither
the secret, nor the token, nor the hash the master keys the proof with. Replayed to the
real master with another TLS key, signing key or label, or with a proof made with another
secret, it is refused 401 ``join_token_invalid``, and a wrong proof does not use the token
up: the genuine dc joins with it afterwards. A body that carries ``token`` (an old dc) and
malformed ids or proofs are 400, never a 500.
"""

from __future__ import annotations

import http.server
import json
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry
from trio.testing import MockClock

from ee.federation import pki
from ee.federation.dc import EnrolError, enroll
from ee.federation.master import (
    FederationSettings,
    JoinRefused,
    JoinRequest,
    MasterFederation,
)
from ee.protocol.signing import generate_signing_key, public_key_bytes
from ee.runtime import Registry

from .fedkit import event_log, eventually, join_token, master, refused
from .test_review_enroll import reply, serving

A = "sim:dc-a"
JOIN = "/api/v2/federation/join"


class _Record(http.server.BaseHTTPRequestHandler):
    """A rogue upstream: keeps every join body it is sent, answers a refusal."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        _Record.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        reply(self, 503, {"error": {"code": "nope", "message": "try again later"}})

    def log_message(self, *_: Any) -> None:
        return None


def _keys() -> tuple[str, str]:
    return pki.public_pem(pki.new_key()), public_key_bytes(generate_signing_key()).hex()


def _code(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, (r.json().get("error") or {}).get("code")


async def test_a_rogue_upstream_learns_nothing_to_join_with(tmp_path: Path) -> None:
    m = master(tmp_path)
    with trio.fail_after(90):
        await m.start()
        try:
            token = await join_token(m)  # general: any label not enrolled yet
            secret, pin = pki.split_join_token(token)
            assert pin is not None
            _Record.bodies.clear()
            with serving(_Record) as rogue, pytest.raises(EnrolError, match="refused"):
                await trio.to_thread.run_sync(partial(enroll, tmp_path / "fooled", rogue, A,
                                                      token, timeout_s=10, dev=True))
            [raw] = _Record.bodies
            for leaked in (secret, secret.removeprefix(pki.TOKEN_PREFIX),
                           pki.join_secret_hash(secret)):
                assert leaked.encode() not in raw
            sent = json.loads(raw)
            assert sorted(sent) == ["datacenter", "proof", "signing_key", "tls_public_key",
                                    "token_id"]
            tls_key, sign_key = _keys()
            h = pki.join_secret_hash("eej_" + "guess")
            stolen = {
                "another TLS key": {**sent, "tls_public_key": tls_key},
                "another signing key": {**sent, "signing_key": sign_key},
                "another datacenter": {**sent, "datacenter": "sim:dc-evil"},
                "a proof made with another secret": {**sent, "proof": pki.join_proof(
                    h, sent["datacenter"], tls_key, sign_key), "tls_public_key": tls_key,
                    "signing_key": sign_key},
                "an unknown token id": pki.join_body("eej_guess", A, tls_key, sign_key),
            }
            async with event_log(m) as events, \
                    httpx.AsyncClient(base_url=m.http, timeout=10) as c:
                for what, body in stolen.items():
                    r = await c.post(JOIN, json=body)
                    assert _code(r) == (401, "join_token_invalid"), (what, r.text)

                async def seen() -> bool:
                    return len(refused(events, "join_token_invalid")) >= len(stolen)

                await eventually(seen, what="a refusal event per stolen body")
                # None of it used the token up: the genuine dc joins with it now.
                got = await trio.to_thread.run_sync(partial(
                    enroll, tmp_path / "dc", m.http, A, token, timeout_s=10, dev=True))
                assert got.label == A and got.master_pin == pin
                assert (await m.datacenters())[A]["mode"] == "federated"
                # ... and only once: the recorded body is of a used token by now.
                r = await c.post(JOIN, json=sent)
                assert _code(r) == (401, "join_token_invalid"), r.text
        finally:
            await m.stop()


async def test_old_and_malformed_join_bodies_are_400(tmp_path: Path) -> None:
    m = master(tmp_path)
    with trio.fail_after(90):
        await m.start()
        try:
            token = await join_token(m, A)
            tls_key, sign_key = _keys()
            good = pki.join_body(token, A, tls_key, sign_key)
            async with httpx.AsyncClient(base_url=m.http, timeout=10) as c:
                # An old dc sends the token itself: refused, and said why.
                for body in ({"token": token, "datacenter": A, "tls_public_key": tls_key,
                              "signing_key": sign_key},
                             {**good, "token": token}):
                    r = await c.post(JOIN, json=body)
                    assert _code(r) == (400, "bad_request"), r.text
                    assert r.json()["error"]["details"] == {"field": "token"}
                    assert "never the token itself" in r.json()["error"]["message"]
                    assert token not in r.text
                bad: dict[str, list[Any]] = {
                    "token_id": ["a" * 31, "a" * 33, "g" * 32, "A" * 32, "é" * 32,
                                 "a" * 10_000, 5, None, ["a" * 32]],
                    "proof": ["a" * 63, "z" * 64, "B" * 64, "é" * 64, "a" * 10_000, {}],
                }
                for field, values in bad.items():
                    for value in values:
                        r = await c.post(JOIN, json={**good, field: value})
                        assert _code(r) == (400, "bad_request"), (field, value, r.text)
                        assert r.json()["error"]["details"]["field"] == field, r.text
                        assert len(r.text) < 1000
                    r = await c.post(JOIN, json={k: v for k, v in good.items() if k != field})
                    assert _code(r) == (400, "bad_request"), (field, r.text)
                # Still up, and the token still good (none of that touched it).
                r = await c.post(JOIN, json=good)
                assert r.status_code == 200, r.text
                pki.check_answer(pin=pki.split_join_token(token)[1], label=A,
                                 ca_pem=r.json()["ca"], master_key_hex=r.json()["master_key"],
                                 cert_pem_text=r.json()["certificate"], tls_public_pem=tls_key)
        finally:
            await m.stop()


def test_the_proof_transcript_is_unambiguous() -> None:
    h = pki.join_secret_hash("eej_x")
    # The same bytes split differently between the fields: different proofs.
    assert pki.join_proof(h, "ab", "c", "d") != pki.join_proof(h, "a", "bc", "d")
    assert pki.join_proof(h, "a", "bc", "d") != pki.join_proof(h, "a", "b", "cd")
    assert pki.join_proof(h, "a", "b", "c") != pki.join_proof(
        pki.join_secret_hash("eej_y"), "a", "b", "c")
    # The id names the token without being (a part of) the hash the proof is keyed by.
    token_id = pki.join_token_id(h)
    assert len(token_id) == 32 and token_id not in h
    # The pin is public and plays no part: with or without it, the same body.
    assert pki.join_body(pki.join_token_text("eej_x", "0" * 64), A, "k", "s") \
        == pki.join_body("eej_x", A, "k", "s")


async def test_an_expired_token_is_refused_and_forgotten(
        tmp_path: Path, autojump_clock: MockClock) -> None:
    fed = MasterFederation(tmp_path, "c1", FederationSettings(), registry=Registry(),
                           emit=lambda *_: None, metrics=CollectorRegistry())
    token = fed.issue_token(A, 60.0)["token"]
    await trio.sleep(61)
    with pytest.raises(JoinRefused) as caught:
        await fed.join(JoinRequest(**pki.join_body(token, A, *_keys())))
    assert caught.value.code == "join_token_invalid"
    assert fed.tokens == {}
