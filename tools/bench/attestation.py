"""Quote verification throughput: ee.attestation vs dcap-qvl, same quotes, one core.

    python tools/bench/attestation.py [--seconds S] [--rounds R]

Both verifiers get the same quote bytes, the same collateral (parsed once into each
library's collateral object) and the same `now`. Modes:

* warm -- one long-lived `Verifier`: PCK chain, collateral and TCB match are cached,
  so a call costs the parse plus the two per-quote ECDSA verifications;
* cold -- every cache (ours, including the PEM split memo) is cleared before each call,
  so a call redoes every chain, CRL and collateral signature check.

dcap-qvl keeps no cache, so its single rate is the baseline for both ratios. Inputs
are the real quote in ../shared/tdx (override: EE_TDX_SAMPLES); without it, a sim quote
and sim collateral (dcap-qvl then verifies with the sim root).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import dcap_qvl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation import Collateral, Verifier
from ee.attestation.quote import _split_pem_chain

REPO = Path(__file__).resolve().parents[2]
SAMPLES = Path(os.environ.get("EE_TDX_SAMPLES", REPO.parent / "shared" / "tdx"))


def _inputs() -> tuple[str, bytes, Collateral, float, Verifier, Callable[[], object]]:
    quote_path = SAMPLES / "dcap-qvl-tdx_quote.bin"
    if quote_path.is_file():
        raw = quote_path.read_bytes()
        text = (SAMPLES / "dcap-qvl-tdx_quote_collateral.json").read_text()
        now = 1750329148.0
        theirs = dcap_qvl.QuoteCollateralV3.from_json(text)
        return (
            f"real quote {quote_path.name}",
            raw,
            Collateral.from_json(text),
            now,
            Verifier.intel(),
            lambda: dcap_qvl.verify(raw, theirs, int(now)),
        )
    from ee.attestation.providers.sim import SimTD

    td = SimTD.create()
    raw = td.quote(bytes(64))
    now = 1_760_000_000.0
    collateral = td.collateral(issued_at=now - 60)
    theirs = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(collateral.to_json()))
    root = td.root_cert.public_bytes(Encoding.DER)
    return (
        "sim quote (shared samples not found)",
        raw,
        collateral,
        now,
        Verifier([td.root_cert]),
        lambda: dcap_qvl.verify_with_root_ca(raw, theirs, root, int(now)),
    )


def _rate(fn: Callable[[], object], seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):
            fn()
        n += 20
        t = time.perf_counter()
        if t >= deadline:
            return n / (t - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    args = parser.parse_args()

    label, raw, collateral, now, verifier, dcap = _inputs()
    first = verifier.verify(raw, now=now, collateral=collateral)
    if not first.ok:
        raise SystemExit(f"bench input does not verify: {first.reasons}")
    dcap()  # and dcap-qvl accepts it too

    def warm() -> None:
        verifier.verify(raw, now=now, collateral=collateral)

    def cold() -> None:
        verifier.clear_cache()
        _split_pem_chain.cache_clear()
        verifier.verify(raw, now=now, collateral=collateral)

    key = ec.generate_private_key(ec.SECP256R1())
    sig = key.sign(raw[:632], ec.ECDSA(hashes.SHA256()))
    pub = key.public_key()

    def two_verifies() -> None:
        pub.verify(sig, raw[:632], ec.ECDSA(hashes.SHA256()))
        pub.verify(sig, raw[:632], ec.ECDSA(hashes.SHA256()))

    results: dict[str, list[float]] = {"ours warm": [], "ours cold": [], "dcap-qvl": [], "ceil": []}
    for _ in range(args.rounds):
        results["dcap-qvl"].append(_rate(dcap, args.seconds))
        results["ours warm"].append(_rate(warm, args.seconds))
        results["ours cold"].append(_rate(cold, args.seconds))
        results["ceil"].append(_rate(two_verifies, args.seconds / 2))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"input: {label}; {args.rounds} interleaved rounds x {args.seconds:.1f}s, median")
    print(f"  dcap-qvl               {med['dcap-qvl']:8.0f} quotes/s")
    print(f"  ours warm (cached)     {med['ours warm']:8.0f} quotes/s")
    print(f"  ours cold (no cache)   {med['ours cold']:8.0f} quotes/s")
    print(f"  ceiling (2x ECDSA-P256 verify) {med['ceil']:8.0f} /s")
    print(f"  warm ratio ours/dcap-qvl: {med['ours warm'] / med['dcap-qvl']:.2f}x (goal >= 3.5x)")
    print(f"  cold ratio ours/dcap-qvl: {med['ours cold'] / med['dcap-qvl']:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
