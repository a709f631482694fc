"""Measurement policy: a pure decision over a `VerificationResult`.

Rules, each producing a `Violation` when broken:

* ``verification`` -- the quote failed cryptographic verification (any reason);
* ``debug`` -- the TD has the DEBUG attribute (its memory is readable by the host);
* ``report_data`` -- REPORTDATA is not SHA-512(domain || nonce || public key);
* ``mrtd`` / ``rtmr0``..``rtmr3`` -- the register is not in its allowlist (an empty
  allowlist allows anything; a node size's non-empty list replaces the global one);
* ``pcr4`` / ``pcr9`` -- the same for a vTPM's SHA-256 PCRs (``tpm`` provider only;
  `evaluate_tpm`); a PCR the evidence does not carry is a violation when listed;
* ``provider`` -- the evidence comes from a provider the node size does not accept
  (``providers``: any of ``tdx``, ``sim``, ``tpm``; default ``tdx`` and ``sim``, so a
  vTPM is accepted only when a policy names it, and a policy that lists only ``tdx``
  never accepts ``sim`` or ``tpm``). For a TDX quote the provider is derived from the
  evidence, not from what the agent claims: ``tdx`` when the PCK chain ends at Intel's
  root, ``sim`` otherwise;
* ``tcb_status`` -- collateral gave a status outside `allowed_tcb_statuses`, or no
  status is known (no collateral) while `require_collateral` is set;
* ``collateral_age`` -- the TCB info / QE identity were issued too long ago;
* ``event_log`` -- the event logs served with the quote (CCEL for RTMR0..2, the
  agent's runtime log for RTMR3) do not replay to the quoted registers, or none was
  given while `require_event_log` is set. The caller replays
  (`ee.attestation.eventlog.rtmr_mismatches` / `runtime_mismatches`) and passes the
  mismatches; this module only decides.

Modes: ``strict`` refuses on any violation. ``warn`` admits and lists every violation,
except *hard* ones -- verification failure, a debug TD, a REPORTDATA mismatch -- which
no mode that checks anything can admit (a forged, replayed or debuggable TD proves
nothing). ``disabled`` evaluates nothing but the debug and provider rules and admits;
the result still records the verification outcome. A debug TD, and evidence from a
provider the policy does not accept, are refused in every mode.

Register rules are kept in one table (`REGISTERS`): name, digest size, which provider's
evidence carries it. A node size's entry holds the same fields as the policy's top level;
each non-empty list (and ``providers`` when given) replaces the global one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs

from ee.attestation.errors import PolicyFormatError
from ee.attestation.verify import VerificationResult

Mode = Literal["strict", "warn", "disabled"]
MODES: tuple[Mode, ...] = ("strict", "warn", "disabled")
REGISTER_DOMAIN = b"ee/v2/register"
HARD_RULES = frozenset({"verification", "debug", "report_data", "provider"})

Provider = Literal["tdx", "sim", "tpm"]
PROVIDERS: tuple[Provider, ...] = ("tdx", "sim", "tpm")
DEFAULT_PROVIDERS: frozenset[str] = frozenset({"tdx", "sim"})

# register -> (digest bytes, the provider family whose evidence carries it)
REGISTERS: Mapping[str, tuple[int, Literal["tdx", "tpm"]]] = {
    "mrtd": (48, "tdx"),
    "rtmr0": (48, "tdx"),
    "rtmr1": (48, "tdx"),
    "rtmr2": (48, "tdx"),
    "rtmr3": (48, "tdx"),
    "pcr4": (32, "tpm"),
    "pcr9": (32, "tpm"),
}
TPM_PCRS: Mapping[str, int] = {"pcr4": 4, "pcr9": 9}
ENTRY_FIELDS = frozenset(REGISTERS) | {"providers"}


def _hexset(values: Iterable[str], size: int) -> frozenset[str]:
    if isinstance(values, str | bytes):
        raise PolicyFormatError("a measurement allowlist must be a list of hex strings")
    out = set()
    for v in values:
        v = v.strip().lower()
        if len(v) != 2 * size:
            raise PolicyFormatError(f"measurement {v!r} is not {size} bytes of hex")
        try:
            bytes.fromhex(v)
        except ValueError:
            raise PolicyFormatError(f"measurement {v!r} is not hex") from None
        out.add(v)
    return frozenset(out)


def _hex48(values: Iterable[str]) -> frozenset[str]:
    return _hexset(values, 48)


def _hex32(values: Iterable[str]) -> frozenset[str]:
    return _hexset(values, 32)


def _providers(values: Iterable[str] | None) -> frozenset[str] | None:
    if values is None:
        return None
    if isinstance(values, str | bytes):
        raise PolicyFormatError("providers must be a list")
    out = frozenset(values)
    unknown = out - set(PROVIDERS)
    if unknown:
        raise PolicyFormatError(
            f"unknown providers: {', '.join(sorted(map(str, unknown)))} "
            f"(known: {', '.join(PROVIDERS)})"
        )
    if not out:
        raise PolicyFormatError("providers must name at least one provider")
    return out


@attrs.frozen
class Measurements:
    """Allowlists (hex) of MRTD and RTMR0-3 (TDX, SHA-384) and PCR4/PCR9 (vTPM, SHA-256);
    an empty set allows any value. `providers` is the set of accepted evidence providers
    (None: not set here, inherit)."""

    mrtd: frozenset[str] = attrs.field(default=frozenset(), converter=_hex48)
    rtmr0: frozenset[str] = attrs.field(default=frozenset(), converter=_hex48)
    rtmr1: frozenset[str] = attrs.field(default=frozenset(), converter=_hex48)
    rtmr2: frozenset[str] = attrs.field(default=frozenset(), converter=_hex48)
    rtmr3: frozenset[str] = attrs.field(default=frozenset(), converter=_hex48)
    pcr4: frozenset[str] = attrs.field(default=frozenset(), converter=_hex32)
    pcr9: frozenset[str] = attrs.field(default=frozenset(), converter=_hex32)
    providers: frozenset[str] | None = attrs.field(default=None, converter=_providers)

    def to_json(self) -> dict[str, Any]:
        """The entry as a policy document fragment (sorted lists; empty ones left out)."""
        doc: dict[str, Any] = {
            reg: sorted(getattr(self, reg)) for reg in REGISTERS if getattr(self, reg)
        }
        if self.providers is not None:
            doc["providers"] = sorted(self.providers)
        return doc

    def merged(self, other: Measurements) -> Measurements:
        """This entry with *other*'s values added to each list (other's providers win)."""
        lists = {reg: getattr(self, reg) | getattr(other, reg) for reg in REGISTERS}
        providers = other.providers if other.providers is not None else self.providers
        return Measurements(**lists, providers=providers)


def _mode(value: str) -> Mode:
    if value not in MODES:
        raise PolicyFormatError(f"mode must be one of {', '.join(MODES)}, not {value!r}")
    return value


def _statuses(values: Iterable[str]) -> frozenset[str]:
    from ee.attestation.collateral import TCB_STATUSES

    out = frozenset(values)
    unknown = out - set(TCB_STATUSES)
    if unknown:
        raise PolicyFormatError(f"unknown TCB statuses: {', '.join(sorted(unknown))}")
    return out


@attrs.frozen
class Policy:
    """A measurement policy (frozen value; see the module docstring for the rules)."""

    mode: Mode = attrs.field(default="strict", converter=_mode)
    measurements: Measurements = Measurements()
    node_sizes: Mapping[str, Measurements] = attrs.field(factory=dict)
    allowed_tcb_statuses: frozenset[str] = attrs.field(
        default=frozenset({"UpToDate", "SWHardeningNeeded"}), converter=_statuses
    )
    require_collateral: bool = True
    max_collateral_age_s: float | None = None
    require_event_log: bool = False

    @classmethod
    def from_json(cls, doc: str | bytes | Mapping[str, Any]) -> Policy:
        """Load a policy document::

        {"mode": "strict", "mrtd": [...], "rtmr0": [...], ..., "pcr4": [...],
         "pcr9": [...], "providers": ["tdx"],
         "node_sizes": {"llm": {"mrtd": [...], "rtmr1": [...], "providers": [...]}},
         "allowed_tcb_statuses": ["UpToDate"], "require_collateral": true,
         "max_collateral_age_s": 2592000}
        """
        if isinstance(doc, str | bytes):
            try:
                doc = json.loads(doc)
            except ValueError as exc:
                raise PolicyFormatError(f"policy is not JSON: {exc}") from None
        if not isinstance(doc, Mapping):
            raise PolicyFormatError("policy must be a JSON object")
        known = ENTRY_FIELDS | {
            "mode",
            "node_sizes",
            "allowed_tcb_statuses",
            "require_collateral",
            "max_collateral_age_s",
            "require_event_log",
        }
        extra = set(doc) - known
        if extra:
            raise PolicyFormatError(f"unknown policy fields: {', '.join(sorted(extra))}")

        def meas(d: Mapping[str, Any], where: str) -> Measurements:
            lists = {}
            for reg in REGISTERS:
                value = d.get(reg, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise PolicyFormatError(f"{where}{reg} must be a list of hex strings")
                lists[reg] = value
            providers = d.get("providers")
            if providers is not None and (
                not isinstance(providers, list) or not all(isinstance(v, str) for v in providers)
            ):
                raise PolicyFormatError(f"{where}providers must be a list of names")
            try:
                return Measurements(**lists, providers=providers)
            except PolicyFormatError as exc:
                raise PolicyFormatError(f"{where.rstrip('.') or 'policy'}: {exc}") from None

        sizes = doc.get("node_sizes", {})
        if not isinstance(sizes, Mapping):
            raise PolicyFormatError("node_sizes must be an object")
        for name, entry in sizes.items():
            if not isinstance(entry, Mapping) or set(entry) - ENTRY_FIELDS:
                raise PolicyFormatError(
                    f"node_sizes.{name} may only list {', '.join(sorted(ENTRY_FIELDS))}"
                )
        age = doc.get("max_collateral_age_s")
        if age is not None and (not isinstance(age, int | float) or isinstance(age, bool)):
            raise PolicyFormatError("max_collateral_age_s must be a number")
        statuses = doc.get("allowed_tcb_statuses", ["UpToDate", "SWHardeningNeeded"])
        if not isinstance(statuses, list):
            raise PolicyFormatError("allowed_tcb_statuses must be a list")
        require = doc.get("require_collateral", True)
        if not isinstance(require, bool):
            raise PolicyFormatError("require_collateral must be true or false")
        require_log = doc.get("require_event_log", False)
        if not isinstance(require_log, bool):
            raise PolicyFormatError("require_event_log must be true or false")
        mode = doc.get("mode", "strict")
        if not isinstance(mode, str):
            raise PolicyFormatError("mode must be a string")
        return cls(
            mode=mode,
            measurements=meas(doc, ""),
            node_sizes={str(k): meas(v, f"node_sizes.{k}.") for k, v in sizes.items()},
            allowed_tcb_statuses=statuses,
            require_collateral=require,
            max_collateral_age_s=age,
            require_event_log=require_log,
        )


@attrs.frozen
class Violation:
    rule: str
    detail: str

    @property
    def hard(self) -> bool:
        return self.rule in HARD_RULES

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


@attrs.frozen
class Verdict:
    """The policy's decision; `violations` lists every rule broken (also when admitted)."""

    admitted: bool
    mode: Mode
    violations: tuple[Violation, ...]
    tcb_status: str | None

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(str(v) for v in self.violations)


