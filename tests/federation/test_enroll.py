"""Enrolment of a dc CP, from the attacker's side: the join token carries the master pin,
so a second master answering at the upstream URL with its own CA and key is refused and
nothing is written; a used token, a general token re-joining an enrolled dc, an http
upstream or a pin-less token without --dev are refused; the offline request → issue →
bundle path round-trips, and a tampered bundle (or a wrong pin) is refused."""

from __future__ import annotations

import json
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ee.federation import pki
from ee.federation.dc import EnrolError, Enrollment, enroll, install_bundle
from ee.protocol.signing import generate_signing_key, public_key_bytes

from .fedkit import CpProc, dc, event_log, eventually, join_token, master, run

A = "sim:dc-a"


def _files(home: Path) -> list[str]:
    fed = home / "federation"
    return sorted(str(p.relative_to(fed)) for p in fed.rglob("*")) if fed.exists() else []


def _dc_argv(m: CpProc, home: Path, *extra: str) -> list[str]:
    return ["ee-cp", "--dev", "--role", "dc", "--upstream", m.http, "--datacenter", A,
            "--data-dir", str(home), "--listen", "127.0.0.1:0", "--agent-listen",
            "127.0.0.1:0", *extra]


async def _run(argv: list[str]) -> Any:
    return await trio.to_thread.run_sync(run, argv)


async def test_pin_refuses_a_substituted_master(tmp_path: Path) -> None:
    m = master(tmp_path)
    evil = CpProc("evil", tmp_path / "evil", [])
    evil.args = ["--role", "master", "--federation-listen", f"127.0.0.1:{evil.fed_port}"]
    a = dc(tmp_path, m, A, "dc-a")
    with trio.fail_after(120):
        await m.start()
        await evil.start()
        try:
            good = await join_token(m, A)
            secret, pin = pki.split_join_token(good)
            assert pin is not None
            # The attacker's master answers at the upstream URL and accepts any token
            # (here: one of its own secrets, with the real master's pin the dc was given).
            evil_secret, evil_pin = pki.split_join_token(await join_token(evil, A))
            assert evil_pin != pin
            forged = pki.join_token_text(evil_secret, pin)
            home = tmp_path / "victim"
            out = await _run(_dc_argv(evil, home, "--join-token", forged))
            assert out.returncode == 2, out.stderr
            assert "do not match the pin" in out.stderr and "nothing written" in out.stderr
            assert _files(home) == []
            # The real master's token (with its pin) enrols; the pin is kept.
            await a.start("--join-token", good)
            kept = Enrollment.load(a.data_dir / "federation")
            assert kept is not None and kept.master_pin == pin
            assert kept.stream_url.endswith(f":{m.fed_port}/api/v2/federation/stream")

            async def linked() -> bool:
                return bool((await a.get("/api/v2/federation/status"))["connected"])

            await eventually(linked, what="dc-a linked to the master")
            # Reuse of the used token: refused (code + event), nothing written.
            other = tmp_path / "other"
            async with event_log(m) as events:
                with pytest.raises(EnrolError, match="join_token_invalid"):
                    await trio.to_thread.run_sync(partial(enroll, other, m.http, A, good, dev=True))
                # A general (unbound) token cannot replace an enrolled dc's keys.
                with pytest.raises(EnrolError, match="join_token_unbound"):
                    await trio.to_thread.run_sync(partial(enroll, other, m.http, A,
                                                          await join_token(m), dev=True))
                await trio.sleep(0.3)
            codes = [e["data"]["code"] for e in events if e.get("kind") == "federation.refused"]
            assert "join_token_invalid" in codes and "join_token_unbound" in codes
            assert _files(other) == []
            assert secret not in json.dumps(events)  # the secret is never echoed
        finally:
            await a.stop()
            await evil.stop()
            await m.stop()


async def test_production_needs_pin_and_https(tmp_path: Path) -> None:
    """Without --dev: a pin-less token and a plain-http upstream are refused before any
    request leaves (the secret never travels, but over http anyone on the path could
    answer in the master's place and hold the join up)."""
    home = tmp_path / "prod"
    with pytest.raises(EnrolError, match="no master pin"):
        enroll(home, "https://master.invalid", A, "eej_abc", dev=False)
    pinned = pki.join_token_text("eej_abc", "0" * 64)
    with pytest.raises(EnrolError, match="must be https"):
        enroll(home, "http://127.0.0.1:9", A, pinned, dev=False)
    with pytest.raises(EnrolError, match="differ"):
        enroll(home, "https://master.invalid", A, pinned, dev=False, pin="1" * 64)
    with pytest.raises(EnrolError, match="pin"):
        enroll(home, "https://master.invalid", A, "eej_abc.nothex", dev=False)
    assert _files(home) == []


