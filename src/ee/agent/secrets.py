"""The agent's side of tenant secrets: its X25519 key, and released values on tmpfs.

Theory of operation
-------------------
The agent process makes one X25519 key pair at start, in memory only; the CP learns
the public half through ``secrets_key`` (signed by the session key the agent's quote
binds, see ``ee.protocol.sealing``). A new process has a new key, so a release
recorded for an earlier process (or for another agent) never opens here.

A ``secret_release`` is judged, in this order, before anything is written:

1. ``recipient`` must be this process's key (``SECRET_NOT_FOR_ME``);
2. the deployment must be one this agent runs (``SECRET_UNKNOWN_DEPLOYMENT``);
3. the release ``nonce`` must be new to this process (``SECRET_REPLAYED``), and the
   secret version not older than the one held (``SECRET_STALE``);
4. it must open with this key and the release's fields as associated data
   (``SECRET_UNSEALABLE``).

The plaintext lives in a ``bytearray`` that is zeroed once written. Each deployment has
a directory ``<base>/<slug>/`` on a tmpfs (``/dev/shm`` by default: never on disk),
0755 so the container's user can traverse it (the root is 0700, made when first
needed and removed with the last deployment), bind-mounted read-only at
``/run/secrets`` into every service by the runner (``ee.agent.workload``). A value is
written to a temporary file in that directory and renamed over ``NAME``: a reader
sees the old file or the new one, never half of one; the old inode is then
overwritten with zeros (so a process still holding it open reads nothing of the old
value) and released. Revocation (a ``secret_revoke``, an undeploy) does the same
wipe and removes the file; the deployment's directory goes at undeploy.

A version may feed an environment variable from a secret (``"as": "env"``): the runner
asks :meth:`SecretStore.write_env` for ``<root>/<slug>.env`` (``VAR=value`` lines, on
the same tmpfs but outside the directory the containers see) and names it as the
services' ``env_file``. It exists only while every such secret is held; a revocation
wipes it with the values (a running container keeps the environment it started with:
that is what an environment is).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ee.agent.workload import env_file_text
from ee.protocol.messages import SecretAck, SecretRelease, SecretRevoke
from ee.protocol.sealing import (
    SealError,
    open_release,
    release_aad,
    secrets_key_document,
    x25519_public_bytes,
)
from ee.protocol.signing import sign_document

__all__ = ["DEFAULT_BASE", "SecretRefused", "SecretStore", "secrets_base"]

log = logging.getLogger("ee.agent.secrets")

DEFAULT_BASE = Path("/dev/shm")
MAX_NONCES = 4096  # remembered release nonces (oldest forgotten first)
MAX_ENV_SECRET_BYTES = 32 * 1024  # an environment variable's value, at most


def secrets_base(data_dir: Path, base: Path = DEFAULT_BASE) -> Path:
    """This agent's secrets root on tmpfs (one per data dir, so agents sharing a host
    do not share secrets)."""
    digest = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:12]
    return base / f"ee-secrets-{digest}"


class SecretRefused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def _slug(deployment_id: str) -> str:
    return hashlib.sha256(deployment_id.encode()).hexdigest()[:24]


def _wipe(path: Path) -> None:
    """Overwrite *path*'s inode with zeros (it may be open elsewhere), then unlink it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.write(fd, bytes(size))
        os.fsync(fd)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)


@attrs.define
class _Held:
    version: int


