"""TCG2 crypto-agile event logs (TPM and TDX CCEL) and the RTMR3 runtime event log.

Theory of operation
-------------------
A measured boot leaves two things: registers that can only be *extended*
(``R = H(R || digest)``, starting at zeros) and a log of what was extended. The
registers are signed (a TDX quote, a TPM quote); the log is not. A verifier therefore
*replays* the log -- extends fresh registers with each event's digest in order -- and
trusts the log's events only if the replayed values equal the signed ones. A log that
replays to the quoted registers cannot omit, add, reorder or alter an event without
breaking SHA-384/SHA-256.

Binary format (TCG PC Client Platform Firmware Profile, "crypto agile"): one SHA-1
format header record ``TCG_PCClientPCREvent`` {u32 pcr, u32 type = EV_NO_ACTION,
20-byte digest, u32 size, data} whose data is the ``TCG_EfiSpecIDEvent`` ("Spec ID
Event03\\0", platform class, version, uintn size, the algorithm table {u16 id, u16
digest size}, vendor info); then ``TCG_PCR_EVENT2`` records {u32 index, u32 type, u32
digest count, (u16 alg, digest)..., u32 size, data}. The digest sizes come from the
header's algorithm table; an algorithm it does not list is malformed. A TPM log
(``/sys/kernel/security/tpm0/binary_bios_measurements``) ends at the end of the file;
a CCEL (``/sys/firmware/acpi/tables/data/CCEL``) is a fixed-size area whose unused tail
is padding (0xFF, sometimes 0x00): a record starting with index 0xFFFFFFFF, or a tail
of only padding bytes, ends it, and everything after must be padding.

Indices: in a TPM log the index is the PCR. In a CCEL it is the CC measurement
register index: 0 = MRTD (never extended by events), 1..4 = RTMR0..3. Replay skips
EV_NO_ACTION records (they are informational), except that a "StartupLocality"
EV_NO_ACTION sets PCR0's initial value to the locality (TPM only).

Parsing is strict: any truncation, unknown algorithm, size beyond the caps or a
digest count that does not match the header raises `EventLogFormatError` naming the
field and the byte offset. Parsing is pure and bounded (`MAX_LOG_BYTES`,
`MAX_EVENTS`, `MAX_EVENT_DATA`); callers on an event loop run it in a thread.

Runtime (RTMR3) log: RTMR3 is extended after boot by our agent (`ee.agent.rtmr3`);
its log is JSON lines, one canonical JSON object per event (`RuntimeEvent`), whose
SHA-384 over the canonical bytes (sorted keys, no spaces, UTF-8) is the digest
extended into RTMR3. JSON rather than binary because the events are ours, few, and
must be readable by operators; canonical encoding makes the digest well defined and
the parser refuses any line that is not already in canonical form.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ee.attestation.errors import AttestationError

# TCG algorithm identifiers -> (name, digest size)
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_SM3 = 0x0012
ALGORITHMS: Mapping[int, tuple[str, int]] = {
    ALG_SHA1: ("sha1", 20),
    ALG_SHA256: ("sha256", 32),
    ALG_SHA384: ("sha384", 48),
    ALG_SHA512: ("sha512", 64),
    ALG_SM3: ("sm3_256", 32),
}

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_EVENT_TAG = 0x00000006
EV_EFI_ACTION = 0x80000007
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_IPL = 0x0000000D
# Event types by name (TCG PC Client PFP, section 10.4.1) for readable output.
EVENT_TYPES: Mapping[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
MAX_LOG_BYTES = 8 * 1024 * 1024
MAX_EVENTS = 10_000
MAX_EVENT_DATA = 1024 * 1024
MAX_ALGORITHMS = 8
MAX_VENDOR_INFO = 255
PCR_COUNT = 24
CC_MR_COUNT = 5  # MRTD, RTMR0..3
END_OF_LOG = 0xFFFFFFFF
_PADDING = (b"\xff", b"\x00")


class EventLogFormatError(AttestationError):
    """The event log bytes are truncated or malformed at *field* (byte *offset*)."""

    def __init__(self, field: str, offset: int, message: str) -> None:
        self.field = field
        self.offset = offset
        self.message = message
        super().__init__(f"malformed event log: {field} at offset {offset}: {message}")


@attrs.frozen
class Event:
    """One TCG_PCR_EVENT2 record. `index` is the PCR (TPM log) or the CC MR index (CCEL:
    1..4 = RTMR0..3); `digests` maps TCG algorithm id to the digest."""

    offset: int
    index: int
    event_type: int
    digests: Mapping[int, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.event_type, f"0x{self.event_type:08x}")

    def to_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "index": self.index,
            "type": self.type_name,
            "digests": {ALGORITHMS[a][0]: d.hex() for a, d in sorted(self.digests.items())},
            "data": self.data.hex() if len(self.data) <= 1024 else None,
            "data_size": len(self.data),
            "description": describe_data(self),
        }


@attrs.frozen
class EventLog:
    """A parsed log: the header's algorithm table and the records after it."""

    algorithms: Mapping[int, int]  # alg id -> digest size, as the header declares
    events: tuple[Event, ...]
    startup_locality: int = 0
    size: int = 0  # bytes up to the end of the last record


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise EventLogFormatError(
                field, self.pos, f"needs {n} bytes, {len(self.raw) - self.pos} left"
            )
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    def rest_is_padding(self) -> bool:
        tail = self.raw[self.pos :]
        return any(tail == pad * len(tail) for pad in _PADDING)


