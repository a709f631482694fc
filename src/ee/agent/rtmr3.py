"""RTMR3: what this agent deployed, measured into the TD and logged for replay.

Theory of operation
-------------------
RTMR0..2 are the firmware's and the kernel's; RTMR3 is ours. Each time the agent
deploys a workload it records a `RuntimeEvent` {type "deploy", app, version,
deployment_id, compose_hash} in two places, in this order:

1. the runtime log: one canonical JSON line appended and fsynced (the format and its
   replay live in `ee.attestation.eventlog`, so verifiers and the agent share them);
2. the register: ``RTMR3 = SHA384(RTMR3 || SHA384(canonical event))``.

A quote then binds the register, and anyone holding the log can replay it and check
that it explains the quoted RTMR3, so "this TD runs compose hash X" is proven by the
quote rather than claimed. Appending before extending means a crash between the two
leaves a log with exactly one event the register lacks; `RuntimeMeasurements.open`
finishes that extend (and refuses any other disagreement), so the log and the
register never silently diverge.

Registers (`open_register`):

* ``tsm`` (TDX): the tdx_guest driver's measurement-register sysfs, Linux >= 6.16
  (Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest):
  ``/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384`` reads as the 48
  raw bytes of RTMR3, and writing 48 bytes extends it. Older kernels (configfs-tsm
  offers reports only, no RTMR extension) raise `Rtmr3Unavailable`: a TDX agent
  that cannot measure its deployments must say so, not pretend.
* ``sim`` / ``tpm``: a software register (`SoftwareRegister`) whose value starts as
  the replay of the existing log (it lives as long as the log does). The sim
  provider can put it in its quotes' RTMR3; a vTPM quote does not carry it, so for
  ``tpm`` the log is informational only.

The log must live exactly as long as the register (`runtime_log_path`): on a TD
(``tsm``), in tmpfs, ``/run/easyenclave/rtmr3.jsonl``, so that both reset on reboot;
with a software register (``sim``, ``tpm``), ``<data_dir>/rtmr3.jsonl``, which is the
register's only memory, so an agent restarted on the same data dir resumes it.

The agent (`ee.agent.server`) measures a deployment after the workload policy
accepted it and before ``compose up`` runs it (`ee.agent.workload.ComposeRunner`); a
failure to measure fails the deploy and nothing starts. Deployments adopted after an
agent restart are measured again if the log's last event for them does not name their
compose hash (a TD reboot resets RTMR3 while dockerd may keep the containers). The
attested health (``GET /.ee/health?attest=true``) serves `AttestationLogs`: the log as
read just before the quote was taken, so it explains the quoted RTMR3 unless a deploy
landed in between (the replay then mismatches and the client asks again).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Protocol

import attrs

from ee.attestation.eventlog import (
    MAX_LOG_BYTES,
    MAX_RUNTIME_EVENTS,
    RuntimeEvent,
    RuntimeLogError,
    parse_runtime_log,
    replay_digests,
    replay_runtime,
)

TDX_RTMR3 = Path("/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384")
TD_RUNTIME_LOG = Path("/run/easyenclave/rtmr3.jsonl")  # tmpfs: resets with the TD
RUNTIME_LOG_FILE = "rtmr3.jsonl"  # under the data dir, for software registers
CCEL = Path("/sys/firmware/acpi/tables/data/CCEL")  # the firmware's RTMR0..2 event log
DIGEST_SIZE = 48


class Rtmr3Error(Exception):
    """RTMR3 could not be read or extended, or its log does not explain it."""


class Rtmr3Unavailable(Rtmr3Error):
    """This platform offers no way to extend RTMR3."""


class Register(Protocol):
    """An extend-only 48-byte register."""

    @property
    def kind(self) -> str: ...

    def read(self) -> bytes: ...

    def extend(self, digest: bytes) -> None: ...


def _check_digest(digest: bytes) -> None:
    if len(digest) != DIGEST_SIZE:
        raise Rtmr3Error(f"an RTMR3 extend takes {DIGEST_SIZE} bytes, not {len(digest)}")


@attrs.define
class SysfsRegister:
    """RTMR3 through the tdx_guest measurement sysfs attribute (binary, 48 bytes)."""

    path: Path = TDX_RTMR3

    @property
    def kind(self) -> str:
        return "tdx-sysfs"

    def read(self) -> bytes:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise Rtmr3Error(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if len(raw) != DIGEST_SIZE:
            raise Rtmr3Error(f"{self.path} gave {len(raw)} bytes, not {DIGEST_SIZE}")
        return raw

    def extend(self, digest: bytes) -> None:
        _check_digest(digest)
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                written = os.write(fd, digest)
            finally:
                os.close(fd)
        except OSError as exc:
            raise Rtmr3Error(f"cannot extend {self.path}: {exc.strerror or exc}") from None
        if written != DIGEST_SIZE:
            raise Rtmr3Error(f"{self.path} took {written} of {DIGEST_SIZE} bytes")


@attrs.define
class SoftwareRegister:
    """A register kept in memory (sim and tpm providers)."""

    value: bytes = bytes(DIGEST_SIZE)

    @property
    def kind(self) -> str:
        return "software"

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        _check_digest(digest)
        self.value = hashlib.sha384(self.value + digest).digest()


def open_register(provider: str, *, sysfs: Path = TDX_RTMR3) -> Register:
    """The RTMR3 register for attestation *provider* (see the module docstring)."""
    if provider == "tsm":
        if not sysfs.exists():
            raise Rtmr3Unavailable(
                f"{sysfs} is missing: this kernel cannot extend RTMR3 (the tdx_guest "
                "measurement sysfs needs Linux >= 6.16)"
            )
        return SysfsRegister(sysfs)
    if provider in ("sim", "tpm"):
        return SoftwareRegister()
    raise Rtmr3Unavailable(f"no RTMR3 for attestation provider {provider!r}")


def runtime_log_path(provider: str, data_dir: Path) -> Path:
    """Where the runtime log lives for *provider*: as long as its register does."""
    return TD_RUNTIME_LOG if provider == "tsm" else data_dir / RUNTIME_LOG_FILE


@attrs.frozen
class AttestationLogs:
    """What the attested health serves beside its quote: the firmware's event log
    (binary CCEL, RTMR0..2) and the runtime log's events (RTMR3), each None when this
    agent has none."""

    event_log: bytes | None = None
    runtime_log: tuple[RuntimeEvent, ...] | None = None


def read_boot_log(path: Path = CCEL) -> bytes | None:
    """The firmware's CC event log (binary CCEL) to serve beside a quote, or None when
    this platform has none (sim, tpm, a kernel without the ACPI table data file)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_LOG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Rtmr3Error(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_LOG_BYTES:
        raise Rtmr3Error(f"{path} is larger than {MAX_LOG_BYTES} bytes")
    return raw


class RuntimeMeasurements:
    """The runtime log file and the register it explains (thread-safe; blocking: call it
    from a worker thread on an event loop)."""

    def __init__(self, register: Register, log_path: Path) -> None:
        self.register = register
        self.log_path = log_path
        self._lock = threading.Lock()
        self._events: tuple[RuntimeEvent, ...] = ()

    @classmethod
    def open(cls, register: Register, log_path: Path) -> RuntimeMeasurements:
        """Load the log and reconcile it with the register: a software register starts
        at the log's replay; a hardware one must equal it, or lack only the last event
        (a crash between append and extend), which is then extended."""
        self = cls(register, log_path)
        try:
            raw = log_path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            raise Rtmr3Error(f"cannot read {log_path}: {exc.strerror or exc}") from None
        try:
            events = parse_runtime_log(raw)
        except RuntimeLogError as exc:
            raise Rtmr3Error(f"{log_path}: {exc}") from None
        if isinstance(register, SoftwareRegister):
            register.value = replay_runtime(events)
        else:
            current = register.read()
            if current != replay_runtime(events):
                if events and current == replay_runtime(events[:-1]):
                    register.extend(events[-1].digest)
                else:
                    raise Rtmr3Error(
                        f"RTMR3 {current.hex()} is not explained by the {len(events)} "
                        f"events of {log_path}"
                    )
        self._events = events
        return self

    @property
    def events(self) -> tuple[RuntimeEvent, ...]:
        return self._events

    def record(self, event: RuntimeEvent) -> bytes:
        """Append *event* to the log, then extend RTMR3 with its digest; returns the new
        RTMR3. Raises `Rtmr3Error` (the deploy must then not claim to be measured)."""
        with self._lock:
            if len(self._events) >= MAX_RUNTIME_EVENTS:
                raise Rtmr3Error(f"the runtime log is full ({MAX_RUNTIME_EVENTS} events)")
            line = event.canonical() + b"\n"
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise Rtmr3Error(
                    f"cannot append to {self.log_path}: {exc.strerror or exc}"
                ) from None
            self._events = (*self._events, event)
            self.register.extend(event.digest)
            return self.register.read()

    def record_deploy(
        self, *, app: str, version: str, deployment_id: str, compose_hash: str
    ) -> bytes:
        """`record` a deploy event (ValueError when a field is not acceptable)."""
        return self.record(
            RuntimeEvent(
                type="deploy",
                app=app,
                version=version,
                deployment_id=deployment_id,
                compose_hash=compose_hash,
            )
        )

    def measured(self, deployment_id: str, compose_hash: str) -> bool:
        """Whether the log's last event for *deployment_id* names *compose_hash*."""
        with self._lock:
            events = self._events
        for event in reversed(events):
            if event.deployment_id == deployment_id:
                return event.compose_hash == compose_hash
        return False

    def check(self) -> bytes:
        """RTMR3, after checking that the log replays to it."""
        with self._lock:
            value = self.register.read()
            if value != replay_digests(e.digest for e in self._events):
                raise Rtmr3Error("RTMR3 no longer equals the replay of the runtime log")
            return value

