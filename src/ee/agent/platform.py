"""What the agent knows about its VM: node facts, resource use, quotes, and its own files.

Node facts and usage come from ``/proc`` (cheap reads of small files, done inline);
quotes come from the configured attestation provider (``tsm`` on real TDX, ``sim`` for
development) and are taken in a worker thread. The agent's persistent identity lives
in its data dir, each file created once with mode 0600:

- ``agent.key``: the Ed25519 session key (PKCS#8 PEM) whose public half is bound into
  every registration and re-attestation quote;
- ``control.secret``: the per-agent secret that guards the agent's admin HTTP routes.
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.agent.config import AgentConfig
from ee.attestation.errors import ProviderError
from ee.attestation.providers import QuoteProvider
from ee.attestation.providers.sim import shared_sim_dir
from ee.protocol.messages import NodeInfo, NodeStats

__all__ = [
    "KEY_FILE",
    "SECRET_FILE",
    "NodeSampler",
    "QuoteSource",
    "load_or_create_key",
    "load_or_create_secret",
    "node_info",
    "outbound_address",
    "public_key_bytes",
    "shared_sim_dir",
    "write_private",
]

KEY_FILE = "agent.key"
SECRET_FILE = "control.secret"


def outbound_address(peer_host: str) -> str:
    """The local IP address that routes towards *peer_host* (no packet is sent).

    Falls back to 127.0.0.1 when *peer_host* does not resolve or nothing routes there.
    """
    try:
        infos = socket.getaddrinfo(peer_host, 9, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            local: str = probe.getsockname()[0]
            return local
    except (OSError, IndexError):
        return "127.0.0.1"


# --- private files ------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> bool:
    """Create *path* with mode 0600 holding *data*; False if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The agent's Ed25519 session key, generated on first use."""
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(path, pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def load_or_create_secret(path: Path) -> tuple[str, bool]:
    """The per-agent control secret and whether it was created just now."""
    created = write_private(path, (secrets.token_urlsafe(32) + "\n").encode("ascii"))
    secret = path.read_text(encoding="ascii").strip()
    if len(secret) < 16:
        raise ValueError(f"{path}: control secret is shorter than 16 characters")
    return secret, created


# --- quotes -------------------------------------------------------------------------


@attrs.frozen
class QuoteSource:
    """The configured attestation provider; quotes are taken in a worker thread."""

    name: str
    provider: QuoteProvider
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))

    @classmethod
    def from_config(
        cls, config: AgentConfig, rtmr3: Callable[[], bytes] | None = None
    ) -> QuoteSource:
        """The provider *config* names; *rtmr3* (the agent's software RTMR3 register's
        ``read``) is what ``sim`` quotes report as RTMR3 (a real TD's quote carries the
        hardware register, a vTPM quote none)."""
        if config.attestation_provider == "sim":
            from ee.attestation.providers.sim import SimProvider, SimTD

            sim_dir = config.sim_dir or os.path.join(config.data_dir, "sim")
            return cls("sim", SimProvider(SimTD.load_or_create(sim_dir), rtmr3=rtmr3))
        if config.attestation_provider == "tpm":
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            from ee.attestation.providers.tpm import TpmProvider

            chain: tuple[bytes, ...] = ()
            if config.tpm_ek_chain is not None:
                pem = Path(config.tpm_ek_chain).read_bytes()
                chain = tuple(c.public_bytes(Encoding.DER)
                              for c in x509.load_pem_x509_certificates(pem))
            return cls("tpm", TpmProvider(config.tpm_tcti, os.path.join(config.data_dir, "tpm"),
                                          ek_chain=chain, event_log=config.tpm_event_log))
        from ee.attestation.providers.tsm import TsmProvider

        return cls("tsm", TsmProvider(config.tsm_root))

    async def quote(self, report_data: bytes) -> bytes:
        return await trio.to_thread.run_sync(
            self.provider.get_quote, report_data, limiter=self.limiter
        )

    async def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Provider ``tpm``: answer the CP's credential challenge (TPM2_ActivateCredential)."""
        from ee.attestation.providers.tpm import TpmProvider

        if not isinstance(self.provider, TpmProvider):
            raise ProviderError(f"provider {self.name} has no credential activation")
        return await trio.to_thread.run_sync(
            self.provider.activate, credential_blob, encrypted_secret, limiter=self.limiter
        )


# --- node facts and usage -----------------------------------------------------------


def _meminfo(proc: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        text = (proc / "meminfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            found[key] = int(parts[0])  # kB
    return found


def node_info(config: AgentConfig, proc: Path = Path("/proc")) -> NodeInfo:
    memory_kb = _meminfo(proc).get("MemTotal", 0)
    return NodeInfo(
        node_size=config.node_size,
        datacenter=config.datacenter,
        gpu=bool(glob.glob("/dev/nvidia[0-9]*")),
        vcpus=max(1, os.cpu_count() or 1),
        memory_mb=max(1, memory_kb // 1024),
    )


class NodeSampler:
    """Node resource use; CPU percent is measured between consecutive samples."""

    def __init__(self, data_dir: str, proc: Path = Path("/proc")) -> None:
        self.data_dir = data_dir
        self.proc = proc
        self._last_cpu: tuple[int, int] | None = None
        self._started = time.monotonic()

    def _cpu_times(self) -> tuple[int, int] | None:
        try:
            first = (self.proc / "stat").read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        if not first or first[0] != "cpu":
            return None
        values = [int(v) for v in first[1:] if v.isdigit()]
        idle = sum(values[3:5])  # idle + iowait
        return sum(values[:8]), idle

    def _uptime(self) -> float:
        try:
            return float((self.proc / "uptime").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return time.monotonic() - self._started

    def sample(self) -> NodeStats:
        cpu = 0.0
        now = self._cpu_times()
        if now is not None and self._last_cpu is not None:
            total = now[0] - self._last_cpu[0]
            idle = now[1] - self._last_cpu[1]
            if total > 0:
                cpu = max(0.0, min(100.0, 100.0 * (total - idle) / total))
        self._last_cpu = now
        mem = _meminfo(self.proc)
        total_kb = mem.get("MemTotal", 0)
        available_kb = mem.get("MemAvailable", mem.get("MemFree", 0))
        try:
            disk = shutil.disk_usage(self.data_dir)
            disk_used, disk_total = disk.used >> 20, disk.total >> 20
        except OSError:
            disk_used = disk_total = 0
        return NodeStats(
            cpu_percent=round(cpu, 2),
            memory_used_mb=max(0, total_kb - available_kb) // 1024,
            memory_total_mb=total_kb // 1024,
            disk_used_mb=disk_used,
            disk_total_mb=disk_total,
            uptime_s=round(max(0.0, self._uptime()), 3),
        )