@functools.cache
def _intel_root_fingerprint() -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    from ee.attestation.verify import load_intel_root

    return hashlib.sha256(load_intel_root().public_bytes(Encoding.DER)).hexdigest()


def quote_provider(result: VerificationResult) -> Provider:
    """``tdx`` when the quote's PCK chain ends at Intel's root, else ``sim`` (derived from
    the evidence, never from what the agent says)."""
    return "tdx" if result.root_fingerprint == _intel_root_fingerprint() else "sim"


def accepted_providers(policy: Policy, node_size: str | None) -> frozenset[str]:
    """The providers *policy* accepts for *node_size* (the size's list, else the global
    one, else `DEFAULT_PROVIDERS`)."""
    size = policy.node_sizes.get(node_size) if node_size is not None else None
    if size is not None and size.providers is not None:
        return size.providers
    if policy.measurements.providers is not None:
        return policy.measurements.providers
    return DEFAULT_PROVIDERS


def _allowlist(policy: Policy, node_size: str | None, reg: str) -> tuple[frozenset[str], str]:
    size = policy.node_sizes.get(node_size) if node_size is not None else None
    if size is not None and getattr(size, reg):
        return getattr(size, reg), f" for node size {node_size}"
    return getattr(policy.measurements, reg), ""


def _provider_violation(policy: Policy, node_size: str | None, provider: str) -> list[Violation]:
    accepted = accepted_providers(policy, node_size)
    if provider in accepted:
        return []
    where = f" for node size {node_size}" if node_size is not None else ""
    return [
        Violation(
            "provider",
            f"evidence from provider {provider} is not accepted{where} "
            f"(accepted: {', '.join(sorted(accepted))})",
        )
    ]


