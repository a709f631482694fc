"""Durable operator-facing identity state: VM-name bindings and drain flags.

Theory of operation
-------------------
Both are *desired state* (DESIGN.md §2): signed manifests under
``<data-dir>/manifests/{bindings,drains}/``, so a CP restart, even with the record
store wiped, keeps them. The in-memory copies (``bindings``, ``drained``) are the
truth while the process runs; the files follow them.

* **Bindings.** The first admitted registration of a VM name binds the name to its
  session key (``claim``, called on the event loop, so check-and-bind is atomic). A
  later registration of that name with another key is refused ``KEY_CHANGED`` by the
  Judge (which reads ``bindings``) and again by ``claim``. Only an operator's
  ``release`` frees a name. A binding manifest that fails verification (edited,
  truncated, signed by another key, malformed) is never trusted, but it is not
  ignored either: ignoring it would hand the name to whoever registers first. The
  name (recovered from the file name, :func:`ee.cp.manifests.ident_of`) is *held*:
  every registration of it is refused ``BINDING_INVALID`` until released.
* **Loading.** Start-up only lists the binding manifests; they are verified in the
  background (``run``), and a name asked for first is verified on the spot, so no
  decision ever reads an unverified binding, and 10,000 signatures do not stand
  between a restarted CP and its agents.
* **Drains.** The agent actors flip ``drained`` (a plain set they share) and emit
  ``agent.drain``; the CP tells us through ``drain_changed``.

Writing: changes only mark ``(kind, id)`` dirty and wake the writer task, which
writes or deletes each manifest to match memory *at write time* (in a worker thread,
under one lock), so a burst of changes coalesces and the order of writes cannot leave
a stale file. ``release`` deletes under the same lock before it returns: a released
name is released durably. On a graceful stop the writer flushes what is dirty. A
binding made in the last instant before a crash may be lost (the next registration of
that name binds it again); a deleted file is not detected (whoever can delete files in
the data dir can also replace the CP key).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import trio

from ee.actors.identity import Binding, Identity, key_sha256
from ee.cp.manifests import ManifestStore, ident_of
from ee.cp.registration import VM_NAME, Refusal, check_binding
from ee.protocol.signing import SignatureError, read_enveloped

log = logging.getLogger("ee.cp.identities")

Emit = Callable[[str, str, Mapping[str, Any]], None]

#: binding manifests verified per worker-thread hop after start-up
VERIFY_BATCH: Final = 500
#: seconds after start-up before the background verification begins
VERIFY_AFTER_S: Final = 10.0
#: manifests written per worker-thread hop
WRITE_BATCH: Final = 256


class IdentityBook:
    def __init__(self, manifests: ManifestStore, emit: Emit,
                 verify_after_s: float = VERIFY_AFTER_S) -> None:
        self.manifests = manifests
        self.emit = emit
        self.verify_after_s = verify_after_s
        self.bindings: dict[str, Binding] = {}
        self.drained: set[str] = set()
        self._dirty: set[tuple[str, str]] = set()
        self._wake = trio.Event()
        self._stopping = False
        self._loaded = False
        self._io = trio.Lock()
        #: VM names whose binding manifest is listed but not verified yet (see ``run``)
        self._pending: dict[str, bool] = {}
        #: one verifier of what is pending at a time (the background one, ``views``): N
        #: callers at once would each verify every pending binding, N times the work
        self._settling = trio.Lock()

    # ---- loading -------------------------------------------------------------------

    def _load(self) -> tuple[dict[str, Binding], set[str], list[dict[str, Any]], list[str]]:
        """List the binding manifests, read every drain manifest (worker thread).

        A binding manifest whose file name gives back its VM name is only *listed*
        here (its name is returned, to verify later); the others are verified now."""
        problems: list[dict[str, Any]] = []
        bindings: dict[str, Binding] = {}
        pending: list[str] = []
        folder = self.manifests.root / "bindings"
        files = os.listdir(folder) if folder.is_dir() else []
        for path in (folder / f for f in files if f.endswith(".json")):
            name = ident_of(path)
            if name is not None and VM_NAME.match(name):
                pending.append(name)
                continue
            binding, problem = self._verify(path, None)
            problems.append(problem or {"detail": f"{path}: not named for its VM"})
            if binding is not None and not binding.held:
                bindings[binding.vm_name] = binding
        drains, refused = self.manifests.load("drains")
        problems += [{"detail": f"{r.path}: {r.reason}"} for r in refused]
        drained = {str(d["agent_id"]) for d in drains
                   if isinstance(d.get("agent_id"), str) and d.get("draining") is True}
        return bindings, drained, problems, pending

    def _verify(self, path: Path, name: str | None
                ) -> tuple[Binding | None, dict[str, Any] | None]:
        """One binding manifest, verified: (its binding, or the held one of *name*; the
        problem to report, if any)."""
        try:
            doc = read_enveloped(path, self.manifests.key.public_key())
        except FileNotFoundError:
            return None, None
        except SignatureError as exc:
            log.error("manifest refused: %s: %s", path, exc)
            return (None if name is None else Binding(name, None, 0.0, problem=str(exc)),
                    {"detail": f"{path}: {exc}", "vm_name": name})
        try:
            if doc.get("kind") != "bindings" or not isinstance(doc.get("spec"), dict):
                raise ValueError("not a manifest of this kind")
            binding = Binding.from_spec(doc["spec"])
            if name is not None and binding.vm_name != name:
                raise ValueError(f"its file is named for {name!r}")
        except ValueError as exc:
            held = name if name is not None else doc.get("spec", {}).get("vm_name")
            return (Binding(held, None, 0.0, problem=str(exc))
                    if isinstance(held, str) and VM_NAME.match(held) else None,
                    {"detail": f"binding: {exc}"})
        return binding, None

    def _verify_names(self, names: list[str]
                      ) -> list[tuple[str, Binding | None, dict[str, Any] | None]]:
        return [(n, *self._verify(self.manifests.path("bindings", n), n)) for n in names]

    def _settle(self, name: str, binding: Binding | None,
                problem: dict[str, Any] | None) -> None:
        """Take *name*'s verified binding in (event loop), unless it was settled."""
        if self._pending.pop(name, None) is None:
            return
        if problem is not None:
            self.emit("manifest.refused", "cp", problem)
        if binding is None:
            return
        self.bindings[name] = binding
        if binding.held:
            log.error("VM name %s is held: its binding failed verification (%s)",
                      name, binding.problem)
            self.emit("identity.held", name, {"problem": binding.problem})

    def _ensure(self, name: str) -> None:
        """Verify *name*'s binding now if it is still pending (one signature)."""
        if name in self._pending:
            self._settle(name, *self._verify(self.manifests.path("bindings", name), name))

    async def _verify_pending(self) -> None:
        """Verify the listed bindings in the background, a batch per worker thread, once
        the rest of the CP has started (verification holds the GIL: it would slow the
        start-up down, and the agents that come back first are verified on the spot)."""
        await trio.sleep(self.verify_after_s)
        await self._settle_pending()

    def prepare(self, name: str) -> Callable[[], Callable[[], None] | None] | None:
        """For a registration of *name* whose binding is still pending: work to run in
        the registration's worker thread (read and verify the manifest), returning what
        takes it in on the event loop (None when it could not be read: ``claim`` then
        verifies it on the spot, as before). None when nothing is pending. After a
        restart every returning agent's name is pending; verified here, off the loop,
        ``claim`` finds it settled."""
        if name not in self._pending:
            return None
        path = self.manifests.path("bindings", name)

        def work() -> Callable[[], None] | None:
            try:
                binding, problem = self._verify(path, name)
            except Exception:  # left to claim, which verifies it on the loop
                log.exception("binding of %s: verifying it ahead of its claim", name)
                return None
            return lambda: self._settle(name, binding, problem)

        return work

    async def _settle_pending(self) -> None:
        """Verify every binding still pending, a batch per worker thread (never on the
        event loop: 10,000 signatures would stall every agent's heartbeat). A caller that
        finds another verifying waits for it, then has nothing left to do."""
        async with self._settling:
            while self._pending:
                batch = list(itertools.islice(self._pending, VERIFY_BATCH))
                for name, binding, problem in await trio.to_thread.run_sync(
                        self._verify_names, batch):
                    self._settle(name, binding, problem)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Load once (before the agent plane opens), then write what changes.

        Start-up cost is one directory listing: the binding manifests (one per VM name
        ever admitted: 10,000 and more) are verified after ``started``, a batch per
        worker thread, and a name whose binding is asked for before its turn (a
        registration's ``claim``, a ``release``) is verified on the spot; ``views``
        verifies what is still pending in worker threads first. The Judge's early check
        may therefore not see a binding yet; ``claim`` always does, and it is the check
        that binds (see the module docstring)."""
        self._stopping = False
        async with trio.open_nursery() as nursery:
            if not self._loaded:
                bindings, drained, problems, pending = await trio.to_thread.run_sync(
                    self._load)
                self.bindings.update(bindings)
                self.drained.update(drained)
                self._pending.update(dict.fromkeys(pending, True))
                self._loaded = True
                for p in problems:
                    self.emit("manifest.refused", "cp", p)
            nursery.start_soon(self._verify_pending)
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
                if self._stopping:
                    nursery.cancel_scope.cancel()
                    return

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def flush(self) -> None:
        """Write what is dirty, up to ``WRITE_BATCH`` manifests per worker-thread hop (a
        fleet joining binds thousands of names within seconds)."""
        while self._dirty:
            batch = [self._dirty.pop() for _ in range(min(len(self._dirty), WRITE_BATCH))]
            async with self._io:
                failed = await trio.to_thread.run_sync(self._sync_many, batch)
            for kind, ident, exc in failed:
                log.error("could not write the %s manifest of %s: %s", kind, ident, exc)
                self.emit("manifest.write_failed", ident, {"kind": kind, "error": str(exc)})

    def _sync_many(self, batch: list[tuple[str, str]]) -> list[tuple[str, str, OSError]]:
        failed = []
        for kind, ident in batch:
            try:
                self._sync_one(kind, ident)
            except OSError as exc:
                failed.append((kind, ident, exc))
        return failed

    def _sync_one(self, kind: str, ident: str) -> None:
        """Make the manifest of (kind, ident) match memory (worker thread)."""
        if kind == "bindings":
            binding = self.bindings.get(ident)
            if binding is None:
                self.manifests.delete(kind, ident)
            elif not binding.held:
                self.manifests.write(kind, ident, binding.to_spec())
        elif ident in self.drained:
            self.manifests.write(kind, ident, {"agent_id": ident, "draining": True})
        else:
            self.manifests.delete(kind, ident)

    def _mark(self, kind: str, ident: str) -> None:
        self._dirty.add((kind, ident))
        self._wake.set()

    # ---- bindings ------------------------------------------------------------------

    def claim(self, identity: Identity, now: float) -> Refusal | None:
        """Bind *identity*'s VM name to its key, or say why not (synchronous: atomic on
        the event loop). Idempotent for the bound key."""
        name = identity.vm_name
        self._ensure(name)
        refusal = check_binding(self.bindings.get(name), name, identity.public_key)
        if refusal is not None:
            self.emit("identity.conflict", name, {"code": refusal.code,
                                                  "key_sha256": key_sha256(identity.public_key)})
            return refusal
        if name not in self.bindings:
            self.bindings[name] = Binding(name, identity.public_key, now, identity.agent_id)
            self._mark("bindings", name)
            self.emit("identity.bound", name, {"agent_id": identity.agent_id,
                                               "key_sha256": key_sha256(identity.public_key)})
        return None

    async def release(self, vm_name: str, *, by: str = "admin") -> Binding | None:
        """Forget *vm_name*'s binding, durably; the released binding, or None if the
        name was not bound."""
        self._ensure(vm_name)
        binding = self.bindings.pop(vm_name, None)
        if binding is None:
            return None
        self._dirty.discard(("bindings", vm_name))
        async with self._io:
            await trio.to_thread.run_sync(self.manifests.delete, "bindings", vm_name)
        view = binding.to_view()
        self.emit("identity.released", vm_name, {
            "by": by, "key_sha256": view["key_sha256"], "was": view["state"]})
        return binding

    async def views(self) -> list[dict[str, Any]]:
        await self._settle_pending()
        return [self.bindings[n].to_view() for n in sorted(self.bindings)]

    # ---- drains --------------------------------------------------------------------

    def drain_changed(self, agent_id: str) -> None:
        self._mark("drains", agent_id)


__all__ = ["IdentityBook"]
