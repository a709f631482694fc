"""`eectl trust verify-health`: check, yourself, that an app's agent is an attested TDX
VM running exactly your workload, now.

Theory of operation
-------------------
1. Draw a fresh 32-byte nonce (``secrets``), never reused.
2. ``GET URL/.ee/health?attest=true&nonce=HEX`` (the agent's own route; ``/api/*`` is
   the workload's, so it is never asked: the quote check below would refuse anything
   but the agent anyway, since nothing else can make a quote).
3. Judge the answer (`check_health_answer`, pure but for the CPU work):

   - the quote parses (v4/v5) and verifies to a trusted root (``--root``: the
     bundled Intel root, the dev cluster's simulated root, or a PEM file), with
     collateral when given;
   - REPORTDATA equals ``health_report_data(OUR nonce, the claimed hash)``
     (``SHA-512("ee/v2/health" || nonce || digest)``): an answer recorded earlier
     carries another nonce and is refused, as is a quote over another hash;
   - with ``--expect-hash``, the claimed (and so the quoted) hash is the expected one;
   - the served event logs replay to the quoted RTMRs (CCEL → RTMR0..2, the runtime
     digests → RTMR3) when served;
   - the measurement policy (``--policy``; see ``verify-quote --help``) admits it.

   Every failed check is a reason; any reason refuses (exit 1).

The answer is read with a size cap and a timeout; a quote or log that does not parse
is a refusal with the reason, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpx
from cryptography import x509

from ee.attestation.collateral import Collateral
from ee.attestation.errors import CollateralFormatError, PolicyFormatError, QuoteFormatError
from ee.attestation.eventlog import (
    EventLogFormatError,
    parse_ccel,
    replay_digests,
    rtmr_mismatches,
)
from ee.attestation.policy import Policy, evaluate, quote_provider
from ee.attestation.quote import parse_quote
from ee.attestation.verify import Verifier, load_intel_root
from ee.protocol.reportdata import health_report_data

HEALTH_PATHS = ("/.ee/health",)
MAX_ANSWER_BYTES = 4 * 1024 * 1024
MAX_QUOTE_BYTES = 64 * 1024
NONCE_BYTES = 32
HASH = re.compile(r"sha256:[0-9a-f]{64}")

EXIT_ACCEPTED, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class HealthInputError(Exception):
    """Usage or unreadable local input (exit 2), or an answer that is no answer (1)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class HealthVerdict:
    accepted: bool
    reasons: tuple[str, ...]
    compose_hash: str | None
    report: dict[str, Any]


def normalise_hash(value: str) -> str:
    """``sha256:<64 lowercase hex>`` from that form or bare hex; ValueError otherwise."""
    text = value.strip().lower()
    text = text if text.startswith("sha256:") else "sha256:" + text
    if not HASH.fullmatch(text):
        raise ValueError(f"{value!r} is not a sha256 hash (sha256:<64 hex>)")
    return text