def _decide(policy: Policy, violations: list[Violation], tcb_status: str | None) -> Verdict:
    admitted = not violations if policy.mode == "strict" else not any(v.hard for v in violations)
    return Verdict(
        admitted=admitted,
        mode=policy.mode,
        violations=tuple(violations),
        tcb_status=tcb_status,
    )


def evaluate(
    policy: Policy,
    result: VerificationResult,
    *,
    now: float,
    node_size: str | None = None,
    expected_report_data: bytes | None = None,
    event_log: Sequence[str] | None = None,
) -> Verdict:
    """Judge *result* under *policy* at unix time *now* (pure). *event_log* is the list
    of replay mismatches of the logs served with the quote (empty: they replay), or None
    when no log was served."""
    report = result.quote.report
    violations: list[Violation] = []
    if report.debug:
        violations.append(Violation("debug", "the TD has the DEBUG attribute set"))
    violations.extend(_provider_violation(policy, node_size, quote_provider(result)))
    if policy.mode != "disabled":
        violations.extend(Violation("verification", r) for r in result.reasons)
        if expected_report_data is not None and report.report_data != expected_report_data:
            violations.append(
                Violation("report_data", "REPORTDATA does not bind this nonce and key")
            )
        for reg, value in (
            ("mrtd", report.mr_td),
            ("rtmr0", report.rtmr0),
            ("rtmr1", report.rtmr1),
            ("rtmr2", report.rtmr2),
            ("rtmr3", report.rtmr3),
        ):
            allowed, where = _allowlist(policy, node_size, reg)
            if allowed and value.hex() not in allowed:
                violations.append(
                    Violation(reg, f"{reg.upper()} {value.hex()} is not allowed{where}")
                )
        if result.tcb_status is None:
            if result.collateral_checked:
                violations.append(
                    Violation("tcb_status", "no TCB status (the collateral gave no verdict)")
                )
            elif policy.require_collateral:
                violations.append(Violation("tcb_status", "TCB status unknown (no collateral)"))
        elif result.tcb_status not in policy.allowed_tcb_statuses:
            adv = f" (advisories: {', '.join(result.advisory_ids)})" if result.advisory_ids else ""
            violations.append(
                Violation("tcb_status", f"TCB status {result.tcb_status} is not allowed{adv}")
            )
        if policy.max_collateral_age_s is not None and result.collateral_issued_at is not None:
            age = now - result.collateral_issued_at
            if age > policy.max_collateral_age_s:
                violations.append(
                    Violation(
                        "collateral_age",
                        f"collateral is {int(age)} s old (max {int(policy.max_collateral_age_s)})",
                    )
                )
        if event_log is None:
            if policy.require_event_log:
                violations.append(Violation("event_log", "no event log was served"))
        else:
            violations.extend(Violation("event_log", m) for m in event_log)
    return _decide(policy, violations, result.tcb_status)


