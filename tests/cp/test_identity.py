"""Durable VM identities against a real CP (real websockets, sim quotes): a VM name
stays bound to its key across CP restarts with the record store wiped; only an
operator's release frees it; a tampered binding holds the name; agent URLs are
checked; refused registrations are counted, not stored row by row; drains survive
restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import trio
from cpkit import RunningCp, running_cp
from simagent import SimAgent
from test_sessions import FAST, register_with, wait_until

from ee.cp.manifests import ManifestStore
from ee.cp.records import RecordStore
from ee.protocol.messages import Register


def events(env: RunningCp, kind: str) -> list[dict[str, Any]]:
    return [e.to_dict() for e in env.cp.events.recent if e.kind == kind]


def binding_file(data: Path, vm_name: str) -> Path:
    return ManifestStore(data / "manifests", None).path("bindings", vm_name)  # type: ignore[arg-type]


@attrs.define
class UrlAgent(SimAgent):
    """A SimAgent that announces an HTTP API URL at registration."""

    announce: str | None = None

    def register_message(self, nonce: bytes) -> Register:
        return attrs.evolve(super().register_message(nonce), url=self.announce)


async def test_takeover_after_restart_with_wiped_records_needs_a_release(
        tmp_path: Path) -> None:
    data = tmp_path / "cp"
    with trio.fail_after(60):
        async with running_cp(data, **FAST) as env:
            victim = await register_with(env, env.agent("vm-victim"))
            assert victim.registered is not None
        assert binding_file(data, "vm-victim").exists()  # flushed on the graceful stop
        (data / "records.sqlite3").unlink()

        async with running_cp(data, **FAST) as env:
            impostor = await register_with(env, env.agent("vm-victim"))
            assert impostor.rejected is not None
            assert impostor.rejected.code == "KEY_CHANGED"
            assert "release-name vm-victim" in impostor.rejected.reasons[0]
            refused = events(env, "registration.rejected")
            assert [(e["subject"], e["data"]["code"]) for e in refused] == [
                ("vm-victim", "KEY_CHANGED")]
            # The real VM (same key) is still welcome.
            back = await register_with(env, env.agent("vm-victim", key=victim.key))
            assert back.registered is not None

            async with env.client() as http:
                names = (await http.get("/api/v2/admin/vm-names")).json()["vm_names"]
                assert [(n["vm_name"], n["state"]) for n in names] == [("vm-victim", "bound")]
                r = await http.post("/api/v2/admin/vm-names/vm-nobody/release")
                assert r.status_code == 404
                assert r.json()["error"]["code"] == "not_found"
                r = await http.post("/api/v2/admin/vm-names/vm-victim/release")
                assert r.status_code == 200, r.text
                assert r.json()["released"]["vm_name"] == "vm-victim"
                anonymous = await http.post("/api/v2/admin/vm-names/vm-victim/release",
                                            headers={"Authorization": ""})
                assert anonymous.status_code == 401
            assert [e["subject"] for e in events(env, "identity.released")] == ["vm-victim"]
            assert not binding_file(data, "vm-victim").exists()  # durable before the 200

            newcomer = await register_with(env, env.agent("vm-victim", key=impostor.key))
            assert newcomer.registered is not None
            assert newcomer.registered.agent_id == victim.registered.agent_id
            old = await register_with(env, env.agent("vm-victim", key=victim.key))
            assert old.rejected is not None and old.rejected.code == "KEY_CHANGED"

        async with running_cp(data, **FAST) as env:  # the new binding is the durable one
            again = await register_with(env, env.agent("vm-victim", key=victim.key))
            assert again.rejected is not None and again.rejected.code == "KEY_CHANGED"


async def test_tampered_or_forged_binding_holds_the_name_until_released(
        tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ee.actors.identity import Binding

    data = tmp_path / "cp"
    with trio.fail_after(60):
        async with running_cp(data, **FAST) as env:
            owner = await register_with(env, env.agent("vm-owned"))
            assert owner.registered is not None
        # An attacker with write access to one file swaps in their own key...
        path = binding_file(data, "vm-owned")
        intruder = env.agent("vm-owned")
        doc = json.loads(path.read_text())
        assert doc["document"]["spec"]["public_key"] == owner.public_key.hex()
        doc["document"]["spec"]["public_key"] = intruder.public_key.hex()
        path.write_text(json.dumps(doc))
        # ... or forges a binding for a name nobody registered, signed with another key.
        ManifestStore(data / "manifests", Ed25519PrivateKey.generate()).write(
            "bindings", "vm-forged",
            Binding("vm-forged", intruder.public_key, 1.0).to_spec())

        async with running_cp(data, **FAST) as env:
            for name, key in (("vm-owned", intruder.key), ("vm-owned", owner.key),
                              ("vm-forged", intruder.key)):
                agent = await register_with(env, env.agent(name, key=key))
                assert agent.rejected is not None, name
                assert agent.rejected.code == "BINDING_INVALID", agent.rejected
            assert sorted(e["subject"] for e in events(env, "identity.held")) == [
                "vm-forged", "vm-owned"]
            assert len(events(env, "manifest.refused")) == 2
            async with env.client() as http:
                names = (await http.get("/api/v2/admin/vm-names")).json()["vm_names"]
                assert [(n["vm_name"], n["state"]) for n in names] == [
                    ("vm-forged", "held"), ("vm-owned", "held")]
                r = await http.post("/api/v2/admin/vm-names/vm-owned/release")
                assert r.status_code == 200
                assert r.json()["released"]["state"] == "held"
            assert not path.exists()
            mine = await register_with(env, env.agent("vm-owned", key=owner.key))
            assert mine.registered is not None


BAD_URLS = {
    "ftp://10.0.0.1/": "scheme",
    "javascript:alert(1)": "scheme",
    "http://admin:pw@10.0.0.1:8080": "user info",
    "http://10.0.0.1:8080/?next=https://evil": "query",
    "http://10.0.0.1:8080/#x": "fragment",
    "http://10.0.0.1:99999": "port",
    "http://evil.example/../admin": "plain",
    "http://<script>/": "DNS name",
    "http://" + "a" * 600 + ".example": "longer",
}


async def test_bad_agent_urls_are_refused_and_good_ones_normalised(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env:
            for i, (url, why) in enumerate(BAD_URLS.items()):
                agent = await register_with(env, UrlAgent(
                    url=env.agent_url, td=env.td, vm_name=f"vm-url{i}", announce=url))
                assert agent.rejected is not None, url
                assert agent.rejected.code == "BAD_URL", (url, agent.rejected)
                assert why in agent.rejected.reasons[0], (url, agent.rejected)
            async with trio.open_nursery() as nursery:
                good = UrlAgent(url=env.agent_url, td=env.td, vm_name="vm-good",
                                announce="HTTP://Agent-7.Example.COM:8443/")
                await nursery.start(good.run)
                assert good.registered is not None
                async with env.client() as http:
                    view = (await http.get(f"/api/v2/agents/{good.agent_id}")).json()
                assert view["url"] == "http://agent-7.example.com:8443"
                nursery.cancel_scope.cancel()


async def test_refused_registrations_are_counted_per_reason_and_minute(
        tmp_path: Path) -> None:
    data = tmp_path / "cp"
    with trio.fail_after(60):
        async with running_cp(data, rejection_flush_interval_s=0.2, **FAST) as env:
            for _ in range(7):
                await register_with(env, env.agent("bad name"))
            for _ in range(3):
                await register_with(env, UrlAgent(url=env.agent_url, td=env.td,
                                                  vm_name="vm-u", announce="ftp://x"))
            ok = await register_with(env, env.agent("vm-ok"))
            assert ok.registered is not None
        async with await RecordStore.open(data / "records.sqlite3") as store:
            counts = await store.rejections()
            admitted = await store.registrations()
            stored_events = {e.kind for e in await store.recent_events(limit=1000)}
    by_code: dict[str, int] = {}
    for row in counts:
        by_code[row.code] = by_code.get(row.code, 0) + row.count
        assert row.at.second == 0 and row.at.microsecond == 0
    assert by_code == {"BAD_VM_NAME": 7, "BAD_URL": 3}
    # One row per (code, minute): 7 refusals within seconds span at most two minutes.
    assert len(counts) == len({(r.code, r.at) for r in counts}) <= 4
    assert {r.sample_vm_name for r in counts if r.code == "BAD_URL"} == {"vm-u"}
    assert [(r.vm_name, r.outcome) for r in admitted] == [("vm-ok", "admitted")]
    assert "registration.rejected" not in stored_events


async def test_drain_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    with trio.fail_after(60):
        async with running_cp(data, **FAST) as env, trio.open_nursery() as nursery:
            agent = env.agent("vm-drained")
            await nursery.start(agent.run)
            other = env.agent("vm-other")
            await nursery.start(other.run)
            async with env.client() as http:
                for a, draining in ((agent, True), (other, True), (other, False)):
                    r = await http.post(f"/api/v2/agents/{a.agent_id}/drain",
                                        json={"draining": draining})
                    assert r.status_code == 200 and r.json()["draining"] is draining
            nursery.cancel_scope.cancel()
        async with running_cp(data, **FAST) as env, trio.open_nursery() as nursery:
            for a in (agent, other):
                await nursery.start(env.agent(a.vm_name, key=a.key).run)

            async def views() -> dict[str, bool] | None:
                async with env.client() as http:
                    agents = (await http.get("/api/v2/agents")).json()["agents"]
                out = {v["vm_name"]: v["draining"] for v in agents}
                return out if len(out) == 2 else None

            assert await wait_until(views, "both agents listed") == {
                "vm-drained": True, "vm-other": False}
            nursery.cancel_scope.cancel()


async def test_two_new_keys_racing_for_one_name_bind_only_one(tmp_path: Path) -> None:
    """Both registrations pass the judge's binding check while their quotes are being
    verified; only the claim made right before admission decides, so exactly one key
    gets the name and the other is refused KEY_CHANGED."""
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env:
            plane = env.cp.plane
            admit = plane._admit
            admitted = 0
            both = trio.Event()

            async def admit_together(*args: Any) -> Any:
                nonlocal admitted
                result = await admit(*args)
                admitted += 1
                if admitted == 2:
                    both.set()
                await both.wait()
                return result

            plane._admit = admit_together  # type: ignore[method-assign]
            racers = [env.agent("vm-race"), env.agent("vm-race")]
            async with trio.open_nursery() as nursery:
                for racer in racers:
                    nursery.start_soon(register_with, env, racer)
            outcomes = sorted(
                "registered" if r.registered is not None else r.rejected.code  # type: ignore[union-attr]
                for r in racers)
            assert outcomes == ["KEY_CHANGED", "registered"]
            winner = next(r for r in racers if r.registered is not None)
            names = {n["vm_name"]: n for n in await env.cp.identities.views()}
            assert names["vm-race"]["state"] == "bound"
            assert names["vm-race"]["agent_id"] == winner.registered.agent_id  # type: ignore[union-attr]


async def test_vm_name_spellings_cannot_make_distinct_bindings(tmp_path: Path) -> None:
    """``vm-1`` binds; ``VM-1``, ``vm-1.`` and ``vm..1`` are refused as BAD_VM_NAME
    rather than becoming further bindings of the same host."""
    with trio.fail_after(60):
        async with running_cp(tmp_path / "cp", **FAST) as env:
            for name in ("VM-1", "vm-1.", "vm..1"):
                agent = await register_with(env, env.agent(name))
                assert agent.rejected is not None, name
                assert agent.rejected.code == "BAD_VM_NAME", (name, agent.rejected)
            ok = await register_with(env, env.agent("vm-1"))
            assert ok.registered is not None
