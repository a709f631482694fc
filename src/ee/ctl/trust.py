"""`eectl trust`: attestation trust tools (verify-quote, verify-health, dev-root,
wait-attested, measure, collateral, reproducibility-check).

``verify-health`` (`ee.ctl.verify_health`) checks an app's attested health quote
against a fresh nonce and the expected hash; ``wait-attested`` is `eectl deploy
wait-attested`; ``dev-root`` prints a dev cluster's simulated root.

``verify-quote --event-log CCEL`` replays a TDX event log to RTMR0..2 and requires the
quote's values (``--runtime-log`` does the same for RTMR3 with the agent's runtime
log); ``measure --image DIR`` predicts RTMR1/RTMR2, PCR4/PCR9 and (with
``--firmware``) MRTD from an image's artefacts, ``measure --disk FILE`` the UEFI boot of
a baked GCP disk (``eectl image bake-gcp``), and either can merge them into a
measurement policy's node size entries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from ee.attestation.collateral import Collateral
from ee.attestation.errors import CollateralFormatError, PolicyFormatError, QuoteFormatError
from ee.attestation.eventlog import (
    EventLogFormatError,
    RuntimeLogError,
    parse_ccel,
    parse_runtime_log,
    replay_rtmrs,
    replay_runtime,
    rtmr_mismatches,
    runtime_mismatches,
)
from ee.attestation.measure import (
    MeasureError,
    Prediction,
    UkiPrediction,
    gib,
    predict,
    predict_uki,
)
from ee.attestation.policy import Measurements, Policy, Verdict, evaluate
from ee.attestation.quote import BODY_TYPE_TD15, Quote, parse_quote
from ee.attestation.verify import VerificationResult, Verifier, load_intel_root
from ee.ctl.collateral import register_collateral
from ee.ctl.deploy import register_wait_attested
from ee.ctl.image import register_trust_commands
from ee.ctl.verify_health import add_verify_health

EXIT_ACCEPTED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

POLICY_FORMAT = """\
policy file (--policy FILE), JSON; every field optional:
  {
    "mode": "strict",            strict: any violation refuses; warn: admit and list
                                 them (never a bad signature, a debug TD or a
                                 REPORTDATA mismatch); disabled: check only debug
                                 and provider
    "mrtd":  ["<96 hex>", ...],  allowlists of the quote's registers (SHA-384, hex);
    "rtmr0": [...], "rtmr1": [...], "rtmr2": [...], "rtmr3": [...],
                                 an empty or absent list allows any value
    "pcr4": ["<64 hex>"], "pcr9": [...],   vTPM PCRs (tpm provider only)
    "providers": ["tdx", "sim"], accepted evidence: tdx (chains to Intel's root),
                                 sim (any other root), tpm; default tdx and sim
    "node_sizes": {"SIZE": {"mrtd": [...], "rtmr1": [...], "providers": [...]}},
                                 per node size (--node-size): each non-empty list
                                 replaces the global one
    "allowed_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],   (the default)
    "require_collateral": true,  refuse when no --collateral gives a TCB status
    "max_collateral_age_s": 2592000,
    "require_event_log": false   refuse unless --event-log/--runtime-log replay
  }
A dev cluster (simulated quotes, no collateral):
  eectl trust dev-root > dev-root.pem
  echo '{"mode": "strict", "require_collateral": false}' > dev-policy.json
  eectl trust verify-quote quote.bin --root dev-root.pem --policy dev-policy.json
`eectl trust measure --policy-out FILE` writes the allowlists an image will measure.
"""


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=POLICY_FORMAT,
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
    vq.add_argument(
        "--event-log",
        metavar="CCEL",
        help=(
            "TDX event log (binary CCEL, as /sys/firmware/acpi/tables/data/CCEL): replay "
            "RTMR0..2 and refuse unless they equal the quote's"
        ),
    )
    vq.add_argument(
        "--runtime-log",
        metavar="FILE",
        help="the agent's RTMR3 runtime log (JSON lines): replay and require the quote's RTMR3",
    )
    vq.add_argument("--json", action="store_true", help="print one JSON object")
    vq.set_defaults(handler=verify_quote)

    me = commands.add_parser(
        "measure",
        help="predict an image's boot measurements",
        description=(
            "Predict, from an image's artefacts (DIR/vmlinuz, DIR/initrd.img, DIR/cmdline), "
            "the TDX RTMR1/RTMR2 (SHA-384) and the vTPM PCR4/PCR9 (SHA-256) of a direct "
            "kernel boot under QEMU with OVMF/TDVF, and MRTD given the TDVF firmware. "
            "RTMR0 (ACPI tables) is not predicted."
        ),
    )
    source = me.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="DIR", help="image directory (direct kernel boot)")
    source.add_argument(
        "--disk",
        metavar="FILE",
        help=(
            "a baked disk (`eectl image bake-gcp`: FILE.tar.gz or disk.raw): predict its "
            "UEFI boot (PCR4/5/9/11, RTMR1/RTMR2); independent of the memory size"
        ),
    )
    me.add_argument("--firmware", metavar="FILE", help="TDVF/OVMF firmware: also predict MRTD")
    me.add_argument(
        "--memory",
        metavar="GIB",
        type=float,
        default=2.0,
        help=(
            "guest memory in GiB (default 2; QEMU patches the kernel's header with an "
            "initrd address that depends on it below 2.75 GiB)"
        ),
    )
    me.add_argument(
        "--unpatched-kernel",
        action="store_true",
        help="the firmware measures the kernel file as is (OVMF >= edk2-stable202505)",
    )
    me.add_argument(
        "--initrd-arg",
        choices=("suffix", "prefix"),
        default="suffix",
        help=(
            "where the firmware puts initrd=initrd in the measured command line: after it "
            "(OVMF 2022.11, default) or before it (edk2-stable202602 TDVF)"
        ),
    )
    me.add_argument(
        "--qemu8-mrtd",
        action="store_true",
        help="MRTD as QEMU 8.x TDX builds add pages (all ADDs of a section, then EXTENDs)",
    )
    me.add_argument("--json", action="store_true", help="print one JSON object")
    me.add_argument(
        "--policy-out",
        metavar="FILE",
        help="merge the predicted values into this policy file's node size entry",
    )
    me.add_argument(
        "--node-size",
        metavar="SIZE",
        action="append",
        help="the node size entry (with --policy-out; repeat for several, e.g. every gcp size)",
    )
    me.set_defaults(handler=measure)

    register_collateral(commands)
    register_trust_commands(commands)  # reproducibility-check (ee.ctl.image)
    add_verify_health(commands)  # verify-health, dev-root (ee.ctl.verify_health)
    register_wait_attested(commands)  # (ee.ctl.deploy)



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
    for key, regs in (("event_log", ("rtmr0", "rtmr1", "rtmr2")), ("runtime_log", ("rtmr3",))):
        log = doc.get(key)
        if log is not None:
            state = "matches the quote" if log["matches"] else "DOES NOT MATCH the quote"
            print(f"{key.replace('_', ' '):>15}: {len(log['events'])} events, {state}")
            for reg in regs:
                print(f"{'replayed ' + reg:>15}: {log[reg]}")
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
    event_log = _event_log(args.event_log, quote) if args.event_log else None
    runtime_log = _runtime_log(args.runtime_log, quote) if args.runtime_log else None
    logs = {k: v for k, v in (("event_log", event_log), ("runtime_log", runtime_log)) if v}
    mismatches = [m for log in logs.values() for m in log["mismatches"]] if logs else None
    result = Verifier(roots).verify(quote, now=now, collateral=collateral)
    verdict = evaluate(policy, result, now=now, node_size=args.node_size, event_log=mismatches)
    doc = {**_report(quote, result, verdict), **logs}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_human(doc)
    return EXIT_ACCEPTED if verdict.admitted else EXIT_REFUSED


def _event_log(path: str, quote: Quote) -> dict[str, Any]:
    """Replay a CCEL against the quote's RTMR0..2; malformed logs refuse (exit 1)."""
    try:
        log = parse_ccel(_read(path, "event log"))
    except EventLogFormatError as exc:
        raise _InputError(f"{path}: {exc}", EXIT_REFUSED) from None
    replayed = replay_rtmrs(log)
    r = quote.report
    mismatches = rtmr_mismatches(log, (r.rtmr0, r.rtmr1, r.rtmr2))
    return {
        "rtmr0": replayed[0].hex(),
        "rtmr1": replayed[1].hex(),
        "rtmr2": replayed[2].hex(),
        "matches": not mismatches,
        "mismatches": mismatches,
        "events": [e.to_json() for e in log.events],
    }


def _runtime_log(path: str, quote: Quote) -> dict[str, Any]:
    """Replay the agent's runtime log against the quote's RTMR3."""
    try:
        events = parse_runtime_log(_read(path, "runtime log"))
    except RuntimeLogError as exc:
        raise _InputError(f"{path}: {exc}", EXIT_REFUSED) from None
    rtmr3 = replay_runtime(events)
    mismatches = runtime_mismatches(events, quote.report.rtmr3)
    return {
        "rtmr3": rtmr3.hex(),
        "matches": not mismatches,
        "mismatches": mismatches,
        "events": [e.to_json() for e in events],
    }


# --- eectl trust measure ----------------------------------------------------------


def measure(args: argparse.Namespace) -> int:
    try:
        return _measure(args)
    except _InputError as exc:
        print(f"eectl trust measure: {exc}", file=sys.stderr)
        return exc.code


def _measure(args: argparse.Namespace) -> int:
    if bool(args.policy_out) != bool(args.node_size):
        raise _InputError("--policy-out and --node-size go together")
    if args.disk:
        return _measure_disk(args)
    image = Path(args.image)
    kernel = _read(str(image / "vmlinuz"), "kernel")
    initrd = _read(str(image / "initrd.img"), "initrd")
    try:
        cmdline = _read(str(image / "cmdline"), "command line").decode().strip()
    except UnicodeDecodeError:
        raise _InputError(f"{image / 'cmdline'} is not UTF-8") from None
    firmware = _read(args.firmware, "firmware") if args.firmware else None
    try:
        prediction = predict(
            kernel,
            initrd,
            cmdline,
            memory=gib(args.memory),
            patched=not args.unpatched_kernel,
            firmware=firmware,
            qemu_interleaved=not args.qemu8_mrtd,
            initrd_arg=args.initrd_arg,
        )
    except MeasureError as exc:
        raise _InputError(str(exc)) from None
    if args.policy_out:
        for size in args.node_size:
            _merge_policy(Path(args.policy_out), size, policy_entry(prediction))
    doc: dict[str, Any] = {"image": str(image), "cmdline": cmdline, **prediction.to_json()}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{'memory':>8}: {args.memory:g} GiB")
        for key in ("mrtd", "rtmr1", "rtmr2", "pcr4", "pcr9"):
            if doc[key] is not None:
                print(f"{key:>8}: {doc[key]}")
        if args.policy_out:
            print(f"{'policy':>8}: node size {', '.join(args.node_size)} in {args.policy_out}")
    return EXIT_ACCEPTED


def _measure_disk(args: argparse.Namespace) -> int:
    """``measure --disk``: the UKI on the disk's ESP and its GPT, predicted (`predict_uki`)."""
    from ee.image.disk import read_uki, uki_parts
    from ee.image.errors import ImageError

    if args.firmware or args.unpatched_kernel or args.qemu8_mrtd:
        raise _InputError("--firmware/--unpatched-kernel/--qemu8-mrtd are for --image")
    try:
        uki, gpt = read_uki(Path(args.disk))
        sections = uki_parts(uki)
        prediction = predict_uki(uki, sections, gpt.event_data())
    except (ImageError, MeasureError) as exc:
        raise _InputError(str(exc), EXIT_REFUSED) from None
    if args.policy_out:
        for size in args.node_size:
            _merge_policy(Path(args.policy_out), size, uki_policy_entry(prediction))
    doc: dict[str, Any] = {
        "disk": args.disk,
        "cmdline": sections[".cmdline"].decode("ascii"),
        "partitions": [
            {"number": p.number, "label": p.label, "type": p.type, "guid": p.guid}
            for p in gpt.partitions
        ],
        **prediction.to_json(),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for key in ("pcr4", "pcr5", "pcr9", "pcr11", "pcr11_running", "pcr12", "rtmr1",
                    "rtmr2"):
            print(f"{key:>13}: {doc[key]}")
        if args.policy_out:
            print(f"{'policy':>13}: node size {', '.join(args.node_size)} in {args.policy_out}")
    return EXIT_ACCEPTED


def uki_policy_entry(prediction: UkiPrediction) -> Measurements:
    """The node size entry for a UKI disk boot: PCR4 (the UKI's and the kernel's
    Authenticode digests: every section) and PCR9 (command line and initrd) on the vTPM,
    RTMR1/RTMR2 under TDX."""
    regs = prediction.registers
    return Measurements(
        rtmr1=[regs["rtmr1"].hex()],
        rtmr2=[regs["rtmr2"].hex()],
        pcr4=[regs["pcr4"].hex()],
        pcr9=[regs["pcr9"].hex()],
    )


def policy_entry(prediction: Prediction) -> Measurements:
    """The node size entry that allows *prediction* (MRTD only when predicted)."""
    return Measurements(
        mrtd=[prediction.mrtd.hex()] if prediction.mrtd is not None else [],
        rtmr1=[prediction.rtmr1.hex()],
        rtmr2=[prediction.rtmr2.hex()],
        pcr4=[prediction.pcr4.hex()],
        pcr9=[prediction.pcr9.hex()],
    )


def _merge_policy(path: Path, node_size: str, add: Measurements) -> None:
    """Add *add* to *path*'s ``node_sizes[node_size]`` (created if absent); the
    result must load as a `Policy` before it replaces the file."""
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(_read(str(path), "policy"))
        except ValueError as exc:
            raise _InputError(f"{path}: not JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise _InputError(f"{path}: a policy is a JSON object")
        doc = loaded
    try:
        current = Policy.from_json(doc)
    except PolicyFormatError as exc:
        raise _InputError(f"{path}: {exc}") from None
    entry = current.node_sizes.get(node_size, Measurements()).merged(add)
    doc["node_sizes"] = {**doc.get("node_sizes", {}), node_size: entry.to_json()}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    try:
        Policy.from_json(text)
    except PolicyFormatError as exc:  # pragma: no cover - merged() keeps entries valid
        raise _InputError(f"{path}: the merged policy is invalid: {exc}") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _InputError(f"cannot write {path}: {exc.strerror or exc}") from None
