"""A bounded, seeded frame fuzzer for the CP's agent plane.

    python tools/fuzz/agent_plane.py --frames 100000 --seed 1

Starts a real ``ee-cp --dev`` (ports chosen by the kernel, data and sim chain in a
temporary directory), holds one well-behaved *bystander* agent on it, and then sends
``--frames`` hostile frames over many connections from ``--workers`` concurrent
workers. Each connection is one scenario, drawn from a seeded RNG per worker:

``preauth``  before authentication: ``register`` frames with sim quotes whose PCK
             certificates have a single bit flipped (in the DER, re-encoded so the PEM
             keeps its length), quotes flipped anywhere, truncated or foreign;
             registers with hostile fields; every other frame type; garbage.
``session``  a valid registration, then a stream of mostly valid frames (heartbeats,
             ``deploy_status`` for unknown deployments, orphan replies) mixed with
             mutated ones: wrong JSON types, huge and deep JSON, 5000-digit numbers,
             bad UTF-8 in binary frames, bit flips of whole frames, forged log lines
             in ``error`` frames, frames only the CP may send.
``raw``      below trio-websocket's API: garbage instead of an HTTP upgrade, or a valid
             upgrade followed by hand-made frames (invalid UTF-8 text, reserved bits,
             unknown opcodes, lying lengths).

At the end it reads the CP's supervision tree (``/api/v2/admin/tree``: every restart
count must be 0), ``/api/v2/health``, the agent list (the bystander must be online, on
its first session), the CP's RSS from /proc and its log (no forged lines), and prints
one summary line. ``run()`` returns the :class:`Summary` (tests/cp/test_fuzz_plane.py
asserts on it). The quote mutators (:func:`flip_cert_bit`, :func:`crafted_quotes`) are
shared with the plane's boundary tests.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import re
import secrets
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio_websocket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "loadgen"))

from simagent import SimAgent  # noqa: E402

from ee.attestation.providers.sim import SimTD  # noqa: E402
from ee.protocol import encode_message, registration_report_data  # noqa: E402
from ee.protocol.messages import (  # noqa: E402
    Attestation,
    DeployStatus,
    Health,
    Heartbeat,
    NodeInfo,
    NodeStats,
    Register,
    Snapshot,
)

PATH = "/api/v2/agents/connect"
FORGED = "FORGED-LOG-LINE"  # what injected newlines try to start a log line with
DATACENTER = "fuzz:z1"

# ---- quote mutators (also used by tests/cp/test_plane_boundary.py) -------------------


def _pem_region(quote: bytes) -> int:
    """Offset of the PEM PCK chain, the last thing in a sim quote."""
    start = quote.find(b"-----BEGIN CERTIFICATE-----")
    if start < 0:
        raise ValueError("no PEM chain in this quote")
    return start


def cert_ders(quote: bytes) -> list[bytes]:
    """The DER certificates of a quote's PEM chain (leaf first)."""
    pem = quote[_pem_region(quote):]
    return [base64.b64decode(b"".join(block.split(b"-----\n", 1)[1].split()))
            for block in pem.split(b"-----END CERTIFICATE-----")[:-1]]


def flip_cert_bit(quote: bytes, cert: int, byte: int, bit: int) -> bytes:
    """*quote* with one bit of certificate *cert*'s DER flipped, same length.

    The DER is changed and re-encoded in base64 line by line, so the PEM, the
    certification data size and every other offset of the quote stay as they were:
    what the verifier parses differs from the original in exactly that one bit.
    """
    start = _pem_region(quote)
    pem = quote[start:]
    blocks = pem.split(b"-----END CERTIFICATE-----")
    head, body = blocks[cert].split(b"-----\n", 1)
    lines = body.split(b"\n")
    der = bytearray(base64.b64decode(b"".join(lines)))
    der[byte % len(der)] ^= 1 << (bit % 8)
    encoded = base64.b64encode(bytes(der))
    out, i = [], 0
    for line in lines:
        out.append(encoded[i:i + len(line)])
        i += len(line)
    blocks[cert] = head + b"-----\n" + b"\n".join(out)
    mutated = quote[:start] + b"-----END CERTIFICATE-----".join(blocks)
    assert len(mutated) == len(quote)
    return mutated