def _parse_header(r: _Reader) -> tuple[dict[int, int], int]:
    start = r.pos
    index = r.u32("header.pcr_index")
    etype = r.u32("header.event_type")
    if etype != EV_NO_ACTION:
        raise EventLogFormatError(
            "header.event_type",
            start + 4,
            f"0x{etype:08x}, not EV_NO_ACTION (a crypto-agile log opens with the Spec ID event)",
        )
    if index != 0:
        raise EventLogFormatError("header.pcr_index", start, f"{index}, not 0")
    r.take(20, "header.digest")
    size = r.u32("header.event_size")
    if size > 4096:
        raise EventLogFormatError("header.event_size", r.pos - 4, f"{size} bytes is too large")
    body_at = r.pos
    body = _Reader(r.take(size, "header.event"))
    sig = body.take(16, "spec_id.signature")
    if sig != SPEC_ID_SIGNATURE:
        raise EventLogFormatError(
            "spec_id.signature",
            body_at,
            f"{sig!r}, not {SPEC_ID_SIGNATURE!r} (only crypto-agile TCG2 logs are supported)",
        )
    body.u32("spec_id.platform_class")
    minor, major, _errata = (
        body.u8("spec_id.version_minor"),
        body.u8("spec_id.version_major"),
        (body.u8("spec_id.errata")),
    )
    if major != 2:
        raise EventLogFormatError("spec_id.version_major", body_at + 21, f"{major}.{minor}")
    body.u8("spec_id.uintn_size")
    count = body.u32("spec_id.number_of_algorithms")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise EventLogFormatError(
            "spec_id.number_of_algorithms", body_at + body.pos - 4, f"{count} (1..{MAX_ALGORITHMS})"
        )
    algs: dict[int, int] = {}
    for i in range(count):
        at = body_at + body.pos
        alg = body.u16(f"spec_id.algorithms[{i}].id")
        dsize = body.u16(f"spec_id.algorithms[{i}].digest_size")
        known = ALGORITHMS.get(alg)
        if known is not None and known[1] != dsize:
            raise EventLogFormatError(
                f"spec_id.algorithms[{i}].digest_size",
                at + 2,
                f"{dsize} for {known[0]}, not {known[1]}",
            )
        if known is None:
            raise EventLogFormatError(f"spec_id.algorithms[{i}].id", at, f"unknown 0x{alg:04x}")
        if alg in algs:
            raise EventLogFormatError(f"spec_id.algorithms[{i}].id", at, "listed twice")
        algs[alg] = dsize
    vendor = body.u8("spec_id.vendor_info_size")
    body.take(vendor, "spec_id.vendor_info")
    if body.pos != size:
        raise EventLogFormatError(
            "spec_id", body_at + body.pos, f"{size - body.pos} bytes after the vendor info"
        )
    return algs, 0


