"""Measurement policy: a pure decision over a `VerificationResult`.

Rules, each producing a `Violation` when broken:

* ``verification`` -- the quote failed cryptographic verification (any reason);
* ``debug`` -- the TD has the DEBUG attribute (its memory is readable by the host);
* ``report_data`` -- REPORTDATA is not SHA-512(domain || nonce || public key);
* ``mrtd`` / ``rtmr0``..``rtmr3`` -- the register is not in its allowlist (an empty
  allowlist allows anything; a node size's non-empty list replaces the global one);
* ``tcb_status`` -- collateral gave a status outside `allowed_tcb_statuses`, or no
  status is known (no collateral) while `require_collateral` is set;
* ``collateral_age`` -- the TCB info / QE identity were issued too long ago.

Modes: ``strict`` refuses on any violation. ``warn`` admits and lists every violation,
except *hard* ones -- verification failure, a debug TD, a REPORTDATA mismatch -- which
no mode that checks anything can admit (a forged, replayed or debuggable TD proves
nothing). ``disabled`` evaluates nothing but the debug rule and admits; the result
still records the verification outcome. A debug TD is refused in every mode.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from ee.attestation.errors import PolicyFormatError
from ee.attestation.verify import VerificationResult

Mode = Literal["strict", "warn", "disabled"]
MODES: tuple[Mode, ...] = ("strict", "warn", "disabled")
REGISTER_DOMAIN = b"ee/v2/register"
HARD_RULES = frozenset({"verification", "debug", "report_data"})


def _hexset(values: Iterable[str]) -> frozenset[str]:
    out = set()
    for v in values:
        v = v.strip().lower()
        if len(v) != 96:
            raise PolicyFormatError(f"measurement {v!r} is not 48 bytes of hex")
        try:
            bytes.fromhex(v)
        except ValueError:
            raise PolicyFormatError(f"measurement {v!r} is not hex") from None
        out.add(v)
    return frozenset(out)


@attrs.frozen
class Measurements:
    """Allowlists of MRTD and RTMR0-3 (hex); an empty set allows any value."""

    mrtd: frozenset[str] = attrs.field(default=frozenset(), converter=_hexset)
    rtmr0: frozenset[str] = attrs.field(default=frozenset(), converter=_hexset)
    rtmr1: frozenset[str] = attrs.field(default=frozenset(), converter=_hexset)
    rtmr2: frozenset[str] = attrs.field(default=frozenset(), converter=_hexset)
    rtmr3: frozenset[str] = attrs.field(default=frozenset(), converter=_hexset)


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

    @classmethod
    def from_json(cls, doc: str | bytes | Mapping[str, Any]) -> Policy:
        """Load a policy document::

        {"mode": "strict", "mrtd": [...], "rtmr0": [...], ...,
         "node_sizes": {"llm": {"mrtd": [...]}},
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
        known = {
            "mode",
            "mrtd",
            "rtmr0",
            "rtmr1",
            "rtmr2",
            "rtmr3",
            "node_sizes",
            "allowed_tcb_statuses",
            "require_collateral",
            "max_collateral_age_s",
        }
        extra = set(doc) - known
        if extra:
            raise PolicyFormatError(f"unknown policy fields: {', '.join(sorted(extra))}")

        def meas(d: Mapping[str, Any], where: str) -> Measurements:
            lists = {}
            for reg in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"):
                value = d.get(reg, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise PolicyFormatError(f"{where}{reg} must be a list of hex strings")
                lists[reg] = value
            return Measurements(**lists)

        sizes = doc.get("node_sizes", {})
        if not isinstance(sizes, Mapping):
            raise PolicyFormatError("node_sizes must be an object")
        for name, entry in sizes.items():
            if not isinstance(entry, Mapping) or set(entry) - {
                "mrtd",
                "rtmr0",
                "rtmr1",
                "rtmr2",
                "rtmr3",
            }:
                raise PolicyFormatError(f"node_sizes.{name} may only list mrtd and rtmr0..3")
        age = doc.get("max_collateral_age_s")
        if age is not None and (not isinstance(age, int | float) or isinstance(age, bool)):
            raise PolicyFormatError("max_collateral_age_s must be a number")
        statuses = doc.get("allowed_tcb_statuses", ["UpToDate", "SWHardeningNeeded"])
        if not isinstance(statuses, list):
            raise PolicyFormatError("allowed_tcb_statuses must be a list")
        require = doc.get("require_collateral", True)
        if not isinstance(require, bool):
            raise PolicyFormatError("require_collateral must be true or false")
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


def evaluate(
    policy: Policy,
    result: VerificationResult,
    *,
    now: float,
    node_size: str | None = None,
    expected_report_data: bytes | None = None,
) -> Verdict:
    """Judge *result* under *policy* at unix time *now* (pure)."""
    report = result.quote.report
    violations: list[Violation] = []
    if report.debug:
        violations.append(Violation("debug", "the TD has the DEBUG attribute set"))
    if policy.mode != "disabled":
        violations.extend(Violation("verification", r) for r in result.reasons)
        if expected_report_data is not None and report.report_data != expected_report_data:
            violations.append(
                Violation("report_data", "REPORTDATA does not bind this nonce and key")
            )
        size = policy.node_sizes.get(node_size) if node_size is not None else None
        for reg, value in (
            ("mrtd", report.mr_td),
            ("rtmr0", report.rtmr0),
            ("rtmr1", report.rtmr1),
            ("rtmr2", report.rtmr2),
            ("rtmr3", report.rtmr3),
        ):
            allowed: frozenset[str] = getattr(policy.measurements, reg)
            if size is not None and getattr(size, reg):
                allowed = getattr(size, reg)
            if allowed and value.hex() not in allowed:
                where = f" for node size {node_size}" if size is not None else ""
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
    admitted = not violations if policy.mode == "strict" else not any(v.hard for v in violations)
    return Verdict(
        admitted=admitted,
        mode=policy.mode,
        violations=tuple(violations),
        tcb_status=result.tcb_status,
    )