async def test_offline_bundle_round_trip_and_tampering(tmp_path: Path) -> None:
    m = master(tmp_path)
    a = dc(tmp_path, m, A, "dc-a")
    with trio.fail_after(120):
        await m.start()
        try:
            req = tmp_path / "req.json"
            out = await _run(_dc_argv(m, a.data_dir, "--enroll-request", str(req)))
            assert out.returncode == 0, out.stderr
            assert sorted(json.loads(req.read_text())) == [
                "datacenter", "format", "signing_key", "tls_public_key"]
            assert _files(a.data_dir) == ["pending", "pending/dc.key", "pending/sign.key"]
            bundle = tmp_path / "bundle.json"
            out = await _run(["eectl", "federation", "issue", "--cp", m.http, "--token",
                              m.token, "--request", str(req), "--out", str(bundle)])
            assert out.returncode == 0, out.stderr
            pin = out.stdout.strip()
            assert len(pin) == 64
            doc = json.loads(bundle.read_text())

            other_ca = pki.ClusterCa.load_or_create(tmp_path / "other-ca", "evil")
            real_ca = pki.ClusterCa.load_or_create(m.data_dir / "federation", "unused")
            stranger = real_ca.issue(A, pki.public_pem(pki.new_key()))
            own_key = json.loads(req.read_text())["tls_public_key"]
            tampered = {
                "master key": {**doc, "master_key": public_key_bytes(
                    generate_signing_key()).hex()},
                "CA": {**doc, "ca": pki.cert_pem(other_ca.cert), "certificate": pki.cert_pem(
                    other_ca.issue(A, own_key))},
                "certificate of another key": {**doc, "certificate": pki.cert_pem(stranger)},
                "certificate by another CA": {**doc, "certificate": pki.cert_pem(
                    other_ca.issue(A, own_key))},
                "datacenter": {**doc, "datacenter": "sim:dc-b"},
                "format": {**doc, "format": "ee/v2/federation/enroll-bundle/0"},
                "extra field": {**doc, "upstream": "https://evil"},
            }
            for what, body in tampered.items():
                bad = tmp_path / "bad.json"
                bad.write_text(json.dumps(body))
                with pytest.raises(EnrolError):
                    install_bundle(a.data_dir, m.http, A, bad, pin)
                assert _files(a.data_dir) == ["pending", "pending/dc.key",
                                              "pending/sign.key"], what
            with pytest.raises(EnrolError, match="do not match the pin"):
                install_bundle(a.data_dir, m.http, A, bundle, "f" * 64)
            with pytest.raises(EnrolError, match="needs --master-pin"):
                install_bundle(a.data_dir, m.http, A, bundle, None)
            # Through the CLI: a tampered bundle exits 2, nothing written.
            bad = tmp_path / "bad.json"
            bad.write_text(json.dumps(tampered["master key"]))
            out = await _run(_dc_argv(m, a.data_dir, "--enroll-bundle", str(bad),
                                      "--master-pin", pin))
            assert out.returncode == 2 and "do not match the pin" in out.stderr, out.stderr
            assert not (a.data_dir / "federation" / "enrollment.json").exists()
            # The real bundle with the real pin: enrolled, linked, the pending keys moved.
            await a.start("--enroll-bundle", str(bundle), "--master-pin", f"sha256:{pin}")
            assert "pending" not in _files(a.data_dir)
            kept = Enrollment.load(a.data_dir / "federation")
            assert kept is not None and kept.master_pin == pin

            async def linked() -> bool:
                return bool((await a.get("/api/v2/federation/status"))["connected"])

            await eventually(linked, what="dc-a linked over the offline enrolment")
        finally:
            await a.stop()
            await m.stop()


async def test_production_join_over_https_with_a_private_ca(tmp_path: Path) -> None:
    """The production path end to end: the master's API on https with a private CA; the
    dc (dev=False) verifies it with --upstream-ca, and refuses it without."""
    web = pki.ClusterCa.load_or_create(tmp_path / "web-ca", "web")
    key = pki.new_key()
    pki.save_key(tmp_path / "web.key", key)
    pki.write_public(tmp_path / "web.pem", pki.cert_pem(web.issue(
        "master", pki.public_pem(key), server_hosts=("127.0.0.1",))).encode())
    m = master(tmp_path, "--tls-cert", str(tmp_path / "web.pem"),
               "--tls-key", str(tmp_path / "web.key"))
    url = f"https://127.0.0.1:{m.http_port}"
    ca = tmp_path / "web-ca" / "ca.pem"
    argv = ["ee-cp", "--dev", "--data-dir", str(m.data_dir), "--listen",
            f"127.0.0.1:{m.http_port}", "--agent-listen", f"127.0.0.1:{m.agent_port}",
            *m.args]
    log = (tmp_path / "master.log").open("ab")
    with trio.fail_after(90):
        m.proc = await trio.lowlevel.open_process(argv, stdout=log, stderr=log)
        log.close()
        try:
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca)),
                                         timeout=2) as c:
                for _ in range(300):
                    try:
                        if (await c.get(f"{url}/api/v2/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await trio.sleep(0.1)
                r = await c.post(f"{url}/api/v2/federation/join-tokens", json={
                    "datacenter": A}, headers={"Authorization": f"Bearer {m.token}"})
                assert r.status_code == 201, r.text
                token = r.json()["token"]
            home = tmp_path / "prod-dc"
            with pytest.raises(EnrolError, match="CERTIFICATE_VERIFY_FAILED"):
                await trio.to_thread.run_sync(
                    partial(enroll, home, url, A, token, dev=False))
            assert _files(home) == []
            got = await trio.to_thread.run_sync(
                partial(enroll, home, url, A, token, dev=False, upstream_ca=ca))
            assert got.label == A and got.master_pin == pki.split_join_token(token)[1]
            assert (home / "federation" / "dc.pem").exists()
        finally:
            await m.stop()


def test_the_join_token_can_come_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EE_JOIN_TOKEN keeps the token out of the process list; the flag still wins."""
    from ee.cp.server import CpConfig, build_parser

    argv = ["--data-dir", str(tmp_path), "--role", "dc", "--upstream",
            "https://master.example", "--datacenter", "sim:dc-a"]
    monkeypatch.setenv("EE_JOIN_TOKEN", "eej_fromenv")
    assert CpConfig.from_sources(build_parser().parse_args(argv)).join_token == "eej_fromenv"
    flagged = build_parser().parse_args([*argv, "--join-token", "eej_flag"])
    assert CpConfig.from_sources(flagged).join_token == "eej_flag"
    monkeypatch.delenv("EE_JOIN_TOKEN")
    assert CpConfig.from_sources(build_parser().parse_args(argv)).join_token is None