def crafted_quotes(quote: bytes) -> dict[str, bytes]:
    """The two frames of issue 11, from a valid sim quote.

    ``version18``: the PCK leaf's version INTEGER 2 (v3) becomes 18 (cryptography raises
    ``InvalidVersion``); ``negative_serial``: the serial's first byte gets its sign bit
    (a ``ValueError`` in the CRL lookup).
    """
    leaf = cert_ders(quote)[0]
    # SEQUENCE { SEQUENCE(tbs) { [0] { INTEGER version } INTEGER serial ...
    assert leaf[8:13] == b"\xa0\x03\x02\x01\x02", leaf[:16].hex()
    assert leaf[13] == 0x02 and not leaf[15] & 0x80
    return {"version18": flip_cert_bit(quote, 0, 12, 4),
            "negative_serial": flip_cert_bit(quote, 0, 15, 7)}


# ---- frames --------------------------------------------------------------------------


def _frame(type_: str, body: Any, **envelope: Any) -> str:
    return json.dumps({"type": type_, "body": body, **envelope}, separators=(",", ":"))


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _hostile_value(rng: random.Random) -> Any:
    return rng.choice([
        None, True, -1, 2**63, 1.5, "", "x" * rng.randint(1, 3000), [], {}, [1, "a"],
        {"a": {"b": {"c": []}}}, "line\n" + FORGED + " CRITICAL ee.cp: forged",
        "\x1b[31mred\x1b[0m", "\u202e", -0.0, 1e308,
    ])


@attrs.define
class Counts:
    frames: int = 0
    connections: int = 0
    scenarios: collections.Counter[str] = attrs.field(factory=collections.Counter)
    replies: collections.Counter[str] = attrs.field(factory=collections.Counter)
    closes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    connect_errors: int = 0
    stuck: int = 0  # connections the CP left hanging for a minute
    internal_closes: int = 0  # 1011 from the CP: a fault it caught (logged, counted)
    leaked: list[str] = attrs.field(factory=list)  # internal text in an error frame


# Text that must never reach a peer: exception class names and reprs of our internals.
_LEAK = re.compile(r"Traceback|Error:|Exception|object has no attribute|recursion depth|"
                   r"<[a-z_.]+ object at 0x")


class Replies:
    """How many frames the CP sent on one connection (and whether it is over)."""

    def __init__(self) -> None:
        self.count = 0
        self.closed = False
        self._changed = trio.Event()

    def got(self) -> None:
        self.count += 1
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def wait_for(self, n: int) -> None:
        while self.count < n and not self.closed:
            self._changed = trio.Event()
            await self._changed.wait()