class SecretStore:
    """One agent process's secrets (see the module docstring). Blocking file I/O: call
    :meth:`apply`/:meth:`revoke` from a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = X25519PrivateKey.generate()
        self.public_key = x25519_public_bytes(self.key)
        self._nonces: OrderedDict[bytes, None] = OrderedDict()
        self._held: dict[tuple[str, str], _Held] = {}
        # Fail closed: what an earlier process was given is wiped (the directories stay,
        # running containers have them mounted); the CP releases again to this key.
        if self.root.is_dir() and not self.root.is_symlink():
            for directory in self.root.iterdir():
                if directory.is_dir() and not directory.is_symlink():
                    for path in directory.iterdir():
                        _wipe(path)
                elif directory.is_file():  # an env-secret file
                    _wipe(directory)

    def prove(self, nonce: bytes, session_key: Ed25519PrivateKey) -> bytes:
        """The session key's signature vouching for this process's X25519 key."""
        return sign_document(secrets_key_document(nonce, self.public_key), session_key)

    def directory(self, deployment_id: str) -> Path:
        """The deployment's secrets directory (made, empty, if missing)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # made when first used
        os.chmod(self.root, 0o700)
        path = self.root / _slug(deployment_id)
        path.mkdir(mode=0o755, exist_ok=True)
        os.chmod(path, 0o755)
        return path

    def env_path(self, deployment_id: str) -> Path:
        """Where :meth:`write_env` writes the deployment's env-secret file."""
        return self.root / f"{_slug(deployment_id)}.env"

    def write_env(self, deployment_id: str, variables: Mapping[str, str]) -> None:
        """Write ``VAR=value`` for each *variables* entry (VAR -> secret name) to
        :meth:`env_path`; KeyError while a secret is not released yet, ValueError for a
        value an env file cannot carry (a newline, CR or NUL)."""
        directory = self.directory(deployment_id)
        text = bytearray()
        try:
            values: dict[str, str] = {}
            for variable, name in sorted(variables.items()):
                if (deployment_id, name) not in self._held:
                    raise KeyError(name)
                fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    value = bytearray(os.read(fd, MAX_ENV_SECRET_BYTES + 1))
                finally:
                    os.close(fd)
                try:
                    if len(value) > MAX_ENV_SECRET_BYTES or any(c in value for c in b"\r\x00"):
                        raise ValueError("a CR or NUL, or over "
                                         f"{MAX_ENV_SECRET_BYTES} bytes")
                    values[variable] = value.decode("utf-8")
                except ValueError as exc:
                    reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
                    raise ValueError(f"secret {name!r} cannot be an environment variable "
                                     f"({reason})") from None
                finally:
                    value[:] = bytes(len(value))
            # Quoted and escaped as the Compose CLI's dotenv reads it back exactly: no
            # ``${...}`` expansion from the CLI's environment, no value running into the
            # next line (the str copies cannot be zeroed; the bytes are).
            text += env_file_text(values).encode("utf-8")
            values.clear()
            final = self.env_path(deployment_id)
            tmp = self.root / f".{final.name}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)
            _wipe(final)
            os.replace(tmp, final)
        finally:
            text[:] = bytes(len(text))

    def held(self, deployment_id: str) -> dict[str, int]:
        return {name: h.version for (dep, name), h in self._held.items() if dep == deployment_id}

    def apply(self, msg: SecretRelease, runs: bool) -> SecretAck:
        """Judge and apply one release (*runs*: this agent runs its deployment)."""
        try:
            self._apply(msg, runs)
        except SecretRefused as exc:
            log.warning("secret %s v%d for %s refused: %s", msg.name, msg.version,
                        msg.deployment_id, exc)
            return SecretAck(deployment_id=msg.deployment_id, state="refused", name=msg.name,
                             version=msg.version, code=exc.code, reason=exc.reason)
        return SecretAck(deployment_id=msg.deployment_id, state="applied", name=msg.name,
                         version=msg.version)

    def _apply(self, msg: SecretRelease, runs: bool) -> None:
        if msg.recipient != self.public_key:
            raise SecretRefused("SECRET_NOT_FOR_ME",
                                "the release is encrypted to another key than this agent's")
        if not runs:
            raise SecretRefused("SECRET_UNKNOWN_DEPLOYMENT",
                                f"this agent does not run {msg.deployment_id}")
        if msg.nonce in self._nonces:
            raise SecretRefused("SECRET_REPLAYED", "this release nonce was already used")
        held = self._held.get((msg.deployment_id, msg.name))
        if held is not None and msg.version < held.version:
            raise SecretRefused("SECRET_STALE", f"version {msg.version} is older than the "
                                f"held version {held.version}")
        aad = release_aad(deployment_id=msg.deployment_id, name=msg.name,
                          version=msg.version, nonce=msg.nonce, recipient=msg.recipient)
        try:
            value = bytearray(open_release(self.key, msg.ephemeral_key, msg.sealed, aad))
        except SealError as exc:
            raise SecretRefused("SECRET_UNSEALABLE", str(exc)) from None
        self._nonces[msg.nonce] = None
        while len(self._nonces) > MAX_NONCES:
            self._nonces.popitem(last=False)
        try:
            self._write(msg.deployment_id, msg.name, value)
        except OSError as exc:
            raise SecretRefused("SECRET_WRITE_FAILED", f"{type(exc).__name__}") from None
        finally:
            value[:] = bytes(len(value))
        self._held[(msg.deployment_id, msg.name)] = _Held(msg.version)

    def _write(self, deployment_id: str, name: str, value: bytearray) -> None:
        directory = self.directory(deployment_id)
        final = directory / name
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
        old = None
        try:
            old = os.open(final, os.O_WRONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            pass
        try:
            os.replace(tmp, final)  # atomic: readers see the old value or the new one
            if old is not None:  # the replaced inode: zero what it held
                os.write(old, bytes(os.fstat(old).st_size))
                os.ftruncate(old, 0)
        finally:
            if old is not None:
                os.close(old)

    def revoke(self, msg: SecretRevoke) -> SecretAck:
        """Remove (and wipe) one secret, or all of a deployment's."""
        removed = self.remove(msg.deployment_id, msg.name)
        log.info("revoked %s secret(s) of %s: %s", len(removed), msg.deployment_id,
                 msg.reason or "-")
        return SecretAck(deployment_id=msg.deployment_id, state="revoked", name=msg.name,
                         reason=",".join(sorted(removed)))

    def remove(self, deployment_id: str, name: str | None = None) -> list[str]:
        """Wipe one secret (or all) of a deployment, held by this process or not."""
        directory = self.root / _slug(deployment_id)
        names = {n for (d, n) in self._held if d == deployment_id and name in (None, n)}
        if directory.is_dir():
            names |= {p.name for p in directory.iterdir()
                      if not p.name.startswith(".") and name in (None, p.name)}
        for held in names:
            self._held.pop((deployment_id, held), None)
            _wipe(directory / held)
        _wipe(self.env_path(deployment_id))  # its values are no longer released
        return sorted(names)

    def forget(self, deployment_id: str) -> None:
        """Undeploy: wipe every value and remove the deployment's directory."""
        self.remove(deployment_id)
        directory = self.root / _slug(deployment_id)
        if directory.exists():
            for path in directory.iterdir():
                _wipe(path)
            shutil.rmtree(directory, ignore_errors=True)
        try:
            self.root.rmdir()  # the last one: leave nothing behind on the host
        except OSError:
            pass
