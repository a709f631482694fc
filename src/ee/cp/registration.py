"""Registration decisions: nonces and admission (pure; the agent plane does the I/O).

A registration is admitted only when every check passes, and each refusal carries a
reason code the agent and the operator can act on:

==================  ===========================================================
code                meaning
==================  ===========================================================
NONCE_EXPIRED       the challenge's nonce outlived its TTL before ``register``
NONCE_REPLAYED      the quote binds a nonce that was already used
REPORTDATA_MISMATCH the quote binds another nonce or another public key
BAD_QUOTE           the quote does not parse
BAD_EVENT_LOG       an event log sent with the quote does not parse (the reason
                    names the log and the byte offset or line)
CREDENTIAL_FAILED   provider ``tpm``: the agent did not answer the credential
                    challenge with its secret (the AK is not in the EK's TPM)
ATTESTATION_FAILED  signature chain, collateral or measurement policy refused it
                    (``event_log: ...`` reasons: the logs do not replay to the
                    quote, or the policy requires logs and none were sent)
BAD_VM_NAME         the VM name is not a lower-case host-name-like name (1..63
                    characters, no trailing dot, no '..')
UNKNOWN_NODE_SIZE   the node size is not a configured preset
BAD_DATACENTER      the datacenter label does not parse
NODE_MISMATCH       the snapshot's node metadata disagrees with the registration
BAD_URL             the announced ``url`` is not a plain http(s) origin (below)
DRIFT               a known VM came back with another MRTD, node size or datacenter
KEY_CHANGED         the VM name is bound to another session key
BINDING_INVALID     the VM name's signed binding failed verification: the name is
                    held until an operator releases it
==================  ===========================================================

VM names are bound, durably, to the session key they first registered with
(:class:`~ee.actors.identity.Binding`, kept as a signed manifest by
:mod:`ee.cp.identities`), so neither a CP restart nor a wiped record store lets a new
key take over a known name. The Judge only reads the bindings; the binding itself is
made on admission, atomically on the event loop, by ``IdentityBook.claim``, which
applies the same :func:`check_binding`.

An agent's ``url`` is shown to tenants as the address of their replicas, so it is
checked like any hostile input: scheme ``http``/``https``, a DNS host name or an IP
literal, an optional port 1..65535, an optional plain path; no user info, query,
fragment, whitespace, non-ASCII or text after a bracketed IPv6 host; at most
``MAX_URL`` characters; with ``Judge.routable_urls_only`` (outside dev mode) no
IP literal another machine cannot reach (loopback, link-local, unspecified, ...). It is stored
normalised (scheme and host lower-cased, no trailing slash).

Event logs (TDX and sim quotes): an ``attestation`` may carry the firmware's CCEL
(RTMR0..2) and the agent's runtime log (RTMR3). :func:`log_mismatches` parses them
(a parse error is ``BAD_EVENT_LOG``) and replays them against the quoted registers;
the policy (``event_log`` rule) judges the mismatches, and with ``require_event_log``
an attestation without logs. When an agent sends one log but not the other, the
missing one counts as empty under ``require_event_log`` (so a non-zero register it
should explain is a mismatch) and is not checked otherwise. Only ``deploy`` runtime
events are known; any other type does not parse. A vTPM quote carries no RTMR, so
the ``tpm`` path ignores the logs.

Nonces are single use: ``NonceBook.consume`` succeeds once per nonce and only before
its expiry. Consumed nonces are remembered (for their TTL) by the REPORTDATA they
imply for the key that used them, so a quote replayed onto a new connection is named
a replay rather than a mere mismatch.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

import attrs

from ee.actors.identity import Binding, Identity, agent_id_for
from ee.attestation import Collateral, Policy, QuoteFormatError, Verifier, evaluate
from ee.attestation.eventlog import (
    EventLogFormatError,
    RuntimeLogError,
    parse_ccel,
    parse_runtime_log,
    rtmr_mismatches,
    runtime_mismatches,
)
from ee.attestation.policy import Verdict, evaluate_tpm
from ee.attestation.quote import TdReport
from ee.attestation.tpm import TpmVerifier, qualifying_data
from ee.attestation.tpm_credential import Credential
from ee.cp.nodes import LabelError, Vocabulary
from ee.protocol.messages import Attestation, Register
from ee.protocol.reportdata import registration_report_data

NONCE_BYTES: Final = 32
#: Lower case only, dot-separated non-empty labels, no trailing dot: one spelling per
#: name, so ``vm-1``, ``VM-1`` and ``vm-1.`` cannot become three bindings of one host.
VM_NAME: Final = re.compile(r"\A(?=[^\n]{1,63}\Z)[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9_-]+)*\Z")
VM_NAME_RULE: Final = ("vm_name must be 1..63 of [a-z0-9._-], starting with a letter or "
                       "digit, without a trailing dot or '..'")
_BRACKETED_NETLOC: Final = re.compile(r"\A\[[^\]]*\](?::[0-9]*)?\Z")
MAX_URL: Final = 512
_HOST_LABEL: Final = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_IPV6_CHARS: Final = re.compile(r"\A[0-9a-f:.]+\Z")
_URL_PATH: Final = re.compile(r"\A(/[A-Za-z0-9._~-]+)*/?\Z")


@attrs.frozen
class Refusal:
    code: str
    reasons: tuple[str, ...]


def agent_url(text: str, *, routable_only: bool = False) -> str:
    """*text* as a normalised agent URL; ValueError naming what is wrong with it.

    ``routable_only`` (a production CP): an IP-literal host must be an address another
    machine could reach: no loopback, link-local (cloud metadata lives there),
    unspecified, multicast or reserved ranges, also when IPv4-mapped. Private ranges
    (RFC 1918, unique-local, shared) stay allowed: agents in a datacenter have them. DNS
    names are not resolved here: what they point at is the operator's DNS.
    """
    if len(text) > MAX_URL:
        raise ValueError(f"url is longer than {MAX_URL} characters")
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise ValueError("url must be printable ASCII without spaces")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError("url does not parse (a bracketed host must be an IPv6 address)"
                         ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("url scheme must be http or https")
    if "@" in parts.netloc:
        raise ValueError("url must not carry user info")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("url must not carry a query or a fragment")
    if "\\" in text or ".." in parts.path.split("/") or "." in parts.path.split("/"):
        raise ValueError("url path must be plain (no '.', '..' or backslashes)")
    if not _URL_PATH.match(parts.path):
        raise ValueError("url path may hold only letters, digits and ._~-/")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("url port must be a number in 1..65535") from None
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError("url port must be a number in 1..65535")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("url has no host")
    if parts.netloc.startswith("["):
        if not _BRACKETED_NETLOC.match(parts.netloc):
            raise ValueError("url has text after the bracketed IPv6 host")
        try:
            if not _IPV6_CHARS.match(host):
                raise ValueError(host)
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("url host in brackets must be an IPv6 address") from None
        host = f"[{host}]"
    elif not _is_ipv4(host):
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
            raise ValueError("url host must be a DNS name or an IP address")
        if labels[-1].isdigit():
            raise ValueError("url host looks like a malformed IPv4 address")
    if routable_only:
        literal = host.strip("[]")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = (
                ipaddress.ip_address(literal))
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip is not None and (ip.is_loopback or ip.is_link_local or ip.is_unspecified
                               or ip.is_multicast or ip.is_reserved):
            raise ValueError(f"url host {literal} is not an address another machine can "
                             "reach (loopback, link-local, ...: allowed in dev mode only)")
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def log_mismatches(attestation: Attestation, report: TdReport, *,
                   require: bool) -> tuple[str, ...] | None:
    """Why the logs *attestation* carries do not explain *report*'s RTMR0..3: empty when
    they do, None when it carries no log. *require* (the policy's ``require_event_log``)
    counts a missing log as empty. Raises `EventLogFormatError` / `RuntimeLogError`
    when a log does not parse. Pure; CPU-bound (call from a worker thread)."""
    if attestation.event_log is None and attestation.runtime_log is None:
        return None
    found: list[str] = []
    if attestation.event_log is not None:
        found += rtmr_mismatches(parse_ccel(attestation.event_log), report.rtmrs[:3])
    elif require:
        found += [f"RTMR{i} is {report.rtmrs[i].hex()} and no CCEL was sent to explain it"
                  for i in range(3) if any(report.rtmrs[i])]
    if attestation.runtime_log is not None:
        events = parse_runtime_log(attestation.runtime_log.encode())
        found += runtime_mismatches(events, report.rtmr3)
    elif require and any(report.rtmr3):
        found.append(f"RTMR3 is {report.rtmr3.hex()} and no runtime log was sent to explain it")
    return tuple(found)


def _bad_log(exc: EventLogFormatError | RuntimeLogError) -> Refusal:
    which = "event_log" if isinstance(exc, EventLogFormatError) else "runtime_log"
    return Refusal("BAD_EVENT_LOG", (f"{which}: {exc}",))


def check_binding(binding: Binding | None, vm_name: str,
                  public_key: bytes) -> Refusal | None:
    """May *public_key* register as *vm_name*, given the name's durable binding?"""
    if binding is None:
        return None
    release = f"an operator can release it: eectl agents release-name {vm_name}"
    if binding.held:
        return Refusal("BINDING_INVALID", (
            f"the signed binding of VM name {vm_name!r} failed verification "
            f"({binding.problem}); {release}",))
    if binding.public_key != public_key:
        return Refusal("KEY_CHANGED", (
            f"VM name {vm_name!r} is bound to another session key; {release}",))
    return None


class NonceBook:
    """Outstanding and recently consumed challenge nonces (time is passed in)."""

    def __init__(self, ttl: float, *, remember: int = 100_000) -> None:
        self.ttl = ttl
        self._outstanding: dict[bytes, float] = {}
        self._consumed: OrderedDict[bytes, float] = OrderedDict()
        self._remember = remember

    def issue(self, now: float) -> tuple[bytes, float]:
        """A fresh nonce and its expiry time."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        expires = now + self.ttl
        self._outstanding[nonce] = expires
        return nonce, expires

    def consume(self, nonce: bytes, now: float) -> Refusal | None:
        expires = self._outstanding.pop(nonce, None)
        if expires is None:
            return Refusal("NONCE_REPLAYED", ("the challenge nonce was already used",))
        if now > expires:
            return Refusal("NONCE_EXPIRED",
                           (f"the challenge expired {now - expires:.1f}s before register",))
        return None

    def discard(self, nonce: bytes) -> None:
        self._outstanding.pop(nonce, None)

    def remember_binding(self, report_data: bytes, now: float) -> None:
        self._consumed[report_data] = now + self.ttl
        while len(self._consumed) > self._remember:
            self._consumed.popitem(last=False)

    def was_used(self, report_data: bytes, now: float) -> bool:
        expiry = self._consumed.get(report_data)
        return expiry is not None and now <= expiry

    def prune(self, now: float) -> None:
        for nonce in [n for n, t in self._outstanding.items() if now > t]:
            del self._outstanding[nonce]
        while self._consumed:
            key, expiry = next(iter(self._consumed.items()))
            if now <= expiry:
                break
            del self._consumed[key]

    def __len__(self) -> int:
        return len(self._outstanding)


@attrs.frozen
class Admission:
    identity: Identity | None
    refusal: Refusal | None
    mrtd: str | None = None
    tcb_status: str | None = None
    report_data: bytes | None = None  # what the quote bound (to name replays)
    #: provider ``tpm``: the activation challenge; the agent plane admits the identity
    #: only when the agent's ``activation`` answer matches it
    credential: Credential | None = None


@attrs.frozen
class Judge:
    """Everything registration needs to decide, as one value (safe to share across threads)."""

    cluster_id: str
    vocabulary: Vocabulary
    verifier: Verifier
    policy: Policy
    collateral: Collateral | None
    #: VM name -> durable binding (read only here). None: no binding book, so the
    #: key check falls back to *known* (this process's memory).
    bindings: Mapping[str, Binding] | None = None
    #: the ``tpm`` provider's verifier (EK CAs from the bootstrap bundle); None: refused
    tpm: TpmVerifier | None = None
    #: Refuse agent URLs whose host is a non-global IP literal (set outside --dev).
    routable_urls_only: bool = False

    def admit(self, msg: Register, nonce: bytes, *, now: float,
              known: Identity | None = None) -> Admission:
        """Decide on *msg*, answering the challenge *nonce*, at unix time *now*.

        *known* is the identity this VM name had before (drift check). CPU-heavy:
        call from a worker thread.
        """
        if not VM_NAME.match(msg.vm_name):
            return Admission(None, Refusal("BAD_VM_NAME", (VM_NAME_RULE,)))
        url = None
        if msg.url is not None:
            try:
                url = agent_url(msg.url, routable_only=self.routable_urls_only)
            except ValueError as exc:
                return Admission(None, Refusal("BAD_URL", (str(exc),)))
        size = self.vocabulary.size(msg.node_size)
        if size is None:
            known_sizes = ", ".join(sorted(self.vocabulary.sizes))
            return Admission(None, Refusal("UNKNOWN_NODE_SIZE", (
                f"node size {msg.node_size!r} is not one of: {known_sizes}",)))
        try:
            datacenter = self.vocabulary.normalise_label(msg.datacenter)
            snap_dc = self.vocabulary.normalise_label(msg.snapshot.node.datacenter)
        except LabelError as exc:
            return Admission(None, Refusal("BAD_DATACENTER", (str(exc),)))
        if msg.snapshot.node.node_size != msg.node_size or snap_dc != datacenter:
            return Admission(None, Refusal("NODE_MISMATCH", (
                "snapshot.node disagrees with the registration's node_size/datacenter",)))
        if size.gpu != msg.snapshot.node.gpu:
            return Admission(None, Refusal("NODE_MISMATCH", (
                f"node size {size.name} has gpu={size.gpu} but the node reports "
                f"gpu={msg.snapshot.node.gpu}",)))
        if msg.attestation.provider == "tpm":
            return self._admit_tpm(msg, nonce, now=now, known=known, datacenter=datacenter,
                                   gpu=size.gpu, url=url)
        expected = registration_report_data(nonce, msg.public_key)
        try:
            result = self.verifier.verify(msg.attestation.quote, now=now,
                                          collateral=self.collateral)
        except QuoteFormatError as exc:
            return Admission(None, Refusal("BAD_QUOTE", (str(exc),)))
        report = result.quote.report
        mrtd = report.mr_td.hex()
        if report.report_data != expected:
            return Admission(None, Refusal("REPORTDATA_MISMATCH", (
                "the quote's REPORTDATA does not bind this challenge's nonce and the "
                "registration's public key",)), mrtd=mrtd, tcb_status=result.tcb_status,
                report_data=report.report_data)
        try:
            logs = log_mismatches(msg.attestation, report,
                                  require=self.policy.require_event_log)
        except (EventLogFormatError, RuntimeLogError) as exc:
            return Admission(None, _bad_log(exc), mrtd=mrtd, tcb_status=result.tcb_status)
        verdict = evaluate(self.policy, result, now=now, node_size=msg.node_size,
                           expected_report_data=expected, event_log=logs)
        if not verdict.admitted:
            return Admission(None, Refusal("ATTESTATION_FAILED", verdict.reasons),
                             mrtd=mrtd, tcb_status=result.tcb_status)
        return self._finish(msg, verdict, now=now, known=known, datacenter=datacenter,
                            gpu=size.gpu, url=url, mrtd=mrtd)

    def _admit_tpm(self, msg: Register, nonce: bytes, *, now: float, known: Identity | None,
                   datacenter: str, gpu: bool, url: str | None) -> Admission:
        """vTPM evidence: verified here, the AK bound to the EK by the agent plane's
        credential round trip (`Admission.credential`)."""
        if self.tpm is None:
            return Admission(None, Refusal("ATTESTATION_FAILED", (
                "provider: this CP trusts no EK certificate authority (tpm not accepted)",)))
        try:
            expected = qualifying_data(nonce, msg.public_key)
            result = self.tpm.verify(msg.attestation.quote, expected_qualifying_data=expected,
                                     now=now)
        except QuoteFormatError as exc:
            return Admission(None, Refusal("BAD_QUOTE", (str(exc),)))
        mrtd = result.measurement
        if not result.qualifying_ok:
            return Admission(None, Refusal("REPORTDATA_MISMATCH", (
                "the TPM quote's qualifying data does not bind this challenge's nonce and "
                "the registration's public key",)), mrtd=mrtd,
                report_data=result.attest.extra_data if result.attest else None)
        verdict = evaluate_tpm(self.policy, msg.node_size, result.pcrs,
                               verification_reasons=result.reasons)
        if not verdict.admitted or not result.ok:
            return Admission(None, Refusal("ATTESTATION_FAILED",
                                           verdict.reasons or result.reasons), mrtd=mrtd)
        admission = self._finish(msg, verdict, now=now, known=known, datacenter=datacenter,
                                 gpu=gpu, url=url, mrtd=mrtd)
        if admission.identity is None:
            return admission
        assert result.ak_name is not None
        return attrs.evolve(admission, credential=self.tpm.credential(result),
                            identity=attrs.evolve(admission.identity,
                                                  ak_name=result.ak_name.hex()))

    def _finish(self, msg: Register, verdict: Verdict, *, now: float, known: Identity | None,
                datacenter: str, gpu: bool, url: str | None, mrtd: str) -> Admission:
        """Drift and key binding checks, then the identity (any provider)."""
        if known is not None:
            drift = []
            if known.mrtd != mrtd:
                drift.append(f"MRTD changed from {known.mrtd} to {mrtd}")
            if known.node_size != msg.node_size:
                drift.append(f"node size changed from {known.node_size} to {msg.node_size}")
            if known.datacenter != datacenter:
                drift.append(f"datacenter changed from {known.datacenter} to {datacenter}")
            if drift:
                return Admission(None, Refusal("DRIFT", tuple(drift)), mrtd=mrtd,
                                 tcb_status=verdict.tcb_status)
        # Same name, another key: another VM claiming this one's identity (agents keep
        # their key across restarts).
        if self.bindings is not None:
            refusal = check_binding(self.bindings.get(msg.vm_name), msg.vm_name,
                                    msg.public_key)
        elif known is not None and known.public_key != msg.public_key:
            refusal = Refusal("KEY_CHANGED", (
                f"VM {msg.vm_name!r} registered before with another session key",))
        else:
            refusal = None
        if refusal is not None:
            return Admission(None, refusal, mrtd=mrtd, tcb_status=verdict.tcb_status)
        identity = Identity(
            agent_id=agent_id_for(self.cluster_id, msg.vm_name),
            vm_name=msg.vm_name,
            node_size=msg.node_size,
            datacenter=datacenter,
            gpu=gpu,
            public_key=msg.public_key,
            provider=msg.attestation.provider,
            mrtd=mrtd,
            tcb_status=verdict.tcb_status,
            verdict="warn" if verdict.violations else "pass",
            violations=verdict.reasons,
            verified_at=now,
            url=url,
        )
        return Admission(identity, None, mrtd=mrtd, tcb_status=verdict.tcb_status)

    def reattest(self, quote: bytes, nonce: bytes, identity: Identity, *,
                 now: float) -> Refusal | None:
        """Check a periodic re-attestation quote sent without event logs; None when it
        passes (`reattest_answer` checks the logs of an ``attestation`` answer too)."""
        return self._reattest(quote, None, nonce, identity, now=now)

    def reattest_answer(self, answer: Attestation, nonce: bytes, identity: Identity, *,
                        now: float) -> Refusal | None:
        """Check an ``attestation`` answer to a re-attestation (its quote and event
        logs); None when it passes. CPU-heavy: call from a worker thread."""
        return self._reattest(answer.quote, answer, nonce, identity, now=now)

    def _reattest(self, quote: bytes, answer: Attestation | None, nonce: bytes,
                  identity: Identity, *, now: float) -> Refusal | None:
        if identity.provider == "tpm":
            return self._reattest_tpm(quote, nonce, identity, now=now)
        try:
            result = self.verifier.verify(quote, now=now, collateral=self.collateral)
        except QuoteFormatError as exc:
            return Refusal("BAD_QUOTE", (str(exc),))
        try:
            logs = None if answer is None else log_mismatches(
                answer, result.quote.report, require=self.policy.require_event_log)
        except (EventLogFormatError, RuntimeLogError) as exc:
            return _bad_log(exc)
        expected = registration_report_data(nonce, identity.public_key)
        verdict = evaluate(self.policy, result, now=now, node_size=identity.node_size,
                           expected_report_data=expected, event_log=logs)
        if not verdict.admitted:
            return Refusal("ATTESTATION_FAILED", verdict.reasons)
        if result.quote.report.mr_td.hex() != identity.mrtd:
            return Refusal("DRIFT", ("MRTD changed since registration",))
        return None

    def _reattest_tpm(self, quote: bytes, nonce: bytes, identity: Identity, *,
                      now: float) -> Refusal | None:
        """vTPM re-attestation: the same verification, and the AK activated at
        registration (no new credential round trip)."""
        if self.tpm is None:
            return Refusal("ATTESTATION_FAILED", ("this CP no longer trusts any EK CA",))
        try:
            result = self.tpm.verify(
                quote, expected_qualifying_data=qualifying_data(nonce, identity.public_key),
                now=now)
        except QuoteFormatError as exc:
            return Refusal("BAD_QUOTE", (str(exc),))
        verdict = evaluate_tpm(self.policy, identity.node_size, result.pcrs,
                               verification_reasons=result.reasons,
                               report_data_ok=result.qualifying_ok)
        if not verdict.admitted or not result.ok:
            return Refusal("ATTESTATION_FAILED", verdict.reasons or result.reasons)
        if result.ak_name is None or result.ak_name.hex() != identity.ak_name:
            return Refusal("ATTESTATION_FAILED", (
                "the quote is signed by another AK than the one activated at registration",))
        if result.measurement != identity.mrtd:
            return Refusal("DRIFT", ("PCR4/PCR9 changed since registration",))
        return None
