"""A PCCS-compatible stand-in on real loopback HTTP (Hypercorn, trio), for tests.

Serves the Intel PCS/PCCS v4 routes `ee.attestation.pccs` documents, from `Collateral`
values keyed by FMSPC, with switches that make it misbehave::

    mode "ok"           answer as a PCCS does
    mode "fail"         HTTP 500 on every route
    mode "garbage"      200 with a body that is not what the route returns
    mode "wrong_fmspc"  TCB info of another platform whatever FMSPC is asked for
    mode "huge"         a TCB info body larger than any client cap
    mode "deep_json"    a TCB info body of 100,000 nested arrays
    mode "bad_chain"    issuer chains whose certificate does not decode
    delay_s             sleep this long before answering (a slow PCCS)
    pcs_root_crl        404 on /rootcacrl (as Intel's PCS), so clients use the CRL DP

Expired or not-yet-valid collateral is data: put such a `Collateral` in ``platforms``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qs, quote

import attrs
import trio
import trio.lowlevel
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation import Collateral

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Answer = tuple[int, dict[str, str], bytes]


def _chain_header(pem: str) -> str:
    return quote(pem, safe="")


@attrs.define
class Standin:
    platforms: dict[str, Collateral]  # FMSPC (upper hex) -> collateral
    mode: str = "ok"
    delay_s: float = 0.0
    pcs_root_crl: bool = False
    requests: list[str] = attrs.field(factory=list)
    url: str = ""

    def _any(self) -> Collateral:
        return next(iter(self.platforms.values()))

    def answer(self, path: str, query: dict[str, list[str]]) -> Answer:
        status, headers, body = self._answer(path, query)
        if self.mode == "bad_chain":  # a PEM block whose DER is not a certificate
            bad = _chain_header("-----BEGIN CERTIFICATE-----\nMAMCAQE=\n"
                                "-----END CERTIFICATE-----\n")
            headers = {k: bad if k.endswith("Issuer-Chain") else v for k, v in headers.items()}
        return status, headers, body

    def _answer(self, path: str, query: dict[str, list[str]]) -> Answer:
        if self.mode == "fail":
            return 500, {}, b"internal error"
        if self.mode == "garbage":
            return 200, {"TCB-Info-Issuer-Chain": "nonsense"}, b"<html>not json</html>"
        c = self._any()
        if self.mode == "deep_json" and path == "/tdx/certification/v4/tcb":
            return 200, {"TCB-Info-Issuer-Chain": _chain_header(c.tcb_info_issuer_chain)}, \
                b"[" * 100_000
        if path == "/sgx/certification/v4/pckcrl":
            if query.get("ca", [""])[0] not in ("platform", "processor"):
                return 400, {}, b"bad ca"
            body = c.pck_crl
            if query.get("encoding", [""])[0] != "der":
                body = x509.load_der_x509_crl(c.pck_crl).public_bytes(Encoding.PEM)
            return 200, {"SGX-PCK-CRL-Issuer-Chain": _chain_header(c.pck_crl_issuer_chain)}, body
        if path == "/sgx/certification/v4/rootcacrl":
            if self.pcs_root_crl:
                return 404, {}, b""
            return 200, {}, c.root_ca_crl.hex().encode()
        if path == "/tdx/certification/v4/tcb":
            fmspc = query.get("fmspc", [""])[0].upper()
            if self.mode == "wrong_fmspc":
                fmspc = next(f for f in self.platforms if f != fmspc) if len(
                    self.platforms) > 1 else fmspc
                c = self.platforms[fmspc]
                doc = json.loads(c.tcb_info)
                doc["fmspc"] = "00" * 6 if len(self.platforms) == 1 else doc["fmspc"]
                tcb_info = json.dumps(doc) if len(self.platforms) == 1 else c.tcb_info
            elif fmspc not in self.platforms:
                return 404, {}, b"no such FMSPC"
            else:
                c = self.platforms[fmspc]
                tcb_info = c.tcb_info
            if self.mode == "huge":
                tcb_info = json.dumps({"padding": "x" * (2 << 20)})
            body = ('{"tcbInfo":' + tcb_info + ',"signature":"'
                    + c.tcb_info_signature.hex() + '"}').encode()
            return 200, {"TCB-Info-Issuer-Chain": _chain_header(c.tcb_info_issuer_chain),
                         "Content-Type": "application/json"}, body
        if path == "/tdx/certification/v4/qe/identity":
            body = ('{"enclaveIdentity":' + c.qe_identity + ',"signature":"'
                    + c.qe_identity_signature.hex() + '"}').encode()
            return 200, {"SGX-Enclave-Identity-Issuer-Chain":
                         _chain_header(c.qe_identity_issuer_chain)}, body
        if path == "/crl/root.der":
            return 200, {}, c.root_ca_crl
        return 404, {}, b"not found"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        query = parse_qs(scope["query_string"].decode())
        self.requests.append(scope["path"])
        status, headers, body = self.answer(scope["path"], query)
        if self.delay_s:
            await trio.sleep(self.delay_s)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def running_standin(platforms: dict[str, Collateral], **kw: Any
                          ) -> AsyncIterator[Standin]:
    """Serve a `Standin` on 127.0.0.1:<free port> until the block ends."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    standin = Standin(platforms=platforms, **kw)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(standin, config,  # type: ignore[arg-type]
                                      shutdown_trigger=stop.wait, task_status=task_status))
        standin.url = str(binds[0])
        try:
            yield standin
        finally:
            stop.set()


@contextmanager
def standin_in_thread(platforms: dict[str, Collateral], **kw: Any) -> Iterator[Standin]:
    """`running_standin` in its own thread and Trio run, for synchronous tests (CLIs)."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with running_standin(platforms, **kw) as standin:
            box["standin"], box["stop"] = standin, trio.Event()
            box["token"] = trio.lowlevel.current_trio_token()
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=trio.run, args=(serve,))
    thread.start()
    try:
        assert ready.wait(20), "the stand-in did not start"
        yield box["standin"]
    finally:
        if "stop" in box:
            trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        thread.join(20)
