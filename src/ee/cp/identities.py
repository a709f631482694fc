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

import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio

from ee.actors.identity import Binding, Identity, key_sha256
from ee.cp.manifests import ManifestStore, ident_of
from ee.cp.registration import VM_NAME, Refusal, check_binding

log = logging.getLogger("ee.cp.identities")

Emit = Callable[[str, str, Mapping[str, Any]], None]


class IdentityBook:
    def __init__(self, manifests: ManifestStore, emit: Emit) -> None:
        self.manifests = manifests
        self.emit = emit
        self.bindings: dict[str, Binding] = {}
        self.drained: set[str] = set()
        self._dirty: set[tuple[str, str]] = set()
        self._wake = trio.Event()
        self._stopping = False
        self._loaded = False
        self._io = trio.Lock()

    # ---- loading -------------------------------------------------------------------

    def _load(self) -> tuple[dict[str, Binding], set[str], list[dict[str, Any]]]:
        """Read and verify every binding and drain manifest (worker thread)."""
        problems: list[dict[str, Any]] = []
        bindings: dict[str, Binding] = {}
        docs, refused = self.manifests.load("bindings")
        for doc in docs:
            try:
                binding = Binding.from_spec(doc)
            except ValueError as exc:
                name = doc.get("vm_name")
                if isinstance(name, str) and VM_NAME.match(name):
                    bindings[name] = Binding(name, None, 0.0, problem=str(exc))
                problems.append({"detail": f"binding: {exc}"})
                continue
            bindings[binding.vm_name] = binding
        for r in refused:
            name = ident_of(r.path)
            problems.append({"detail": f"{r.path}: {r.reason}", "vm_name": name})
            if name is not None and VM_NAME.match(name):
                bindings[name] = Binding(name, None, 0.0, problem=r.reason)
        drains, refused = self.manifests.load("drains")
        problems += [{"detail": f"{r.path}: {r.reason}"} for r in refused]
        drained = {str(d["agent_id"]) for d in drains
                   if isinstance(d.get("agent_id"), str) and d.get("draining") is True}
        return bindings, drained, problems

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Load once (before the agent plane opens), then write what changes."""
        self._stopping = False
        if not self._loaded:
            bindings, drained, problems = await trio.to_thread.run_sync(self._load)
            self.bindings.update(bindings)
            self.drained.update(drained)
            self._loaded = True
            for p in problems:
                self.emit("manifest.refused", "cp", p)
            for b in bindings.values():
                if b.held:
                    log.error("VM name %s is held: its binding failed verification (%s)",
                              b.vm_name, b.problem)
                    self.emit("identity.held", b.vm_name, {"problem": b.problem})
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()
            if self._stopping:
                return

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def flush(self) -> None:
        while self._dirty:
            kind, ident = self._dirty.pop()
            async with self._io:
                try:
                    await trio.to_thread.run_sync(self._sync_one, kind, ident)
                except OSError as exc:
                    log.error("could not write the %s manifest of %s: %s", kind, ident, exc)
                    self.emit("manifest.write_failed", ident, {"kind": kind,
                                                               "error": str(exc)})

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

    def views(self) -> list[dict[str, Any]]:
        return [self.bindings[n].to_view() for n in sorted(self.bindings)]

    # ---- drains --------------------------------------------------------------------

    def drain_changed(self, agent_id: str) -> None:
        self._mark("drains", agent_id)


__all__ = ["IdentityBook"]
