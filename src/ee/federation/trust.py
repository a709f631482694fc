"""What a federation's signed snapshot carries besides deployment intents: the master's
operator policy for its dcs, and the releases it admitted (pure decisions only).

Theory of operation
-------------------
Policy. ``PUT /api/v2/federation/desired`` takes ``{"policy": {...}}``, checked here
strictly (:func:`read_policy`): a key this module does not know is 400 ``bad_policy``
naming it, a document over ``MAX_POLICY_BYTES`` too, and ``policy`` itself is required
(``{}`` is refused: ``{"policy": {}}`` is the explicit reset to the defaults). Every
field is optional with a default, and every field is applied at the dc:

* ``accept_deployments`` (default ``true``): ``false`` closes the dc to *new* intents.
  An intent for this dc that it does not run yet is not started; the dc reports it
  ``unsatisfiable`` with reason ``datacenter_closed`` (so the master places it in
  another dc, or fails it with every dc's reasons) and keeps the refusal (a restart
  does not start it either) while the intent names it. Deployments it already runs go
  on, and take their updates. ``true`` again opens it to intents placed afterwards.

Releases (trust down). The master carries each release it admitted (``POST
/api/v2/admin/releases``) as its admitted body (manifest, signature, node size) in
``releases``, sorted, every dc's snapshot the same. The signed snapshot proves only
that the master sent them: a dc admits a carried release only when its *own* bootstrap
bundle pins a key that signed it and it knows the node size (:func:`check_carried`,
``ee.cp.releases.check_admission``, the dc's own admission check), so a master cannot
make a dc trust measurements that no key the dc pins signed. A release that fails is
refused (event ``federation.refused`` with ``release_untrusted``/``bad_release``) and
the rest of the snapshot still applies: the master's operator sees the refusal, and the
dc keeps running what its own pinned keys vouch for.

Origin: the dc remembers which releases it admitted *because* the master carried them
(``from_master``, kept in its spool). When a snapshot no longer carries one of those,
the dc withdraws it (:func:`release_sync`). A release the dc's operator admitted
locally is never withdrawn by the master, even when the master also carries it (the
local admission came first; it stays local). A master-carried release the dc's
operator also admits afterwards stays the master's (the admission is a no-op), so the
master's withdrawal removes it; the operator admits it again to keep it. A master
release the dc's operator withdrew by hand comes back with the next snapshot that
carries it.

Trust roots (release keys, attestation roots) never travel down: each CP's are its own
signed bootstrap bundle's.
"""

from __future__ import annotations

import json
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
    Set,
)
from typing import Any, Final

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ee.cp.releases import AdmittedRelease, ReleaseRefused, check_admission

BAD_POLICY: Final = "bad_policy"
MAX_POLICY_BYTES: Final = 4096
#: Releases one snapshot carries, and the size of each carried body (its manifest names
#: every artefact's hash): the snapshot goes to every dc as one frame.
MAX_RELEASES: Final = 64
MAX_RELEASE_BYTES: Final = 64 << 10
TOO_MANY_RELEASES: Final = "too_many_releases"
DATACENTER_CLOSED: Final = "datacenter_closed"


class PolicyError(ValueError):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@attrs.frozen
class FederationPolicy:
    """The master's policy for its dcs (every field read by the dc)."""

    accept_deployments: bool = True

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


_FIELDS: Final = {f.name: f.type for f in attrs.fields(FederationPolicy)}


def unknown_fields(doc: Mapping[str, Any]) -> list[str]:
    return sorted(str(k)[:60] for k in doc if k not in _FIELDS)


def read_policy(doc: object, *, strict: bool = True) -> FederationPolicy:
    """*doc* as a policy, or ``PolicyError`` naming the field: an unknown key too when
    *strict* (the operator's input at the master). A dc reads the master's signed
    policy with *strict* False: a field of a newer master is skipped (logged), never a
    reason to refuse the snapshot; a known field of the wrong type still is."""
    if not isinstance(doc, Mapping):
        raise PolicyError("policy", "a JSON object")
    try:
        size = len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError, RecursionError):
        raise PolicyError("policy", "not JSON") from None
    if size > MAX_POLICY_BYTES:
        raise PolicyError("policy", f"{size} bytes, at most {MAX_POLICY_BYTES}")
    for key in unknown_fields(doc) if strict else ():
        raise PolicyError(f"policy.{key}", "unknown field (known: "
                          f"{', '.join(sorted(_FIELDS))})")
    value = doc.get("accept_deployments", True)
    if not isinstance(value, bool):
        raise PolicyError("policy.accept_deployments", "true or false")
    return FederationPolicy(accept_deployments=value)


def desired_policy(body: object) -> FederationPolicy:
    """The body of ``PUT /api/v2/federation/desired``: ``{"policy": {...}}``, nothing
    else; ``policy`` is required (``{"policy": {}}`` resets to the defaults)."""
    if not isinstance(body, Mapping):
        raise PolicyError("body", "a JSON object")
    for key in sorted(map(str, body)):
        if key != "policy":
            raise PolicyError(key[:60], "unknown field (known: policy)")
    if "policy" not in body:
        raise PolicyError("policy", "required ({\"policy\": {}} resets every field to "
                          "its default)")
    return read_policy(body["policy"])


# ---- releases ------------------------------------------------------------------------


