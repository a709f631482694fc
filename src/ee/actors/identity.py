"""An agent's proven identity (what its admitted registration established) and a VM
name's durable binding to the session key it first registered with."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs


@attrs.frozen
class Identity:
    agent_id: str
    vm_name: str
    node_size: str
    datacenter: str
    gpu: bool
    public_key: bytes
    provider: str
    mrtd: str
    tcb_status: str | None
    verdict: str  # "pass" | "warn"
    violations: tuple[str, ...]
    verified_at: float  # unix time
    url: str | None = None  # the agent's HTTP API, validated by registration.agent_url
    #: provider ``tpm``: the name (hex) of the AK credential activation proved to live in
    #: the EK certificate's TPM; re-attestation must quote with this AK.
    ak_name: str | None = None


def agent_id_for(cluster_id: str, vm_name: str) -> str:
    """Stable agent id: the same VM name in the same cluster always gets the same id."""
    digest = hashlib.sha256(f"ee/v2/agent-id\0{cluster_id}\0{vm_name}".encode()).hexdigest()
    return f"ag-{digest[:20]}"


def key_sha256(public_key: bytes) -> str:
    """How a session key is named to operators (and in launch-order records)."""
    return hashlib.sha256(public_key).hexdigest()


@attrs.frozen
class Binding:
    """VM name → the session key it registered with first, kept as a signed manifest.

    ``public_key`` is None for a *held* name: its signed binding failed verification at
    load (edited, truncated, signed by another key), so which key owns the name is
    unknown and every registration of it is refused until an operator releases it.
    """

    vm_name: str
    public_key: bytes | None
    bound_at: float  # unix time
    agent_id: str = ""
    problem: str | None = None  # why the name is held

    @property
    def held(self) -> bool:
        return self.public_key is None

    def to_spec(self) -> dict[str, Any]:
        assert self.public_key is not None, "a held binding is never written"
        return {"vm_name": self.vm_name, "public_key": self.public_key.hex(),
                "bound_at": self.bound_at, "agent_id": self.agent_id}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Binding:
        """The binding a verified manifest holds; ValueError when the spec is malformed."""
        name, key, at = spec.get("vm_name"), spec.get("public_key"), spec.get("bound_at")
        if not isinstance(name, str) or not name:
            raise ValueError("binding without a vm_name")
        if not isinstance(key, str) or len(key) != 64:
            raise ValueError(f"binding of {name!r}: public_key must be 64 hex digits")
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise ValueError(f"binding of {name!r}: bound_at must be a number")
        return cls(name, bytes.fromhex(key), float(at), str(spec.get("agent_id") or ""))

    def to_view(self) -> dict[str, Any]:
        return {"vm_name": self.vm_name, "agent_id": self.agent_id or None,
                "key_sha256": key_sha256(self.public_key) if self.public_key else None,
                "bound_at": (datetime.fromtimestamp(self.bound_at, UTC).isoformat()
                             .replace("+00:00", "Z") if self.bound_at else None),
                "state": "held" if self.held else "bound",
                "problem": self.problem}