def evaluate_tpm(
    policy: Policy,
    node_size: str | None,
    pcrs: Mapping[int, bytes],
    *,
    verification_reasons: Iterable[str] = (),
    report_data_ok: bool = True,
) -> Verdict:
    """Judge vTPM evidence under *policy* (pure; for the ``tpm`` provider).

    *pcrs* maps PCR index to its SHA-256-bank value as read from a TPM quote the caller
    has already checked; *verification_reasons* lists what that check found wrong (quote
    signature, AK, PCR digest: each a hard ``verification`` violation);
    *report_data_ok* False when the quote's qualifying data does not bind this nonce and
    key (hard ``report_data``). Rules: ``provider`` (``tpm`` must be accepted for the
    node size; every mode), ``pcr4`` / ``pcr9`` allowlists (a listed PCR missing from
    *pcrs* or not 32 bytes is a violation). TDX registers do not apply; there is no TCB
    status (``tcb_status`` is None).
    """
    violations = _provider_violation(policy, node_size, "tpm")
    if policy.mode != "disabled":
        violations.extend(Violation("verification", r) for r in verification_reasons)
        if not report_data_ok:
            violations.append(
                Violation("report_data", "the TPM quote does not bind this nonce and key")
            )
        for reg, index in TPM_PCRS.items():
            allowed, where = _allowlist(policy, node_size, reg)
            if not allowed:
                continue
            value = pcrs.get(index)
            if value is None:
                violations.append(Violation(reg, f"PCR{index} is missing from the evidence"))
            elif len(value) != REGISTERS[reg][0]:
                violations.append(
                    Violation(reg, f"PCR{index} is {len(value)} bytes, not a SHA-256 value")
                )
            elif value.hex() not in allowed:
                violations.append(Violation(reg, f"PCR{index} {value.hex()} is not allowed{where}"))
    return _decide(policy, violations, None)