def parse_event_log(raw: bytes, *, max_index: int = PCR_COUNT - 1) -> EventLog:
    """Parse a crypto-agile TCG2 event log (TPM or CCEL). *max_index* caps the register
    index (23 for PCRs, 4 for a CCEL). Raises `EventLogFormatError` only."""
    if len(raw) > MAX_LOG_BYTES:
        raise EventLogFormatError("log", 0, f"{len(raw)} bytes exceeds {MAX_LOG_BYTES}")
    r = _Reader(bytes(raw))
    try:
        algs, _ = _parse_header(r)
        events: list[Event] = []
        locality = 0
        end = r.pos
        while r.pos < len(r.raw):
            if r.rest_is_padding():
                break
            at = r.pos
            i = len(events)
            index = r.u32(f"event[{i}].index")
            if index == END_OF_LOG:
                r.pos = at
                if not r.rest_is_padding():
                    raise EventLogFormatError(
                        f"event[{i}]", at, "bytes after the end-of-log marker are not padding"
                    )
                break
            if len(events) >= MAX_EVENTS:
                raise EventLogFormatError("log", at, f"more than {MAX_EVENTS} events")
            if index > max_index:
                raise EventLogFormatError(
                    f"event[{i}].index", at, f"{index} is beyond the last register {max_index}"
                )
            etype = r.u32(f"event[{i}].event_type")
            count = r.u32(f"event[{i}].digest_count")
            if count != len(algs):
                raise EventLogFormatError(
                    f"event[{i}].digest_count",
                    r.pos - 4,
                    f"{count}, but the header declares {len(algs)} algorithms",
                )
            digests: dict[int, bytes] = {}
            for j in range(count):
                alg_at = r.pos
                alg = r.u16(f"event[{i}].digests[{j}].alg")
                if alg not in algs:
                    raise EventLogFormatError(
                        f"event[{i}].digests[{j}].alg",
                        alg_at,
                        f"0x{alg:04x} is not declared in the header",
                    )
                if alg in digests:
                    raise EventLogFormatError(
                        f"event[{i}].digests[{j}].alg", alg_at, f"0x{alg:04x} appears twice"
                    )
                digests[alg] = r.take(algs[alg], f"event[{i}].digests[{j}].digest")
            size_at = r.pos
            size = r.u32(f"event[{i}].event_size")
            if size > MAX_EVENT_DATA:
                raise EventLogFormatError(
                    f"event[{i}].event_size", size_at, f"{size} bytes exceeds {MAX_EVENT_DATA}"
                )
            data = r.take(size, f"event[{i}].event")
            if (
                etype == EV_NO_ACTION
                and index == 0
                and data.startswith(STARTUP_LOCALITY_SIGNATURE)
                and len(data) == 17
            ):
                locality = data[16]
            events.append(Event(at, index, etype, digests, data))
            end = r.pos
    except EventLogFormatError:
        raise
    except Exception as exc:  # a bug in the parser must not escape as anything else
        raise EventLogFormatError("log", r.pos, f"{type(exc).__name__}: {exc}") from exc
    return EventLog(algorithms=algs, events=tuple(events), startup_locality=locality, size=end)


def parse_ccel(raw: bytes) -> EventLog:
    """Parse a TDX CCEL (indices 0..4: MRTD, RTMR0..3)."""
    log = parse_event_log(raw, max_index=CC_MR_COUNT - 1)
    if ALG_SHA384 not in log.algorithms:
        raise EventLogFormatError("spec_id.algorithms", 0, "a CCEL must carry SHA-384 digests")
    return log


def _hasher(alg: int) -> Any:
    return hashlib.new(ALGORITHMS[alg][0]) if alg != ALG_SM3 else None


def extend(register: bytes, digest: bytes, alg: int) -> bytes:
    """``H(register || digest)`` with the algorithm's hash."""
    h = _hasher(alg)
    if h is None:
        raise EventLogFormatError("replay", 0, "SM3 replay is not supported")
    h.update(register)
    h.update(digest)
    out: bytes = h.digest()
    return out