class Worker:
    """One sequence of connections, from its own seeded RNG."""

    def __init__(self, fuzz: Fuzzer, index: int) -> None:
        self.fuzz = fuzz
        self.rng = random.Random(fuzz.seed * 1_000_003 + index)
        self.index = index
        self.key = Ed25519PrivateKey.generate()
        self.public_key = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.vm_name = f"fuzz-{index:03d}"
        self.seq = 0

    # -- building blocks -----------------------------------------------------------------

    def snapshot(self, **node: Any) -> Snapshot:
        info = {"node_size": "standard", "datacenter": DATACENTER, "gpu": False,
                "vcpus": 2, "memory_mb": 4096, **node}
        return Snapshot(deployments=(), health=Health(status="healthy"),
                        node=NodeInfo(**info), seq=0)

    def register(self, nonce: bytes, quote: bytes | None = None, *, vm_name: str | None = None,
                 public_key: bytes | None = None) -> Register:
        key = public_key or self.public_key
        if quote is None:
            quote = self.fuzz.td.quote(registration_report_data(nonce, key))
        return Register(vm_name=vm_name or self.vm_name, node_size="standard",
                        datacenter=DATACENTER, agent_version="fuzz-1", public_key=key,
                        attestation=Attestation(provider="sim", quote=quote),
                        snapshot=self.snapshot())

    def heartbeat(self) -> str:
        self.seq += 1
        return encode_message(Heartbeat(seq=self.seq, health=Health(status="healthy"),
                                         stats=NodeStats(uptime_s=float(self.seq))))

    def bitflip(self, text: str) -> str | bytes:
        raw = bytearray(text.encode())
        for _ in range(self.rng.randint(1, 3)):
            raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw)  # sent as a binary frame

    def mutate_json(self, doc: dict[str, Any]) -> str:
        """Replace, drop or add one field somewhere in *doc* (a frame as JSON)."""
        doc = json.loads(json.dumps(doc))
        target = doc
        while True:
            keys = [k for k, v in target.items()]
            if not keys:
                break
            key = self.rng.choice(keys)
            if isinstance(target[key], dict) and target[key] and self.rng.random() < 0.6:
                target = target[key]
                continue
            action = self.rng.random()
            if action < 0.6:
                target[key] = _hostile_value(self.rng)
            elif action < 0.8:
                del target[key]
            else:
                target["extra_" + secrets.token_hex(2)] = _hostile_value(self.rng)
            break
        return json.dumps(doc)

    # -- scenario frame sources ----------------------------------------------------------

    def preauth_frame(self, nonce: bytes) -> str | bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.30:  # a valid sim quote, one bit of one certificate flipped
            quote = self.fuzz.td.quote(registration_report_data(nonce, self.public_key))
            ders = cert_ders(quote)
            cert = rng.randrange(len(ders))
            if rng.random() < 0.1:
                flipped = crafted_quotes(quote)[rng.choice(["version18", "negative_serial"])]
            else:
                flipped = flip_cert_bit(quote, cert, rng.randrange(len(ders[cert])),
                                        rng.randrange(8))
            return encode_message(self.register(nonce, flipped,
                                                vm_name=f"flip-{rng.randrange(10**6)}"))
        if r < 0.40:  # flipped anywhere, truncated, or not a quote
            quote = bytearray(self.fuzz.td.quote(
                registration_report_data(nonce, self.public_key)))
            kind = rng.random()
            if kind < 0.5:
                for _ in range(rng.randint(1, 4)):
                    quote[rng.randrange(len(quote))] ^= 1 << rng.randrange(8)
            elif kind < 0.8:
                quote = quote[:rng.randrange(1, len(quote))]
            else:
                quote = bytearray(rng.randbytes(rng.randint(1, 6000)))
            return encode_message(self.register(nonce, bytes(quote),
                                                vm_name=f"bad-{rng.randrange(10**6)}"))
        if r < 0.60:  # a register with one hostile field
            doc = json.loads(encode_message(self.register(
                nonce, vm_name=f"field-{rng.randrange(10**6)}")))
            if rng.random() < 0.3:  # big-but-legal strings go to the refusal paths
                field = rng.choice(["vm_name", "node_size", "datacenter", "agent_version"])
                doc["body"][field] = rng.choice(
                    ["a\n" + FORGED + " CRITICAL forged", "z" * 200_000, "x:" * 5000, " "])
                return json.dumps(doc)
            return self.mutate_json(doc)
        if r < 0.75:  # any other frame type before registering (with an id, sometimes)
            msg = self.session_frame()
            return msg
        if r < 0.85:
            text = encode_message(self.register(nonce, vm_name=f"flip-{rng.randrange(10**6)}"))
            return self.bitflip(text)
        return self.garbage()

    def garbage(self) -> str | bytes:
        rng = self.rng
        return rng.choice([
            lambda: "{not json",
            lambda: "",
            lambda: "null",
            lambda: _frame("heartbeat", []),
            lambda: _frame("nonsense", {}),
            lambda: '{"type":"heartbeat","body":{"seq":1e999}}',
            lambda: '{"type":"heartbeat","body":{"seq":' + "9" * 5000 + "}}",
            lambda: '{"type":"heartbeat","body":' + _deep(100_000) + "}",
            lambda: '{"type":"heartbeat","body":{"x":' + _deep(900) + "}}",
            lambda: '{"type":"heartbeat","body":' + _deep(900) + "}",
            lambda: '{"type":"heartbeat","id":-1,"body":{}}',
            lambda: '{"type":"heartbeat","id":true,"re":"1","body":{}}',
            lambda: '{"type":"heartbeat","body":{"seq":NaN}}',
            lambda: rng.randbytes(rng.randint(1, 200)),
            lambda: b'{"type":"heartbeat","body":{"x":"\xff\xfe"}}',
            lambda: b"\xef\xbb\xbf" + b'{"type":"heartbeat","body":{}}',
            lambda: json.dumps({"type": "error", "body": {"code": "x", "message": "y" * 900_000}}),
            lambda: "x" * 1_100_000,  # over the 1 MiB limit, under the 2 MiB cut
        ])()

    def session_frame(self) -> str | bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.40:
            return self.heartbeat()
        if r < 0.55:  # progress of deployments this CP never placed here
            return encode_message(DeployStatus(
                deployment_id=f"dep-{rng.randrange(1000)}",
                state=rng.choice(["running", "failed", "stopped", "pending"]),
                error=rng.choice([None, "boom\n" + FORGED + " CRITICAL forged"])))
        if r < 0.65:  # replies to requests the CP never made
            type_ = rng.choice(["snapshot", "attestation", "logs", "stats"])
            body = {"snapshot": lambda: json.loads(encode_message(self.snapshot()))["body"],
                    "attestation": lambda: {"provider": "sim", "quote": "AAAA"},
                    "logs": lambda: {"lines": [{"service": "s", "text": "t"}]},
                    "stats": lambda: {"node": {}}}[type_]()
            return _frame(type_, body, re=rng.randrange(1, 2**53))
        if r < 0.70:  # an error frame: unsolicited, or answering nothing
            envelope = {"re": rng.randrange(1, 10**6)} if rng.random() < 0.5 else {}
            return _frame("error", {
                "code": rng.choice(["x", "a\n" + FORGED + " CRITICAL forged", "c" * 5000]),
                "message": rng.choice(["m", "\n" + FORGED + " CRITICAL ee.cp: forged\n",
                                       "m" * 200_000])}, **envelope)
        if r < 0.78:  # a heartbeat with one hostile field
            return self.mutate_json(json.loads(self.heartbeat()))
        if r < 0.84:
            return self.bitflip(self.heartbeat())
        if r < 0.90:  # types only the CP sends, or a request the agent may not make
            return rng.choice([
                _frame("deploy", {"deployment_id": "d"}, id=rng.randrange(1, 100)),
                _frame("challenge", {}),
                _frame("attestation", {"provider": "sim", "quote": "AAAA"},
                       id=rng.randrange(1, 100)),
                _frame("register", {}, id=7),
                _frame("snapshot", {"deployments": "x", "health": {}, "node": {}, "seq": 0}),
                _frame("snapshot", {"deployments": [{"deployment_id": "d", "app": "a",
                                                     "version": "v", "state": "running",
                                                     "image_digests": "xyz"}],
                                    "health": {}, "seq": 0,
                                    "node": {"node_size": "s", "datacenter": "d:x",
                                             "gpu": False, "vcpus": 1, "memory_mb": 1}},
                       re=rng.randrange(1, 100)),
            ])
        return self.garbage()

    # -- connections -----------------------------------------------------------------------

    async def run(self) -> None:
        fuzz = self.fuzz
        while fuzz.take(0):
            r = self.rng.random()
            scenario = "raw" if r < 0.03 else "preauth" if r < 0.45 else "session"
            fuzz.counts.scenarios[scenario] += 1
            fuzz.counts.connections += 1
            try:
                with trio.move_on_after(60) as scope:  # a CP that stops reading
                    if scenario == "raw":
                        await self.raw()
                    else:
                        await self.websocket(scenario)
                if scope.cancelled_caught:
                    fuzz.counts.stuck += 1
            except (OSError, trio_websocket.HandshakeError, trio.BrokenResourceError):
                fuzz.counts.connect_errors += 1
                fuzz.check_reachable()

    async def websocket(self, scenario: str) -> None:
        fuzz = self.fuzz
        async with trio_websocket.open_websocket_url(
                fuzz.agent_url, max_message_size=4 << 20) as ws:
            challenge = json.loads(await ws.get_message())
            nonce = bytes.fromhex(challenge["body"]["nonce"])
            replies = Replies()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.read_replies, ws, replies)
                try:
                    if scenario == "preauth":
                        sent = 0
                        for _ in range(self.rng.randint(1, 4)):
                            if not fuzz.take(1):
                                break
                            await ws.send_message(self.preauth_frame(nonce))
                            sent += 1
                        # Each frame before registration gets one answer (error or
                        # rejected): wait for them, so verification really ran.
                        with trio.move_on_after(10):
                            await replies.wait_for(sent)
                    else:
                        await ws.send_message(encode_message(self.register(nonce)))
                        fuzz.take(1)
                        await self.session(ws)
                    with trio.move_on_after(2):
                        await ws.aclose()
                except trio_websocket.ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()

    async def session(self, ws: trio_websocket.WebSocketConnection) -> None:
        for i in range(self.rng.randint(20, 400)):
            if not self.fuzz.take(1):
                return
            await ws.send_message(self.session_frame())
            if i % 16 == 15:
                await trio.sleep(0.002)  # a talkative agent, not a flood

    async def read_replies(self, ws: trio_websocket.WebSocketConnection,
                           replies: Replies) -> None:
        counts = self.fuzz.counts
        try:
            while True:
                data = await ws.get_message()
                replies.got()
                doc = json.loads(data)
                body = doc.get("body", {})
                label = doc["type"] + (f":{body.get('code')}" if "code" in body else "")
                counts.replies[label] += 1
                if doc["type"] == "error" and _LEAK.search(body.get("message", "")):
                    counts.leaked.append(body["message"][:200])
                if doc["type"] == "rejected":
                    for reason in body.get("reasons", []):
                        if _LEAK.search(reason):
                            counts.leaked.append(reason[:200])
        except trio_websocket.ConnectionClosed as exc:
            code = exc.reason.code if exc.reason else None
            counts.closes[str(code)] += 1
            if code == 1011 and "actor is gone" not in (exc.reason.reason or ""):
                counts.internal_closes += 1
        finally:
            replies.close()

    async def raw(self) -> None:
        """Below the websocket library: garbage upgrades and hand-made frames."""
        rng = self.rng
        stream = await trio.open_tcp_stream("127.0.0.1", self.fuzz.agent_port)
        async with stream:
            if rng.random() < 0.3:
                self.fuzz.take(1)
                await stream.send_all(rng.choice([
                    b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00",
                    rng.randbytes(512), b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"]))
            else:
                key = base64.b64encode(secrets.token_bytes(16))
                await stream.send_all(
                    b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
                for _ in range(rng.randint(1, 4)):
                    if not self.fuzz.take(1):
                        break
                    await stream.send_all(self.raw_frame())
            with trio.move_on_after(1):
                while await stream.receive_some(65536):
                    pass

    def raw_frame(self) -> bytes:
        rng = self.rng
        payload = rng.choice([b"\xff\xfe\xfd", b'{"type":"heartbeat"', rng.randbytes(40),
                              b"\xc3\x28" * 10])
        first = rng.choice([0x81, 0x82, 0x83, 0x8B, 0xC1, 0x01, 0x80, 0x89, 0x88])
        length = len(payload) if rng.random() < 0.8 else rng.choice([126, 127, 0])
        mask = secrets.token_bytes(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        header = struct.pack("!BB", first, 0x80 | length)
        if length == 126:
            header += struct.pack("!H", len(payload))
        elif length == 127:
            header += struct.pack("!Q", 1 << 62)
        return header + mask + masked


# ---- the run --------------------------------------------------------------------------


@attrs.define
class Summary:
    frames: int
    connections: int
    seed: int
    seconds: float
    cp_alive: bool
    cp_exit: int | None
    restarts: int
    restarted: list[str]
    health: int
    bystander_status: str | None
    bystander_sessions: int
    rss_start_mb: float
    rss_end_mb: float
    log_bytes: int
    forged_lines: int
    plane_faults: dict[str, float]
    internal_closes: int
    leaked: list[str]
    scenarios: dict[str, int]
    replies: dict[str, int]
    closes: dict[str, int]
    connect_errors: int
    stuck: int

    @property
    def crashes(self) -> int:
        return (0 if self.cp_alive else 1)

    def line(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in collections.Counter(self.replies).most_common(8))
        return (f"fuzz agent plane: {self.frames} frames, {self.connections} connections, "
                f"seed {self.seed}, {self.seconds:.1f}s: crashes {self.crashes}, "
                f"restarts {self.restarts}, health {self.health}, bystander "
                f"{self.bystander_status} (sessions {self.bystander_sessions}), rss "
                f"{self.rss_start_mb:.0f}->{self.rss_end_mb:.0f} MB, log {self.log_bytes // 1024}"
                f" KiB, forged lines {self.forged_lines}, plane faults {self.plane_faults}, "
                f"1011 closes {self.internal_closes}, leaks {len(self.leaked)}, connect "
                f"errors {self.connect_errors}, stuck {self.stuck}; "
                f"scenarios {dict(self.scenarios)}; closes {dict(self.closes)}; replies: {top}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Fuzzer:
    def __init__(self, *, frames: int, seed: int, workers: int, workdir: Path,
                 progress: Callable[[str], None] | None = None) -> None:
        self.frames = frames
        self.seed = seed
        self.workers = workers
        self.workdir = workdir
        self.progress = progress
        self.counts = Counts()
        self.td: SimTD
        self.agent_port = 0
        self.http_port = 0
        self.token = ""
        self._next_report = frames // 10 or 1
        self.warm = trio.Event()
        self.stopped = False
        self.proc: subprocess.Popen[bytes]

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.agent_port}{PATH}"

    def check_reachable(self) -> None:
        """Stop the run when the CP is gone (dead, or its plane moved to another port)."""
        if self.proc.poll() is not None or self.counts.connect_errors > 500:
            self.stopped = True

    def take(self, n: int) -> bool:
        """Spend *n* frames of the budget; False once it is spent (or the run stopped)."""
        if self.stopped or self.counts.frames >= self.frames:
            return False
        self.counts.frames += n
        if self.counts.frames >= self._next_report:
            self._next_report += self.frames // 10 or 1
            self.warm.set()
            if self.progress:
                self.progress(f"fuzz: {self.counts.frames}/{self.frames} frames, "
                              f"{self.counts.connections} connections")
        return True

    def start_cp(self) -> subprocess.Popen[bytes]:
        config = self.workdir / "cp.json"
        config.write_text(json.dumps({"heartbeat_interval_s": 1.0, "stale_after_s": 6.0,
                                      "offline_after_s": 15.0}))
        self.log_path = self.workdir / "cp.log"
        env = {**os.environ, "EE_SIM_DIR": str(self.workdir / "sim")}
        out_path = self.workdir / "cp.out"
        with self.log_path.open("wb") as log, out_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ee.cp.server", "--dev", "--config", str(config),
                 "--data-dir", str(self.workdir / "cp"), "--listen", "127.0.0.1:0",
                 "--agent-listen", "127.0.0.1:0", "--log-level", "INFO"],
                stdout=out, stderr=log, env=env)
        # The first stdout line names the ports the kernel chose (a file, not a pipe:
        # the CP keeps printing, and a closed pipe would kill it).
        deadline = time.monotonic() + 60
        while not (match := re.search(r"http on [\d.]+:(\d+), agents on ws://[\d.]+:(\d+)",
                                      out_path.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"ee-cp did not start; see {self.log_path}")
            time.sleep(0.05)
        self.http_port, self.agent_port = int(match.group(1)), int(match.group(2))
        self.token = (self.workdir / "cp" / "admin.token").read_text().strip()
        self.td = SimTD.load(self.workdir / "sim")
        return proc

    async def settle(self, http: httpx.AsyncClient, proc: subprocess.Popen[bytes]) -> None:
        """Until the CP has handled the last frames: its frame counters (registrations,
        heartbeats, refused frames) read the same twice in a row (bounded)."""
        previous = None
        with trio.move_on_after(30):
            while proc.poll() is None:
                text = (await http.get("/metrics")).text
                counters = [line for line in text.splitlines()
                            if line.startswith(("ee_registrations_total",
                                                "ee_heartbeats_total", "ee_bad_frames_total"))]
                if counters == previous:
                    return
                previous = counters
                await trio.sleep(0.2)

    async def run(self) -> Summary:
        proc = self.proc = await trio.to_thread.run_sync(self.start_cp)
        started = time.perf_counter()
        try:
            return await self._run(proc, started)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    async def _run(self, proc: subprocess.Popen[bytes], started: float) -> Summary:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}",
                                     headers=headers, timeout=30) as http, \
                trio.open_nursery() as nursery:
            bystander = SimAgent(url=self.agent_url, td=self.td, vm_name="bystander",
                                 datacenter=DATACENTER)
            await nursery.start(bystander.run)
            rss_start = rss_mb(proc.pid)

            async def baseline() -> None:  # after the allocator has warmed up
                nonlocal rss_start
                await self.warm.wait()
                if proc.poll() is None:
                    rss_start = rss_mb(proc.pid)

            nursery.start_soon(baseline)
            async with trio.open_nursery() as workers:
                for i in range(self.workers):
                    workers.start_soon(Worker(self, i).run)
            await self.settle(http, proc)
            alive = proc.poll() is None
            rss_end = rss_mb(proc.pid) if alive else 0.0
            health = tree = status = None
            faults: dict[str, float] = {}
            if alive:
                health = (await http.get("/api/v2/health")).status_code
                tree = (await http.get("/api/v2/admin/tree")).json()
                agents = (await http.get("/api/v2/agents")).json()["agents"]
                status = next((a["status"] for a in agents if a["vm_name"] == "bystander"),
                              None)
                metrics = (await http.get("/metrics")).text
                for m in re.finditer(r'^ee_agent_plane_faults_total\{stage="(\w+)"\} (\S+)$',
                                     metrics, re.M):
                    faults[m.group(1)] = float(m.group(2))
            nursery.cancel_scope.cancel()
        restarted = []
        if tree is not None:
            stack = [tree]
            while stack:
                node = stack.pop()
                if node["restarts"]:
                    restarted.append(f"{node['name']}: {node['restarts']} "
                                     f"({node['last_error']})")
                stack.extend(node["children"])
        log_text = self.log_path.read_text(errors="replace")
        c = self.counts
        return Summary(
            frames=c.frames, connections=c.connections, seed=self.seed,
            seconds=time.perf_counter() - started, cp_alive=alive, cp_exit=proc.poll(),
            restarts=len(restarted) if tree is not None else -1, restarted=restarted,
            health=health or 0, bystander_status=status,
            bystander_sessions=bystander.sessions, rss_start_mb=rss_start, rss_end_mb=rss_end,
            log_bytes=len(log_text.encode()),
            forged_lines=sum(1 for line in log_text.splitlines()
                             if line.startswith(FORGED)),
            plane_faults=faults, internal_closes=c.internal_closes, leaked=c.leaked,
            scenarios=dict(c.scenarios), replies=dict(c.replies), closes=dict(c.closes),
            connect_errors=c.connect_errors, stuck=c.stuck)


def run(*, frames: int, seed: int, workers: int = 16, workdir: Path | None = None,
        progress: Callable[[str], None] | None = None) -> Summary:
    """Fuzz a fresh ``ee-cp`` with *frames* frames; blocking (starts its own trio run)."""
    with tempfile.TemporaryDirectory(prefix="ee-fuzz-") as tmp:
        fuzzer = Fuzzer(frames=frames, seed=seed, workers=workers,
                        workdir=workdir or Path(tmp), progress=progress)
        return trio.run(fuzzer.run)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=16, help="concurrent connections")
    p.add_argument("--keep", metavar="DIR", help="keep the CP's data dir and log here")
    args = p.parse_args()
    workdir = Path(args.keep) if args.keep else None
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    summary = run(frames=args.frames, seed=args.seed, workers=args.workers, workdir=workdir,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary.line(), flush=True)
    for line in summary.restarted + summary.leaked[:5]:
        print("  ", line)
    ok = (summary.crashes == 0 and summary.restarts == 0 and summary.health == 200
          and summary.bystander_status == "online" and not summary.leaked
          and summary.forged_lines == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
