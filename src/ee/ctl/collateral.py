"""`eectl trust collateral fetch|show`: verification collateral from PCS/PCCS.

    eectl trust collateral fetch --pccs URL (--fmspc HEX | --quote FILE)
          [--ca platform|processor] [--out FILE] [--root intel|PEM] [--timeout S]
    eectl trust collateral show FILE [--root intel|PEM] [--now UNIX] [--json]

``fetch`` asks the PCS/PCCS (API v4, see `ee.attestation.pccs`), checks what came back
against the trusted root (chains, signatures, CRLs, validity now, the FMSPC asked for)
and writes it in the PCS JSON shape that ``eectl trust verify-quote --collateral`` and
dcap-qvl read. ``show`` prints a collateral file's FMSPC, windows and problems.
Exit codes: 0 valid, 1 fetched/read but refused (or the PCCS failed), 2 usage.

Registered under ``eectl trust`` by `register_collateral`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from ee.attestation import Collateral, CollateralFormatError, QuoteFormatError, parse_quote
from ee.attestation._der import CertInfo
from ee.attestation.collateral import TrustAnchors, check_collateral
from ee.attestation.pccs import PCK_CAS, PccsClient, PccsError, normalise_fmspc
from ee.attestation.pck import PckExtensionError, pck_extension_of
from ee.attestation.verify import load_intel_root

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class _Usage(Exception):
    pass


def register_collateral(
        trust_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``collateral fetch|show`` to the ``eectl trust`` subcommands."""
    group = trust_commands.add_parser(
        "collateral", help="fetch and inspect PCS/PCCS verification collateral",
        description="Verification collateral (TCB info, QE identity, CRLs) from Intel's "
                    "PCS or a PCCS.")
    commands = group.add_subparsers(dest="collateral_command", metavar="COMMAND",
                                    required=True)
    fetch = commands.add_parser(
        "fetch", help="fetch and check collateral for one FMSPC",
        description="Fetch collateral for an FMSPC (or the FMSPC of a quote's PCK "
                    "certificate), check it against the trusted root, write it as JSON.")
    fetch.add_argument("--pccs", required=True, metavar="URL",
                       help="e.g. https://api.trustedservices.intel.com or a PCCS")
    which = fetch.add_mutually_exclusive_group(required=True)
    which.add_argument("--fmspc", metavar="HEX", help="12 hex characters")
    which.add_argument("--quote", metavar="FILE", help="take the FMSPC from this quote")
    fetch.add_argument("--ca", choices=PCK_CAS, default="platform",
                       help="which PCK CA's CRL (default platform)")
    fetch.add_argument("--out", metavar="FILE", help="write the collateral JSON here")
    fetch.add_argument("--root", metavar="intel|PEM", default="intel",
                       help="trusted root (default: the bundled Intel SGX Root CA)")
    fetch.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    fetch.add_argument("--json", action="store_true", help="print one JSON object")
    fetch.set_defaults(handler=fetch_command)

    show = commands.add_parser("show", help="print a collateral file's content and validity",
                               description="FMSPC, issue dates, next updates, problems.")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--root", metavar="intel|PEM", default="intel")
    show.add_argument("--now", type=float, metavar="UNIX",
                      help="judge validity at this time (default: now)")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=show_command)


def _root(spec: str) -> list[x509.Certificate]:
    if spec == "intel":
        return [load_intel_root()]
    try:
        return x509.load_pem_x509_certificates(Path(spec).read_bytes())
    except (OSError, ValueError) as exc:
        raise _Usage(f"--root {spec}: not a readable PEM certificate ({exc})") from None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def summary(collateral: Collateral, roots: list[x509.Certificate], now: float
            ) -> dict[str, Any]:
    """What a collateral document says and everything wrong with it at *now*."""
    check = check_collateral(collateral, TrustAnchors(roots))
    problems = [*check.problems, *check.time_problems(now)]
    tcb, qe = check.tcb_info, check.qe_identity
    return {
        "fmspc": tcb.fmspc.hex().upper() if tcb else None,
        "tcb_info": {"issue_date": _iso(tcb.issue_date), "next_update": _iso(tcb.next_update),
                     "tcb_evaluation_data_number": tcb.tcb_evaluation_data_number,
                     "levels": len(tcb.tcb_levels)} if tcb else None,
        "qe_identity": {"issue_date": _iso(qe.issue_date),
                        "next_update": _iso(qe.next_update)} if qe else None,
        "valid_from": _iso(check.not_before),
        "next_update": _iso(check.next_update),
        "valid": not problems,
        "problems": problems,
    }


def _print(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(view, indent=1))
        return
    for key in ("fmspc", "valid_from", "next_update", "valid"):
        print(f"{key:>12}: {view[key]}")
    for problem in view["problems"]:
        print(f"{'problem':>12}: {problem}")


def _fail(code: int, message: str) -> int:
    print(f"eectl trust collateral: {message}", file=sys.stderr)
    return code


def _fmspc_of_quote(path: str) -> bytes:
    try:
        quote = parse_quote(Path(path).read_bytes())
        return pck_extension_of(CertInfo.from_der(quote.signature.pck_chain_der[0])).fmspc
    except OSError as exc:
        raise _Usage(f"--quote {path}: {exc.strerror or exc}") from None
    except (QuoteFormatError, PckExtensionError, ValueError, IndexError) as exc:
        raise _Usage(f"--quote {path}: no FMSPC in its PCK certificate ({exc})") from None


def fetch_command(args: argparse.Namespace) -> int:
    try:
        roots = _root(args.root)
        fmspc = normalise_fmspc(args.fmspc) if args.fmspc else _fmspc_of_quote(args.quote)
        client = PccsClient(args.pccs, timeout_s=args.timeout)
    except (_Usage, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    try:
        collateral = trio.run(lambda: client.fetch(fmspc, ca=args.ca))
    except PccsError as exc:
        return _fail(EXIT_REFUSED, str(exc))
    view = summary(collateral, roots, time.time())
    if view["fmspc"] != fmspc.hex().upper():
        view["problems"].append(f"collateral is for FMSPC {view['fmspc']}, not "
                                f"{fmspc.hex().upper()}")
        view["valid"] = False
    if args.out and view["valid"]:
        Path(args.out).write_text(json.dumps(collateral.to_json(), indent=1) + "\n")
        view["written"] = args.out
    _print(view, args.json)
    return EXIT_OK if view["valid"] else EXIT_REFUSED


def show_command(args: argparse.Namespace) -> int:
    try:
        roots = _root(args.root)
        text = Path(args.file).read_text()
    except _Usage as exc:
        return _fail(EXIT_USAGE, str(exc))
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(EXIT_USAGE, f"{args.file}: {exc}")
    try:
        collateral = Collateral.from_json(text)
    except CollateralFormatError as exc:
        return _fail(EXIT_REFUSED, f"{args.file}: {exc}")
    view = summary(collateral, roots, args.now if args.now is not None else time.time())
    _print(view, args.json)
    return EXIT_OK if view["valid"] else EXIT_REFUSED
