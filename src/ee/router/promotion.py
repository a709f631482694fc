"""The promotion gate: above ``GATE_PERCENT`` a class moves to the new stack only when
a DB-wipe drill (``eectl drill db-wipe``) has passed, its result is signed by the pinned
key, and it is recent. Pure; used by ``eectl rollout`` and by ``ee-router``'s admin
endpoint (``--drill-pubkey``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ee.protocol.signing import SignatureError, verify_document
from ee.router.decision import RolloutConfig

GATE_PERCENT: Final = 25
DEFAULT_DRILL_MAX_AGE_S: Final = 7 * 86400.0


def _stack(url: Any) -> str:
    return url.strip().rstrip("/").lower() if isinstance(url, str) else ""


def drill_ok(doc: Any, pubkey: Any, now: float, max_age_s: float,
             new_stack: str | None = None) -> str | None:
    """None when *doc* (``{"document", "signature"}``) is a passed, signed, recent drill
    result (finished at most *max_age_s* ago and not in the future); otherwise the
    reason it is not. Given *new_stack* (the URL of the stack being promoted, as the
    router reaches it), the drill must have been run against that stack (its ``cp``,
    trailing slash ignored): a drill of another stack proves nothing about this one."""
    if pubkey is None:
        return "no --drill-pubkey given to check the DB-wipe drill result"
    if not isinstance(doc, dict) or not isinstance(doc.get("document"), dict) \
            or not isinstance(doc.get("signature"), str):
        return "no DB-wipe drill result is recorded (eectl rollout record-drill)"
    try:
        verify_document(doc["document"], bytes.fromhex(doc["signature"]), pubkey)
    except (SignatureError, ValueError):
        return "the recorded DB-wipe drill result is not signed by the pinned key"
    body = doc["document"]
    if body.get("drill") != "db-wipe" or body.get("passed") is not True:
        return "the recorded DB-wipe drill did not pass"
    finished = body.get("finished_unix")
    if isinstance(finished, bool) or not isinstance(finished, int | float) \
            or not 0 <= now - finished <= max_age_s:
        return (f"the recorded DB-wipe drill is older than {max_age_s:.0f} s "
                "(or dated in the future)")
    if new_stack is not None and (not _stack(new_stack)
                                  or _stack(body.get("cp")) != _stack(new_stack)):
        return (f"the recorded DB-wipe drill was run against {body.get('cp')!r}, "
                f"not the new stack {new_stack!r}")
    return None


def promotion_refusal(before: RolloutConfig, moves: Mapping[str, float], drill: Any,
                      pubkey: Any, now: float,
                      max_age_s: float = DEFAULT_DRILL_MAX_AGE_S,
                      new_stack: str | None = None) -> str | None:
    """Why moving classes to *moves* (class -> percent) from *before* is refused, or
    None. Only a rise to above ``GATE_PERCENT`` needs the drill."""
    if not any(pct > GATE_PERCENT and pct > before.percent(c) for c, pct in moves.items()):
        return None
    reason = drill_ok(drill, pubkey, now, max_age_s, new_stack)
    return None if reason is None else f"promotion above {GATE_PERCENT} % refused: {reason}"