def replay_pcrs(log: EventLog, alg: int = ALG_SHA256) -> dict[int, bytes]:
    """The PCR values the log replays to in bank *alg* (only PCRs it extends)."""
    if alg not in log.algorithms:
        raise EventLogFormatError("replay", 0, f"the log has no {ALGORITHMS[alg][0]} bank")
    size = log.algorithms[alg]
    pcrs: dict[int, bytes] = {}
    for ev in log.events:
        if ev.event_type == EV_NO_ACTION:
            continue
        start = bytes(size) if ev.index != 0 else bytes(size - 1) + bytes([log.startup_locality])
        pcrs[ev.index] = extend(pcrs.get(ev.index, start), ev.digests[alg], alg)
    return pcrs


def replay_rtmrs(log: EventLog) -> tuple[bytes, bytes, bytes, bytes]:
    """RTMR0..3 as a CCEL replays them (SHA-384; MR index 1..4; RTMR3 usually stays
    zero here: runtime events come from the runtime log)."""
    regs = [bytes(48)] * 4
    for ev in log.events:
        if ev.event_type == EV_NO_ACTION or ev.index == 0:
            continue
        regs[ev.index - 1] = extend(regs[ev.index - 1], ev.digests[ALG_SHA384], ALG_SHA384)
    return regs[0], regs[1], regs[2], regs[3]


def rtmr_mismatches(log: EventLog, quoted: Sequence[bytes]) -> list[str]:
    """Why the CCEL *log* does not explain the quote's RTMR0..2 (*quoted*); empty when
    it does. The one comparison `eectl trust verify-quote` and the CP share."""
    replayed = replay_rtmrs(log)
    return [
        f"RTMR{i} replays to {replayed[i].hex()}, the quote has {quoted[i].hex()}"
        for i in range(3)
        if replayed[i] != quoted[i]
    ]


def replay_digests(digests: Iterable[bytes], alg: int = ALG_SHA384) -> bytes:
    """Extend a zero register with *digests* in order."""
    reg = bytes(ALGORITHMS[alg][1])
    for d in digests:
        reg = extend(reg, d, alg)
    return reg


def describe_data(ev: Event) -> str | None:
    """A short printable description of well-known event data (None when opaque)."""
    data = ev.data
    if ev.event_type in (EV_EFI_ACTION, 0x00000005) or (
        ev.event_type == EV_IPL and data and all(32 <= b < 127 for b in data.rstrip(b"\x00"))
    ):
        return _printable(data.rstrip(b"\x00").decode("ascii", "replace"))
    if ev.event_type == EV_SEPARATOR:
        return f"separator {data.hex()}"
    if ev.event_type == EV_NO_ACTION:
        return _printable(data[:16].rstrip(b"\x00").decode("ascii", "replace"))
    if ev.event_type == EV_EVENT_TAG and len(data) >= 8:
        tag_id, size = struct.unpack_from("<II", data)
        tag = data[8 : 8 + size].rstrip(b"\x00")
        if tag and all(32 <= b < 127 for b in tag):
            return f"tag 0x{tag_id:08x}: " + _printable(tag.decode("ascii"))
        return f"tag 0x{tag_id:08x}"
    if ev.event_type == EV_IPL and len(data) % 2 == 0:
        try:
            wide = data.decode("utf-16-le").rstrip("\x00")
        except UnicodeDecodeError:
            return None
        return _printable(wide)
    return None


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _printable(text: str, limit: int = 200) -> str:
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- building logs (tests, and the predictions' own event lists) -------------------


def encode_header(algorithms: Sequence[int]) -> bytes:
    """The SHA-1-format Spec ID header record declaring *algorithms*."""
    body = SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
    for alg in algorithms:
        body += struct.pack("<HH", alg, ALGORITHMS[alg][1])
    body += b"\x00"
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def encode_event(index: int, event_type: int, digests: Mapping[int, bytes], data: bytes) -> bytes:
    out = struct.pack("<III", index, event_type, len(digests))
    for alg, d in digests.items():
        out += struct.pack("<H", alg) + d
    return out + struct.pack("<I", len(data)) + data


def encode_log(
    events: Iterable[tuple[int, int, bytes]],
    algorithms: Sequence[int] = (ALG_SHA384,),
) -> bytes:
    """A log whose events are (index, type, data), each digested as SHA-x(data)."""
    out = encode_header(algorithms)
    for index, etype, data in events:
        digests = {a: hashlib.new(ALGORITHMS[a][0], data).digest() for a in algorithms}
        out += encode_event(index, etype, digests, data)
    return out


# --- the RTMR3 runtime event log ------------------------------------------------------

RUNTIME_EVENT_FIELDS = ("type", "app", "version", "deployment_id", "compose_hash")
RUNTIME_EVENT_TYPES = frozenset({"deploy"})
MAX_RUNTIME_EVENTS = 10_000
MAX_RUNTIME_LINE = 4096
_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}\Z")
_COMPOSE_HASH = re.compile(r"\Asha256:[0-9a-f]{64}\Z")  # ee.protocol.compose.compose_hash


