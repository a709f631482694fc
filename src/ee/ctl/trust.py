"""`eectl trust`: attestation trust tools (verify-quote)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from ee.attestation.collateral import Collateral
from ee.attestation.errors import CollateralFormatError, PolicyFormatError, QuoteFormatError
from ee.attestation.policy import Policy, Verdict, evaluate
from ee.attestation.quote import BODY_TYPE_TD15, Quote, parse_quote
from ee.attestation.verify import VerificationResult, Verifier, load_intel_root

EXIT_ACCEPTED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class _InputError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trust = groups.add_parser(
        "trust", help="attestation trust tools", description="Attestation trust tools."
    )
    commands = trust.add_subparsers(dest="command", metavar="COMMAND", required=True)
    vq = commands.add_parser(
        "verify-quote",
        help="parse and verify a TDX quote file",
        description=(
            "Parse and verify a TDX quote (v4/v5): fields, signature chain, TCB status "
            "(with --collateral), advisories and the policy verdict. Exit 0 only when "
            "the quote is accepted, 1 when it is refused, 2 on unreadable input."
        ),
    )
    vq.add_argument("quote", metavar="QUOTE", help="quote file (raw bytes)")
    vq.add_argument(
        "--collateral", metavar="FILE", help="PCS collateral JSON (as written by dcap-qvl)"
    )
    vq.add_argument(
        "--now",
        metavar="UNIX",
        type=float,
        help="verification time in unix seconds (default: the current time)",
    )
    vq.add_argument(
        "--root",
        metavar="PEM",
        help="trusted root certificate(s) (default: the bundled Intel SGX Root CA)",
    )
    vq.add_argument("--policy", metavar="FILE", help="measurement policy JSON")
    vq.add_argument("--node-size", metavar="SIZE", help="apply this node size's allowlists")
    vq.add_argument(
        "--allow-trailer",
        action="store_true",
        help=(
            "accept non-zero bytes after the quote's signature data (unsigned; some test "
            "corpora append a note there). Default: only zero padding"
        ),
    )
    vq.add_argument("--json", action="store_true", help="print one JSON object")
    vq.set_defaults(handler=verify_quote)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def quote_fields(quote: Quote, result: VerificationResult | None = None) -> dict[str, Any]:
    r = quote.report
    fmspc = result.fmspc if result is not None else None
    return {
        "version": quote.version,
        "tee_type": f"{quote.header.tee_type:08x}",
        "body": "TDX 1.5" if quote.body_type == BODY_TYPE_TD15 else "TDX 1.0",
        "fmspc": fmspc.hex() if fmspc is not None else None,
        "mrtd": r.mr_td.hex(),
        "rtmr0": r.rtmr0.hex(),
        "rtmr1": r.rtmr1.hex(),
        "rtmr2": r.rtmr2.hex(),
        "rtmr3": r.rtmr3.hex(),
        "report_data": r.report_data.hex(),
        "mrconfigid": r.mr_config_id.hex(),
        "mrowner": r.mr_owner.hex(),
        "mrownerconfig": r.mr_owner_config.hex(),
        "mrseam": r.mr_seam.hex(),
        "td_attributes": r.td_attributes.hex(),
        "debug": r.debug,
        "xfam": r.xfam.hex(),
        "tee_tcb_svn": r.tee_tcb_svn.hex(),
    }


def _report(quote: Quote, result: VerificationResult, verdict: Verdict) -> dict[str, Any]:
    return {
        "fields": quote_fields(quote, result),
        "signature_chain": {
            "valid": result.signature_valid
            and result.qe_report_valid
            and result.qe_binding_valid
            and result.chain_valid,
            "quote_signature": result.signature_valid,
            "qe_report_signature": result.qe_report_valid,
            "qe_report_binding": result.qe_binding_valid,
            "pck_chain": result.chain_valid,
            "root_sha256": result.root_fingerprint,
        },
        "collateral": {
            "checked": result.collateral_checked,
            "not_before": _iso(result.collateral_not_before),
            "next_update": _iso(result.collateral_next_update),
        },
        "tcb_status": result.tcb_status,
        "advisory_ids": list(result.advisory_ids),
        "verification_ok": result.ok,
        "reasons": list(result.reasons),
        "verdict": {
            "accepted": verdict.admitted,
            "mode": verdict.mode,
            "violations": list(verdict.reasons),
        },
    }


def _print_human(doc: dict[str, Any]) -> None:
    for key, value in doc["fields"].items():
        print(f"{key:>15}: {value}")
    sc = doc["signature_chain"]
    print(f"{'signature chain':>15}: {'valid' if sc['valid'] else 'INVALID'}", end="")
    print(f" (root sha256 {sc['root_sha256']})" if sc["root_sha256"] else "")
    col = doc["collateral"]
    if col["checked"]:
        print(f"{'collateral':>15}: {col['not_before']} .. {col['next_update']}")
    else:
        print(f"{'collateral':>15}: none")
    print(f"{'tcb_status':>15}: {doc['tcb_status'] or 'unknown'}")
    print(f"{'advisories':>15}: {', '.join(doc['advisory_ids']) or 'none'}")
    for reason in doc["reasons"]:
        print(f"{'problem':>15}: {reason}")
    v = doc["verdict"]
    print(f"{'verdict':>15}: {'ACCEPTED' if v['accepted'] else 'REFUSED'} (mode {v['mode']})")
    for violation in v["violations"]:
        print(f"{'violation':>15}: {violation}")


def verify_quote(args: argparse.Namespace) -> int:
    try:
        return _verify_quote(args)
    except _InputError as exc:
        print(f"eectl trust verify-quote: {exc}", file=sys.stderr)
        return exc.code


def _verify_quote(args: argparse.Namespace) -> int:
    raw = _read(args.quote, "quote")
    try:
        quote = parse_quote(raw, allow_trailer=args.allow_trailer)
    except QuoteFormatError as exc:
        raise _InputError(f"{args.quote}: {exc}", EXIT_REFUSED) from None
    collateral = None
    if args.collateral:
        try:
            collateral = Collateral.from_json(_read(args.collateral, "collateral"))
        except CollateralFormatError as exc:
            raise _InputError(f"{args.collateral}: {exc}") from None
    if args.root:
        try:
            roots = x509.load_pem_x509_certificates(_read(args.root, "root"))
        except ValueError as exc:
            raise _InputError(f"{args.root}: not a PEM certificate ({exc})") from None
    else:
        roots = [load_intel_root()]
    policy = Policy()
    if args.policy:
        try:
            policy = Policy.from_json(_read(args.policy, "policy"))
        except PolicyFormatError as exc:
            raise _InputError(f"{args.policy}: {exc}") from None
    now = args.now if args.now is not None else time.time()
    result = Verifier(roots).verify(quote, now=now, collateral=collateral)
    verdict = evaluate(policy, result, now=now, node_size=args.node_size)
    doc = _report(quote, result, verdict)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_human(doc)
    return EXIT_ACCEPTED if verdict.admitted else EXIT_REFUSED