def _b64(value: object, what: str, cap: int) -> bytes:
    if not isinstance(value, str) or len(value) > cap * 4 // 3 + 4:
        raise ValueError(f"{what} is not base64 of at most {cap} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def _log_mismatches(att: Mapping[str, Any], report: Any) -> tuple[list[str] | None, list[str]]:
    """(replay mismatches or None when no log was served, problems reading them)."""
    mismatches: list[str] = []
    problems: list[str] = []
    served = False
    if att.get("event_log") is not None:
        served = True
        try:
            log = parse_ccel(_b64(att["event_log"], "event_log", MAX_ANSWER_BYTES))
            mismatches += rtmr_mismatches(log, (report.rtmr0, report.rtmr1, report.rtmr2))
        except (ValueError, EventLogFormatError) as exc:
            problems.append(f"event log: {exc}")
    digests = att.get("runtime_digests")
    if digests is not None:
        served = True
        try:
            if not isinstance(digests, list) or len(digests) > 100_000:
                raise ValueError("not a list")
            values = [bytes.fromhex(d) for d in digests if isinstance(d, str)]
            if len(values) != len(digests) or any(len(v) != 48 for v in values):
                raise ValueError("each digest must be 48 bytes of hex")
            rtmr3 = replay_digests(values)
            if rtmr3 != report.rtmr3:
                mismatches.append(f"RTMR3 (runtime digests) replays to {rtmr3.hex()}, the "
                                  f"quote has {report.rtmr3.hex()}")
        except ValueError as exc:
            problems.append(f"runtime_digests: {exc}")
    return (mismatches if served else None), problems


def check_health_answer(body: object, *, nonce: bytes, expect_hash: str | None,
                        verifier: Verifier, policy: Policy, now: float,
                        collateral: Collateral | None = None,
                        node_size: str | None = None) -> HealthVerdict:
    """Judge an attested health answer against OUR *nonce* (see the module docstring)."""
    att = body.get("attestation") if isinstance(body, Mapping) else None
    if not isinstance(att, Mapping):
        return HealthVerdict(False, ("the answer carries no attestation",), None, {})
    reasons: list[str] = []
    claimed_raw = att.get("compose_hash")
    try:
        claimed: str | None = normalise_hash(str(claimed_raw)) if claimed_raw else None
    except ValueError:
        claimed = None
    if claimed is None:
        return HealthVerdict(False, (f"the answer's compose_hash {claimed_raw!r} is not a "
                                     "sha256 hash",), None, {})
    if att.get("nonce") != nonce.hex():
        reasons.append("the answer is for another nonce than the one just sent (a replayed "
                       "or forwarded answer)")
    if expect_hash is not None and claimed != expect_hash:
        reasons.append(f"the agent attests {claimed}, not the expected {expect_hash}")
    try:
        quote = parse_quote(_b64(att.get("quote"), "quote", MAX_QUOTE_BYTES))
    except (ValueError, QuoteFormatError) as exc:
        return HealthVerdict(False, (*reasons, f"quote: {exc}"), claimed, {})
    expected_rd = health_report_data(nonce, claimed)
    binds = quote.report.report_data == expected_rd
    if not binds:
        reasons.append("REPORTDATA does not bind this nonce and hash "
                       "(SHA-512('ee/v2/health' || nonce || digest))")
    mismatches, problems = _log_mismatches(att, quote.report)
    reasons += problems
    result = verifier.verify(quote, now=now, collateral=collateral)
    verdict = evaluate(policy, result, now=now, node_size=node_size,
                       expected_report_data=expected_rd, event_log=mismatches)
    if not verdict.admitted:  # (REPORTDATA is checked above, whatever the policy's mode)
        reasons += [f"policy refused: {v}" for v in verdict.violations
                    if v.rule != "report_data"]
    report = {
        "compose_hash": claimed,
        "expected_hash": expect_hash,
        "nonce": nonce.hex(),
        "provider": quote_provider(result),
        "claimed_provider": att.get("provider"),
        "report_data": quote.report.report_data.hex(),
        "report_data_binds": binds,
        "verification_ok": result.ok,
        "verification_reasons": list(result.reasons),
        "tcb_status": result.tcb_status,
        "event_logs": None if mismatches is None else {"replay": not mismatches,
                                                       "mismatches": mismatches},
        "mrtd": quote.report.mr_td.hex(),
        "rtmr0": quote.report.rtmr0.hex(),
        "rtmr1": quote.report.rtmr1.hex(),
        "rtmr2": quote.report.rtmr2.hex(),
        "rtmr3": quote.report.rtmr3.hex(),
        "policy": {"admitted": verdict.admitted, "mode": verdict.mode,
                   "violations": [str(v) for v in verdict.reasons]},
    }
    return HealthVerdict(not reasons and verdict.admitted, tuple(reasons), claimed, report)


# --- fetching ------------------------------------------------------------------------


def health_urls(url: str) -> list[str]:
    """The health URLs to try for *url* (an agent or app base URL, or a full path)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HealthInputError(f"URL must be http(s)://host[:port][/path], not {url!r}")
    if parts.path not in ("", "/"):
        return [urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))]
    return [urlunsplit((parts.scheme, parts.netloc, p, "", "")) for p in HEALTH_PATHS]


def _fetch(client: httpx.Client, url: str, nonce: bytes) -> tuple[int, object]:
    with client.stream("GET", url, params={"attest": "true", "nonce": nonce.hex()}) as r:
        data = bytearray()
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) > MAX_ANSWER_BYTES:
                raise HealthInputError(f"{url}: answer over {MAX_ANSWER_BYTES} bytes",
                                       EXIT_REFUSED)
    try:
        return r.status_code, json.loads(bytes(data))
    except ValueError:
        return r.status_code, None


def fetch_health(url: str, nonce: bytes, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> tuple[str, object]:
    """(the URL that answered, its JSON) for an attested health request with *nonce*."""
    candidates = health_urls(url)
    last = ""
    with httpx.Client(timeout=timeout, follow_redirects=False, transport=transport) as client:
        for i, candidate in enumerate(candidates):
            try:
                status, body = _fetch(client, candidate, nonce)
            except httpx.HTTPError as exc:
                raise HealthInputError(f"cannot reach {candidate}: {exc}", EXIT_REFUSED) \
                    from None
            attested = isinstance(body, dict) and isinstance(body.get("attestation"), dict)
            if status == 200 and attested:
                return candidate, body
            error = body.get("error") if isinstance(body, dict) else None
            last = (f"{candidate} answered {status}"
                    + (f": {error.get('message')} ({error.get('code')})"
                       if isinstance(error, dict) else ""))
            more = i + 1 < len(candidates)
            if not more or not (status in (404, 405, 502) or (status == 200 and not attested)):
                break
    raise HealthInputError(last or f"{url}: no answer", EXIT_REFUSED)


# --- the command ---------------------------------------------------------------------


def dev_root_pem(sim_dir: str | None) -> bytes:
    """The dev cluster's simulated root certificate (PEM), from the sim TD file."""
    from ee.attestation.providers.sim import SIM_FILE, shared_sim_dir

    directory = Path(sim_dir) if sim_dir else shared_sim_dir()
    path = directory / SIM_FILE
    try:
        doc = json.loads(path.read_text())
        pem = doc["root_cert"]
        x509.load_pem_x509_certificate(pem.encode())
    except FileNotFoundError:
        raise HealthInputError(f"no dev cluster root at {path} (set $EE_SIM_DIR or "
                               "--sim-dir to the dev cluster's sim directory)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HealthInputError(f"{path}: not a sim TD file ({exc})") from None
    return str(pem).encode()


def trusted_roots(root: str, sim_dir: str | None) -> list[x509.Certificate]:
    if root == "intel":
        return [load_intel_root()]
    pem = dev_root_pem(sim_dir) if root == "dev" else _read(root, "root")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise HealthInputError(f"{root}: not a PEM certificate ({exc})") from None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise HealthInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def add_verify_health(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vh = commands.add_parser(
        "verify-health", help="verify an app's attested health quote yourself",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Check, yourself, that the agent serving an app is an attested TDX VM running\n"
            "exactly your workload, now. Sends a fresh random nonce to\n"
            "URL/.ee/health?attest=true, then:\n"
            "  - verifies the quote's signature chain to the root (--root),\n"
            "  - checks REPORTDATA = SHA-512('ee/v2/health' || nonce || hash digest), so an\n"
            "    answer recorded earlier, or a quote over another hash, is refused,\n"
            "  - checks the attested hash is --expect-hash (from `eectl push` or\n"
            "    `eectl compose-hash`),\n"
            "  - replays the served event logs to the quoted RTMRs,\n"
            "  - applies the measurement policy (--policy).\n"
            "Exit 0 accepted, 1 refused (every reason printed), 2 bad usage."),
        epilog="example (a dev cluster):\n  eectl trust verify-health \"$APP_URL\" "
               "--expect-hash \"$HASH\" --root dev")
    vh.add_argument("url", metavar="URL", help="the app's URL (an agent), e.g. from "
                                                "`eectl status`")
    vh.add_argument("--expect-hash", metavar="H",
                    help="refuse unless the agent attests this hash")
    vh.add_argument("--root", default="intel", metavar="dev|intel|PEM",
                    help="trusted root: the bundled Intel root (default), the dev "
                         "cluster's simulated root (`eectl trust dev-root`), or a PEM file")
    vh.add_argument("--sim-dir", metavar="DIR",
                    help="with --root dev: the sim directory (default $EE_SIM_DIR, else "
                         "~/.local/share/easyenclave/sim)")
    vh.add_argument("--policy", metavar="FILE",
                    help="measurement policy JSON (format: `eectl trust verify-quote "
                         "--help`); default strict, collateral required except with "
                         "--root dev")
    vh.add_argument("--collateral", metavar="FILE",
                    help="PCS collateral JSON (`eectl trust collateral fetch`)")
    vh.add_argument("--node-size", metavar="SIZE", help="apply this node size's allowlists")
    vh.add_argument("--timeout", type=float, default=30.0, metavar="S",
                    help="HTTP timeout (default 30 s)")
    vh.add_argument("--json", action="store_true", help="print one JSON object")
    vh.set_defaults(handler=verify_health)

    dr = commands.add_parser(
        "dev-root", help="print a dev cluster's simulated root certificate",
        description="Print the PEM root that a dev cluster's simulated quotes chain to "
                    "(from $EE_SIM_DIR or --sim-dir; the quick start keeps it in "
                    ".ee-dev/sim). For `verify-quote --root` or `verify-health --root`.")
    dr.add_argument("--sim-dir", metavar="DIR")
    dr.set_defaults(handler=dev_root)


def dev_root(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(dev_root_pem(args.sim_dir).decode())
    except HealthInputError as exc:
        print(f"eectl trust dev-root: {exc}", file=sys.stderr)
        return exc.code
    return EXIT_ACCEPTED


def verify_health(args: argparse.Namespace) -> int:
    try:
        return _verify_health(args)
    except HealthInputError as exc:
        print(f"eectl trust verify-health: {exc}", file=sys.stderr)
        return exc.code


def _policy(args: argparse.Namespace) -> Policy:
    if args.policy:
        try:
            return Policy.from_json(_read(args.policy, "policy"))
        except PolicyFormatError as exc:
            raise HealthInputError(f"{args.policy}: {exc}") from None
    return Policy(require_collateral=args.root != "dev")


def _verify_health(args: argparse.Namespace) -> int:
    try:
        expect = normalise_hash(args.expect_hash) if args.expect_hash else None
    except ValueError as exc:
        raise HealthInputError(f"--expect-hash: {exc}") from None
    verifier = Verifier(trusted_roots(args.root, args.sim_dir))
    policy = _policy(args)
    collateral = None
    if args.collateral:
        try:
            collateral = Collateral.from_json(_read(args.collateral, "collateral"))
        except CollateralFormatError as exc:
            raise HealthInputError(f"{args.collateral}: {exc}") from None
    nonce = secrets.token_bytes(NONCE_BYTES)
    answered, body = fetch_health(args.url, nonce, timeout=args.timeout)
    verdict = check_health_answer(body, nonce=nonce, expect_hash=expect, verifier=verifier,
                                  policy=policy, now=time.time(), collateral=collateral,
                                  node_size=args.node_size)
    if args.json:
        print(json.dumps({"url": answered, "accepted": verdict.accepted,
                          "reasons": list(verdict.reasons), **verdict.report}, indent=2))
    else:
        _print_human(answered, verdict)
    if not verdict.accepted and not args.json:
        for reason in verdict.reasons or ("the policy refused the quote",):
            print(f"eectl trust verify-health: refused: {reason}", file=sys.stderr)
    return EXIT_ACCEPTED if verdict.accepted else EXIT_REFUSED


def _print_human(url: str, verdict: HealthVerdict) -> None:
    r = verdict.report
    rows = [("url", url), ("compose_hash", verdict.compose_hash or "-")]
    if r:
        rows += [
            ("expected", r["expected_hash"] or "(not checked: give --expect-hash)"),
            ("provider", f"{r['provider']} (agent says {r['claimed_provider']})"),
            ("nonce", r["nonce"]),
            ("report_data", "binds the nonce and hash" if r["report_data_binds"]
             else "DOES NOT bind the nonce and hash"),
            ("tcb_status", r["tcb_status"] or "unknown"),
            ("event logs", "not served" if r["event_logs"] is None else
             "replay to the quote" if r["event_logs"]["replay"] else "DO NOT replay"),
            ("mrtd", r["mrtd"]), ("rtmr3", r["rtmr3"]),
        ]
    rows.append(("verdict", "ACCEPTED" if verdict.accepted else "REFUSED"))
    for key, value in rows:
        print(f"{key:>12}: {value}")


__all__ = [
    "HealthVerdict",
    "add_verify_health",
    "check_health_answer",
    "dev_root_pem",
    "fetch_health",
    "health_urls",
    "normalise_hash",
]
