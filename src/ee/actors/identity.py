"""An agent's proven identity: what its admitted registration established."""

from __future__ import annotations

import hashlib

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
    url: str | None = None  # the agent's HTTP API, as it announced it


def agent_id_for(cluster_id: str, vm_name: str) -> str:
    """Stable agent id: the same VM name in the same cluster always gets the same id."""
    digest = hashlib.sha256(f"ee/v2/agent-id\0{cluster_id}\0{vm_name}".encode()).hexdigest()
    return f"ag-{digest[:20]}"