class RuntimeLogError(AttestationError):
    """A runtime (RTMR3) event log line is malformed; *line* is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"malformed runtime event log: line {line}: {message}")


def _runtime_id(value: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{value!r} is not an identifier")
    return value


def _runtime_type(value: str) -> str:
    if value not in RUNTIME_EVENT_TYPES:
        raise ValueError(f"type {value!r} is not one of {', '.join(sorted(RUNTIME_EVENT_TYPES))}")
    return value


def _compose_hash(value: str) -> str:
    if not isinstance(value, str) or not _COMPOSE_HASH.fullmatch(value):
        raise ValueError(f"compose_hash {value!r} is not sha256:<64 lowercase hex>")
    return value


@attrs.frozen
class RuntimeEvent:
    """One RTMR3 event: what the agent deployed. Its digest is SHA-384 of `canonical()`."""

    type: str = attrs.field(converter=_runtime_type)
    app: str = attrs.field(converter=_runtime_id)
    version: str = attrs.field(converter=_runtime_id)
    deployment_id: str = attrs.field(converter=_runtime_id)
    compose_hash: str = attrs.field(converter=_compose_hash)

    def canonical(self) -> bytes:
        doc = {k: getattr(self, k) for k in RUNTIME_EVENT_FIELDS}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> bytes:
        return hashlib.sha384(self.canonical()).digest()

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in RUNTIME_EVENT_FIELDS}, "digest": self.digest.hex()}


def parse_runtime_log(raw: bytes) -> tuple[RuntimeEvent, ...]:
    """Parse a JSON-lines runtime log; each line must be a canonical `RuntimeEvent`."""
    if len(raw) > MAX_RUNTIME_EVENTS * MAX_RUNTIME_LINE:
        raise RuntimeLogError(0, f"{len(raw)} bytes is too large")
    if raw and not raw.endswith(b"\n"):
        raise RuntimeLogError(raw.count(b"\n") + 1, "the last line is not terminated")
    events: list[RuntimeEvent] = []
    for n, line in enumerate(raw.split(b"\n")[:-1], start=1):
        if len(line) > MAX_RUNTIME_LINE:
            raise RuntimeLogError(n, f"{len(line)} bytes exceeds {MAX_RUNTIME_LINE}")
        if len(events) >= MAX_RUNTIME_EVENTS:
            raise RuntimeLogError(n, f"more than {MAX_RUNTIME_EVENTS} events")
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise RuntimeLogError(n, f"not JSON ({exc})") from None
        if not isinstance(doc, dict) or set(doc) != set(RUNTIME_EVENT_FIELDS):
            raise RuntimeLogError(n, f"an event has exactly the fields {RUNTIME_EVENT_FIELDS}")
        try:
            event = RuntimeEvent(**doc)
        except (TypeError, ValueError) as exc:
            raise RuntimeLogError(n, str(exc)) from None
        if event.canonical() != line:
            raise RuntimeLogError(n, "not in canonical form (sorted keys, no spaces)")
        events.append(event)
    return tuple(events)


def replay_runtime(events: Iterable[RuntimeEvent]) -> bytes:
    """RTMR3 after extending each event's digest (from zeros)."""
    return replay_digests(e.digest for e in events)


def runtime_mismatches(events: Sequence[RuntimeEvent], quoted_rtmr3: bytes) -> list[str]:
    """Why the runtime log does not explain the quote's RTMR3; empty when it does."""
    rtmr3 = replay_runtime(events)
    if rtmr3 == quoted_rtmr3:
        return []
    return [f"RTMR3 (runtime log) replays to {rtmr3.hex()}, the quote has {quoted_rtmr3.hex()}"]
