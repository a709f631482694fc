"""IdentityBook start-up at scale: binding manifests are verified after the book has
started (not before the agent plane opens), and no decision reads an unverified one: a
name asked for before its turn is verified on the spot."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.actors.identity import Binding, Identity
from ee.cp.identities import VERIFY_BATCH, IdentityBook
from ee.cp.manifests import ManifestStore

NAMES = 2 * VERIFY_BATCH + 7


def _identity(name: str, key: bytes) -> Identity:
    return Identity(agent_id=f"agt-{name}", vm_name=name, node_size="standard",
                    datacenter="load:z0", gpu=False, public_key=key, provider="sim",
                    mrtd="00" * 48, tcb_status="UpToDate", verdict="pass", violations=(),
                    verified_at=0.0)


def _book(tmp_path: Path, verify_after_s: float = 0.0
          ) -> tuple[IdentityBook, list[tuple[str, str, Any]], dict[str, bytes]]:
    store = ManifestStore(tmp_path / "manifests", Ed25519PrivateKey.generate())
    keys = {f"vm-{i:05d}": os.urandom(32) for i in range(NAMES)}
    for name, key in keys.items():
        store.write("bindings", name, Binding(name, key, 1.0, f"agt-{name}").to_spec())
    # One forged: signed by another key. Its name must be held, never bound.
    ManifestStore(store.root, Ed25519PrivateKey.generate()).write(
        "bindings", "vm-00003", Binding("vm-00003", os.urandom(32), 1.0).to_spec())
    events: list[tuple[str, str, Any]] = []
    book = IdentityBook(store, lambda kind, subject, data: events.append((kind, subject, data)),
                        verify_after_s)
    return book, events, keys


async def test_bindings_are_verified_after_start_and_all_of_them(tmp_path: Path) -> None:
    book, events, keys = _book(tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(book.run)
            assert book.bindings == {}  # started before verifying any
            while len(book.bindings) < NAMES:  # noqa: ASYNC110 (polling the batches)
                await trio.sleep(0.01)
            book.request_stop()
    assert book.bindings["vm-00003"].held
    assert ("identity.held", "vm-00003", {"problem": book.bindings["vm-00003"].problem}) \
        in events
    assert all(book.bindings[n].public_key == k for n, k in keys.items() if n != "vm-00003")


async def test_a_claim_before_its_turn_verifies_the_binding_first(tmp_path: Path) -> None:
    book, _, keys = _book(tmp_path, verify_after_s=3600)  # on the spot only
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(book.run)
            # No checkpoint since ``started``: nothing is verified yet.
            last = f"vm-{NAMES - 1:05d}"
            refusal = book.claim(_identity(last, os.urandom(32)), 2.0)  # another key
            assert refusal is not None and refusal.code == "KEY_CHANGED"
            forged = book.claim(_identity("vm-00003", os.urandom(32)), 2.0)
            assert forged is not None and forged.code == "BINDING_INVALID"
            assert book.claim(_identity(last, keys[last]), 2.0) is None  # its own key
            released = await book.release("vm-00010")
            assert released is not None and released.public_key == keys["vm-00010"]
            # every name, verified, minus the released; what was still pending is
            # verified in worker threads (1,000s of signatures would stall the loop)
            on_loop: list[str] = []
            verify = book._verify

            def watched(path: Path, name: str | None) -> Any:
                if threading.current_thread() is threading.main_thread():
                    on_loop.append(str(name))
                return verify(path, name)

            book._verify = watched  # type: ignore[method-assign]
            assert len(await book.views()) == NAMES - 1
            assert on_loop == []
            book.request_stop()
    assert not (tmp_path / "manifests" / "bindings").joinpath(
        book.manifests.path("bindings", "vm-00010").name).exists()


async def test_a_registration_verifies_its_binding_off_the_loop(tmp_path: Path) -> None:
    """``prepare``: the admission's worker thread verifies a pending binding and the
    claim that follows finds it settled (after a restart every returning agent's binding
    is pending: ~13 % of the CP's restart time went into verifying them on the loop)."""
    book, _events, keys = _book(tmp_path, verify_after_s=3600)
    name = "vm-00042"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(book.run)
            work = book.prepare(name)
            assert work is not None and name not in book.bindings
            take_in = await trio.to_thread.run_sync(work)
            assert take_in is not None
            take_in()
            assert book.bindings[name].public_key == keys[name]
            assert book.prepare(name) is None  # settled: nothing left to do
            refusal = book.claim(_identity(name, os.urandom(32)), 2.0)  # another key
            assert refusal is not None and refusal.code == "KEY_CHANGED"
            # the forged one, prepared: held, as when verified on the spot
            work = book.prepare("vm-00003")
            assert work is not None
            take_in = await trio.to_thread.run_sync(work)
            assert take_in is not None
            take_in()
            assert book.bindings["vm-00003"].held
            # a name released between the thread's read and its take-in stays released
            victim = "vm-00050"
            work = book.prepare(victim)
            assert work is not None
            take_in = await trio.to_thread.run_sync(work)
            assert await book.release(victim) is not None
            assert take_in is not None
            take_in()
            assert victim not in book.bindings
            book.request_stop()
