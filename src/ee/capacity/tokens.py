"""Bootstrap tokens: the one-time proof that a registering VM was launched for an order.

A token is issued when a provisioner claims a launch order; the provisioner puts it in
the new VM's agent config (``bootstrap_token``), and the agent presents it in its
``register`` frame. The CP keeps only the token's SHA-256 (``TokenBook``), so neither a
leaked manifest nor a leaked record store yields a usable token.

Format: ``eebt1.<pool>.<secret>`` where ``<pool>`` is the URL-safe base64 of
``"<datacenter>/<node_size>"`` and ``<secret>`` 32 random bytes (URL-safe base64). The
pool part only routes the token to its pool actor (``pool_of_token``); it is covered by
the hash, so changing it yields an unknown token, not another pool's.

``TokenBook.consume`` succeeds once per token, before its expiry, for a registration of
the datacenter and node size it was issued for (and, once the provisioner has named the
VM, for that VM). The VM that consumed a token may present it again (an agent keeps its
config and re-registers on every reconnect, also after a CP restart): that is accepted
as ``again`` only for the same VM name *and* the same agent key, and changes nothing;
anyone else gets ``TOKEN_USED``. Refusals carry a code:

===============  ==============================================================
TOKEN_UNKNOWN    no such token (never issued, malformed, or long forgotten)
TOKEN_EXPIRED    past its expiry, or revoked (its claim expired, its order failed)
TOKEN_USED       already consumed by an earlier registration
TOKEN_FOREIGN    issued for another datacenter / node size, or another VM
===============  ==============================================================

Pure: the book is a frozen value; ``consume`` and friends return a new book.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any, Final

import attrs

PREFIX: Final = "eebt1"
SECRET_BYTES: Final = 32
MAX_TOKEN: Final = 512

TOKEN_UNKNOWN: Final = "TOKEN_UNKNOWN"
TOKEN_EXPIRED: Final = "TOKEN_EXPIRED"
TOKEN_USED: Final = "TOKEN_USED"
TOKEN_FOREIGN: Final = "TOKEN_FOREIGN"
REFUSAL_CODES: Final = (TOKEN_UNKNOWN, TOKEN_EXPIRED, TOKEN_USED, TOKEN_FOREIGN)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@attrs.frozen
class IssuedToken:
    token: str = attrs.field(repr=False)  # shown once, to the provisioner
    sha256: str


def issue_token(datacenter: str, node_size: str) -> IssuedToken:
    """A fresh token for a pool; keep only ``sha256``, hand ``token`` out once."""
    pool = _b64(f"{datacenter}/{node_size}".encode())
    token = f"{PREFIX}.{pool}.{_b64(secrets.token_bytes(SECRET_BYTES))}"
    return IssuedToken(token, token_sha256(token))


def pool_of_token(token: str) -> tuple[str, str] | None:
    """``(datacenter, node_size)`` a token routes to, or None if it is not one of ours."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        return None
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    try:
        text = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    datacenter, sep, node_size = text.rpartition("/")
    if not sep or not datacenter or not node_size:
        return None
    return datacenter, node_size


@attrs.frozen
class TokenRefusal:
    code: str = attrs.field(validator=attrs.validators.in_(REFUSAL_CODES))
    reason: str


@attrs.frozen
class TokenEntry:
    order_id: str
    datacenter: str
    node_size: str
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None  # the VM that consumed it
    used_key: str | None = None  # and its agent key (fingerprint), when given
    vm_name: str | None = None  # the VM it is for, once the provisioner said so

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Consumed:
    """The outcome of presenting a token: the new book, and the order or a refusal."""

    book: TokenBook
    order_id: str | None
    refusal: TokenRefusal | None
    again: bool = False  # the consuming VM presented it again (nothing changed)


@attrs.frozen
class TokenBook:
    """Token hashes → what they were issued for. Immutable; operations return a new book."""

    entries: Mapping[str, TokenEntry] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, sha256: str, entry: TokenEntry) -> TokenBook:
        return TokenBook({**self.entries, sha256: entry})

    def revoke(self, sha256: str | None, now: float) -> TokenBook:
        """End a token's validity now (its claim expired, its order failed/was cancelled)."""
        entry = self.entries.get(sha256) if sha256 else None
        if entry is None or sha256 is None or entry.expires_at <= now:
            return self
        return self.add(sha256, attrs.evolve(entry, expires_at=now))

    def name_vm(self, sha256: str | None, vm_name: str) -> TokenBook:
        """Bind a token to the VM the provisioner reported (fulfil)."""
        entry = self.entries.get(sha256) if sha256 else None
        if entry is None or sha256 is None:
            return self
        return self.add(sha256, attrs.evolve(entry, vm_name=vm_name))

    def consume(self, token: str, now: float, *, datacenter: str, node_size: str,
                vm_name: str, agent_key: str | None = None) -> Consumed:
        """Present *token* for a registration of *vm_name* in (*datacenter*, *node_size*).

        *agent_key* identifies the registering agent's session key (e.g. the hex SHA-256
        of its public key); it lets that same agent present the token again later.
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN:
            return self._refuse(TOKEN_UNKNOWN, "not a bootstrap token")
        digest = token_sha256(token)
        # Compare digests in constant time, not the dict lookup's string compare.
        found = next((h for h in self.entries if hmac.compare_digest(h, digest)), None)
        if found is None:
            return self._refuse(TOKEN_UNKNOWN, "this bootstrap token was never issued here")
        entry = self.entries[found]
        if entry.used_at is not None:
            if (entry.used_by == vm_name and entry.used_key is not None
                    and entry.used_key == agent_key):
                return Consumed(self, entry.order_id, None, again=True)
            return self._refuse(TOKEN_USED, f"this bootstrap token was already used by "
                                            f"{entry.used_by}")
        if (entry.datacenter, entry.node_size) != (datacenter, node_size):
            return self._refuse(TOKEN_FOREIGN, (
                f"this bootstrap token is for {entry.datacenter}/{entry.node_size}, not "
                f"{datacenter}/{node_size}"))
        if entry.vm_name is not None and entry.vm_name != vm_name:
            return self._refuse(TOKEN_FOREIGN, f"this bootstrap token is for VM "
                                               f"{entry.vm_name}, not {vm_name}")
        if now >= entry.expires_at:
            return self._refuse(TOKEN_EXPIRED, "this bootstrap token has expired or was "
                                               "revoked")
        book = self.add(found, attrs.evolve(entry, used_at=now, used_by=vm_name,
                                            used_key=agent_key))
        return Consumed(book, entry.order_id, None)

    def _refuse(self, code: str, reason: str) -> Consumed:
        return Consumed(self, None, TokenRefusal(code, reason))

    def prune(self, now: float, remember_s: float) -> TokenBook:
        """Forget tokens expired more than *remember_s* ago (they become UNKNOWN)."""
        kept = {h: e for h, e in self.entries.items() if now < e.expires_at + remember_s}
        return self if len(kept) == len(self.entries) else TokenBook(kept)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"sha256": h, **e.to_json()} for h, e in sorted(self.entries.items())]

    @classmethod
    def from_json(cls, docs: list[dict[str, Any]]) -> TokenBook:
        return cls({d["sha256"]: TokenEntry(**{k: v for k, v in d.items() if k != "sha256"})
                    for d in docs})
