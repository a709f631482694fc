"""Signed releases admitted into the policy: the bundle pins the release keys, the CP
admits a release's image measurements for a node size only under a pinned key, keeps
it across a restart, and agents of that size are then judged against it."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from simagent import SimAgent
from test_bundle import eectl_cp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attestation.pccs_standin import running_standin
from ee.attestation.policy import Measurements, Policy
from ee.attestation.providers.sim import SIM_FMSPC, SimTD
from ee.cp.bootstrap import parse_bundle
from ee.cp.readiness import Quorum
from ee.cp.releases import ReleaseRefused, check_admission, policy_with
from ee.cp.server import ControlPlane, CpConfig, prepare
from ee.ctl.main import main as eectl
from ee.ctl.release import FileFacts, image_entry, make_manifest
from ee.protocol.signing import (
    generate_signing_key,
    load_private_key,
    save_public_key,
    sign_document,
    write_signed,
)

FMSPC = SIM_FMSPC.hex().upper()
R1, R2 = "a1" * 48, "b2" * 48


def manifest(rtmr1: str = R1, rtmr2: str = R2) -> dict[str, Any]:
    """A release manifest as `eectl release build --image` makes it, the image's
    measurements.json shaped as `eectl trust measure --json` prints it."""
    measured = {"image": "img", "cmdline": "console=ttyS0", "memory_bytes": 4 << 30,
                "kernel_patched": True, "mrtd": None, "rtmr1": rtmr1, "rtmr2": rtmr2,
                "pcr4": "e" * 64, "pcr9": "f" * 64, "events": {"rtmr1": [], "rtmr2": []}}
    return make_manifest(name="easyenclave", version="2.0.0", commit="c" * 40,
                         source_date_epoch=1,
                         artifacts={"dist/x.whl": FileFacts("0" * 64, 1)},
                         image=image_entry({"root_hash": "d" * 64}, measured))


def body(doc: dict[str, Any], key: Ed25519PrivateKey, node_size: str = "standard"
         ) -> dict[str, Any]:
    return {"manifest": doc, "signature": sign_document(doc, key).hex(),
            "node_size": node_size}


# --- pure --------------------------------------------------------------------------


def test_admission_needs_a_pinned_key() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pinned = [("rel", key.public_key())]
    admitted = check_admission(body(manifest(), key), pinned)
    assert admitted.key_name == "rel" and admitted.node_size == "standard"
    assert admitted.measurements.rtmr1 == {R1}
    for keys in ([], [("rel", other.public_key())]):
        with pytest.raises(ReleaseRefused) as refused:
            check_admission(body(manifest(), key), keys)
        assert (refused.value.status, refused.value.code) == (403, "release_untrusted")
    # One changed value in the signed manifest: the signature no longer verifies.
    tampered = body(manifest(), key)
    tampered["manifest"]["image"]["measurements"]["rtmr1"] = "00" * 48
    with pytest.raises(ReleaseRefused, match="does not verify"):
        check_admission(tampered, pinned)


@pytest.mark.parametrize("change, reason", [
    (lambda b: b.update(extra=1), "unknown fields"),
    (lambda b: b.update(node_size="Big Size"), "node_size"),
    (lambda b: b.update(signature="zz"), "signature"),
    (lambda b: b.update(manifest=[]), "manifest"),
    (lambda b: b.update(node_size="gigantic"), "not a node size this CP knows"),
])
def test_bad_bodies_are_refused_400(change: Any, reason: str) -> None:
    key = Ed25519PrivateKey.generate()
    doc = body(manifest(), key)
    change(doc)
    with pytest.raises(ReleaseRefused, match=reason) as refused:
        check_admission(doc, [("rel", key.public_key())], ("tiny", "standard", "llm"))
    assert refused.value.status == 400


@pytest.mark.parametrize("image, reason", [
    (None, "ships no measured image"),
    ({"root_hash": "d" * 64, "measurements": None}, "no expected measurements"),
    ({"root_hash": "d" * 64, "measurements": {"rtmr1": R1, "rtmr2": "zz", "pcr4": "e" * 64,
                                              "pcr9": "f" * 64}}, "rtmr2"),
])
def test_a_release_without_usable_measurements_is_refused(image: Any, reason: str) -> None:
    key = Ed25519PrivateKey.generate()
    doc = {**manifest(), "image": image}
    with pytest.raises(ReleaseRefused, match=reason):
        check_admission(body(doc, key), [("rel", key.public_key())])


def test_policy_with_adds_to_the_node_size_only() -> None:
    key = Ed25519PrivateKey.generate()
    pinned = [("rel", key.public_key())]
    base = Policy(measurements=Measurements(rtmr1=["33" * 48], providers=["tdx"]),
                  node_sizes={"llm": Measurements(rtmr1=["11" * 48])})
    first = check_admission(body(manifest(), key), pinned)
    second = check_admission(body(manifest(rtmr1="22" * 48), key), pinned)
    assert first.commit == "c" * 40 and first.measurements.mrtd == frozenset()
    policy = policy_with(base, [first, second])
    # A size without its own entry starts from the global lists: the globally allowed
    # image stays allowed for it (adding never narrows a list that had values).
    assert policy.node_sizes["standard"].rtmr1 == {"33" * 48, R1, "22" * 48}
    assert policy.node_sizes["standard"].providers is None  # still inherits the global
    assert policy.node_sizes["llm"] == base.node_sizes["llm"]
    assert policy.measurements == base.measurements
    assert policy_with(base, []) is base


def test_the_bundle_pins_release_keys(tmp_path: Path) -> None:
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "offline")) == 0
    assert eectl(["release", "keygen", "--out", str(tmp_path / "rel-2026")]) == 0
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                    "--out", str(tmp_path / "cp"), "--cluster-id", "c",
                    "--release-pubkey", str(tmp_path / "rel-2026.pub")) == 0
    doc = json.loads((tmp_path / "cp" / "bootstrap.json").read_text())
    parsed = parse_bundle(doc)
    assert [name for name, _ in parsed.release_keys] == ["rel-2026"]
    doc["trust"]["release_keys"].append(dict(doc["trust"]["release_keys"][0]))
    with pytest.raises(Exception, match="pinned twice"):
        parse_bundle(doc)


# --- a production CP ---------------------------------------------------------------


def release_dir(tmp: Path, name: str, doc: dict[str, Any], key_file: Path) -> Path:
    out = tmp / name
    out.mkdir()
    write_signed(out / "manifest.json", doc, load_private_key(key_file))
    return out


async def test_cp_admits_a_signed_release_and_judges_agents_by_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    td = SimTD.create()
    old_image = td.evolve(rtmrs=(b"\x00" * 48, b"\x01" * 48, b"\x02" * 48, b"\x00" * 48))
    new_image = td.evolve(rtmrs=(b"\x00" * 48, bytes.fromhex(R1), bytes.fromhex(R2),
                                 b"\x00" * 48))
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(td.root_pem())
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "offline")) == 0
    assert eectl(["release", "keygen", "--out", str(tmp_path / "rel")]) == 0
    (tmp_path / "policy.json").write_text(json.dumps({"mode": "strict"}))
    data = tmp_path / "cp"
    assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                    "--out", str(data), "--cluster-id", "prod", "--root", str(root_pem),
                    "--policy", str(tmp_path / "policy.json"),
                    "--release-pubkey", str(tmp_path / "rel.pub")) == 0
    token = (data / "admin.token").read_text().strip()
    good = release_dir(tmp_path, "good", manifest(), tmp_path / "rel.key")
    rogue_key = generate_signing_key()
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    write_signed(rogue / "manifest.json", manifest(rtmr1="00" * 48), rogue_key)
    save_public_key(tmp_path / "rogue.pub", rogue_key.public_key())

    async def run_cp(check: Any) -> None:
        async with running_standin({FMSPC: td.collateral(issued_at=time.time() - 3600)}
                                   ) as pccs:
            config = CpConfig(data_dir=data, listen="127.0.0.1:0",
                              agent_listen="127.0.0.1:0",
                              bundle_pubkey=str(tmp_path / "offline.pub"), pccs_url=pccs.url,
                              pccs_fmspcs=(FMSPC,), quorum=Quorum(settle_timeout_s=1))
            boot, _ = prepare(config)
            cp = ControlPlane(config, boot)
            async with trio.open_nursery() as nursery:
                await nursery.start(cp.run)
                await check(cp, nursery)
                cp.request_stop()

    async def register(cp: ControlPlane, nursery: trio.Nursery, name: str,
                       image: SimTD) -> SimAgent:
        agent = SimAgent(url=f"ws://127.0.0.1:{cp.plane.bound_port}/api/v2/agents/connect",
                         vm_name=name, td=image, node_size="standard")
        await nursery.start(agent.run)
        return agent

    def admit(cp: ControlPlane, directory: Path) -> int:
        return eectl(["release", "admit", str(directory), "--node-size", "standard",
                      "--cp", f"http://127.0.0.1:{cp.http_port}", "--token", token])

    async def first(cp: ControlPlane, nursery: trio.Nursery) -> None:
        # Before any release: the bundle's open policy admits the old image.
        assert (await register(cp, nursery, "vm-old-1", old_image)).registered is not None
        # A release signed by a key the bundle does not pin: refused, nothing changes.
        assert await trio.to_thread.run_sync(admit, cp, rogue) == 1
        assert "release_untrusted" in capsys.readouterr().err
        assert cp.releases == {}
        assert any(e.kind == "release.refused" for e in cp.events.recent)
        assert (await register(cp, nursery, "vm-old-2", old_image)).registered is not None
        # The signed release: admitted, and the node size is now judged by it.
        assert await trio.to_thread.run_sync(admit, cp, good) == 0
        assert "admitted: easyenclave 2.0.0" in capsys.readouterr().out
        assert await trio.to_thread.run_sync(admit, cp, good) == 0  # idempotent
        assert "already admitted" in capsys.readouterr().out
        refused = await register(cp, nursery, "vm-old-3", old_image)
        assert refused.registered is None and refused.rejected is not None
        assert any("rtmr1" in r for r in refused.rejected.reasons), refused.rejected
        assert (await register(cp, nursery, "vm-new-1", new_image)).registered is not None
        nursery.cancel_scope.cancel()

    async def concurrent_admits(cp: ControlPlane, nursery: trio.Nursery) -> None:
        release = check_admission(body(manifest(rtmr1="44" * 48), load_private_key(
            tmp_path / "rel.key")), cp.bootstrap.release_keys)
        results: list[bool] = []

        async def one() -> None:
            results.append(await cp.admit_release(release))

        async with trio.open_nursery() as inner:
            inner.start_soon(one)
            inner.start_soon(one)
        assert sorted(results) == [False, True]
        assert await cp.withdraw_release(release.ident) is not None
        assert release.ident not in cp.releases
        nursery.cancel_scope.cancel()

    async def after_restart(cp: ControlPlane, nursery: trio.Nursery) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cp.http_port}",
                                     headers={"Authorization": f"Bearer {token}"}) as http:
            listed = (await http.get("/api/v2/admin/releases")).json()
            wrong = await http.get("/api/v2/admin/releases", headers={
                "Authorization": "Bearer nope"})
            anonymous = await http.post("/api/v2/admin/releases", headers={
                "Authorization": ""}, json={})
        assert [r["measurements"]["rtmr1"] for r in listed["releases"]] == [[R1]]
        assert listed["release_keys"] == ["rel"]
        assert (wrong.status_code, anonymous.status_code) == (403, 401)
        refused = await register(cp, nursery, "vm-old-4", old_image)
        assert refused.registered is None
        assert (await register(cp, nursery, "vm-new-2", new_image)).registered is not None
        nursery.cancel_scope.cancel()

    async def key_removed(cp: ControlPlane, nursery: trio.Nursery) -> None:
        # The bundle no longer pins the key: the kept release is dropped at start, said
        # in an event, and the old image is admitted again.
        assert cp.releases == {}
        assert any(e.kind == "manifest.refused" and "dropped (release_untrusted"
                   in e.data["detail"] for e in cp.events.recent)
        assert (await register(cp, nursery, "vm-old-5", old_image)).registered is not None
        nursery.cancel_scope.cancel()

    with trio.fail_after(90):
        await run_cp(first)
        # The records database goes; the admitted release (a signed manifest) stays.
        for db in data.glob("*.db*"):
            db.unlink()
        shutil.rmtree(data / "records", ignore_errors=True)
        await run_cp(after_restart)
        await run_cp(concurrent_admits)
        # The bundle is re-signed offline without the release key.
        assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                        "--out", str(data), "--cluster-id", "prod", "--root", str(root_pem),
                        "--policy", str(tmp_path / "policy.json"), "--force",
                        "--admin-token-sha256", hashlib.sha256(token.encode()).hexdigest()
                        ) == 0
        await run_cp(key_removed)