def carried_releases(releases: Iterable[AdmittedRelease]) -> list[dict[str, Any]]:
    """What the master's snapshot carries of its admitted releases: their admitted
    bodies, by id (a stable order, so an unchanged set publishes nothing)."""
    return [dict(r.body) for r in sorted(releases, key=lambda r: r.ident)]


def carried_error(bodies: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the master cannot carry *bodies* (None: it can)."""
    if len(bodies) > MAX_RELEASES:
        return f"{len(bodies)} admitted releases, a snapshot carries at most {MAX_RELEASES}"
    for body in bodies:
        size = len(json.dumps(body, separators=(",", ":")))
        if size > MAX_RELEASE_BYTES:
            return f"a release body of {size} bytes, at most {MAX_RELEASE_BYTES}"
    return None


@attrs.frozen
class CarriedRefusal:
    what: str  # name version for node size, as far as the body says
    code: str
    reason: str


def _what(body: object) -> str:
    if not isinstance(body, Mapping):
        return "a release"
    manifest = body.get("manifest")
    name = version = "?"
    if isinstance(manifest, Mapping):
        name, version = str(manifest.get("name"))[:60], str(manifest.get("version"))[:40]
    return f"release {name} {version} for node size {str(body.get('node_size'))[:32]}"


def check_carried(carried: object, keys: Sequence[tuple[str, Ed25519PublicKey]],
                  node_sizes: Collection[str]
                  ) -> tuple[dict[str, AdmittedRelease], list[CarriedRefusal]]:
    """The releases a snapshot carries that this CP's own pinned *keys* admit (by id),
    and the refused ones. Verifies signatures: call it off the event loop."""
    if carried is None:
        return {}, []
    if not isinstance(carried, list):
        return {}, [CarriedRefusal("releases", "bad_release", "releases must be a list")]
    if len(carried) > MAX_RELEASES:
        return {}, [CarriedRefusal("releases", TOO_MANY_RELEASES,
                                   f"{len(carried)} releases, at most {MAX_RELEASES}")]
    admitted: dict[str, AdmittedRelease] = {}
    refused: list[CarriedRefusal] = []
    for body in carried:
        try:
            if len(json.dumps(body, separators=(",", ":"))) > MAX_RELEASE_BYTES:
                raise ReleaseRefused(400, "bad_release",
                                     f"a release body over {MAX_RELEASE_BYTES} bytes")
            release = check_admission(body, keys, node_sizes)
        except ReleaseRefused as exc:
            refused.append(CarriedRefusal(_what(body), exc.code, exc.reason))
            continue
        admitted[release.ident] = release
    return admitted, refused


@attrs.frozen
class ReleaseSync:
    admit: tuple[AdmittedRelease, ...]  # carried, verified here, not yet admitted here
    withdraw: tuple[str, ...]  # got from the master, no longer carried (or verified)
    from_master: frozenset[str]  # the ids held because the master carries them, after


def release_sync(offered: Mapping[str, AdmittedRelease], held: Set[str],
                 from_master: Set[str]) -> ReleaseSync:
    """What a dc does with a snapshot's verified releases (*offered*), holding *held*
    (admitted here, by id), of which *from_master* came from the master."""
    admit = tuple(r for ident, r in sorted(offered.items()) if ident not in held)
    kept = {i for i in from_master if i in offered and i in held}
    withdraw = tuple(sorted(i for i in from_master if i not in offered and i in held))
    return ReleaseSync(admit, withdraw,
                       frozenset(kept | {r.ident for r in admit}))


@attrs.frozen
class ReleaseHooks:
    """What a dc CP lends its federation to apply carried releases (its own keys, node
    sizes and admission path: ``ControlPlane.admit_release``/``withdraw_release``)."""

    keys: Sequence[tuple[str, Ed25519PublicKey]]
    node_sizes: tuple[str, ...]
    held: Callable[[], Mapping[str, AdmittedRelease]]
    admit: Callable[[AdmittedRelease], Awaitable[bool]]
    withdraw: Callable[[str], Awaitable[AdmittedRelease | None]]


# ---- accept_deployments ---------------------------------------------------------------


def closed_intents(desired: Mapping[str, Any], label: str, policy: FederationPolicy,
                   running_here: Collection[str], closed: Set[str]) -> frozenset[str]:
    """The intents for *label* this dc does not run (its policy closed it to them):
    those refused before that still name it, and, while ``accept_deployments`` is
    false, every running intent for it that it does not run yet (*running_here*: its
    local deployments' ids)."""
    out: set[str] = set()
    deployments = desired.get("deployments")
    if not isinstance(deployments, Mapping):
        return frozenset()
    for dep_id, doc in deployments.items():
        if not isinstance(doc, Mapping) or doc.get("datacenter") != label:
            continue
        if dep_id in closed or (not policy.accept_deployments
                                and doc.get("desired") == "running"
                                and dep_id not in running_here):
            out.add(dep_id)
    return frozenset(out)


def without(desired: Mapping[str, Any], closed: Set[str]) -> dict[str, Any]:
    """*desired* as this dc runs it: without the intents it is closed to."""
    if not closed or not isinstance(desired.get("deployments"), Mapping):
        return dict(desired)
    return {**desired, "deployments": {k: v for k, v in desired["deployments"].items()
                                       if k not in closed}}
