"""CP-side verification of vTPM evidence against real swtpm TPMs.

Three TPMs: A and B manufactured by CA1, C by CA2. A's PCR4/PCR9 are extended with a
"kernel" and an "initrd" event and its event log says so. Every check of
`TpmVerifier.verify` and of credential activation has a test here that fails when the
check is removed.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from ee.attestation import QuoteFormatError, policy
from ee.attestation import tpm as T
from ee.attestation.errors import ProviderError
from ee.attestation.providers.tpm import TpmProvider
from ee.attestation.tpm_credential import make_credential
from ee.protocol.reportdata import registration_report_data

from . import tpmkit as K

NONCE = bytes(range(32))
KEY = b"\x07" * 32
QD = T.qualifying_data(NONCE, KEY)
KERNEL = hashlib.sha256(b"vmlinuz").digest()
INITRD = hashlib.sha256(b"initrd").digest()
NOW = 4102444800.0  # 2100-01-01: inside the EK certificates' windows (they end in 9999)


@attrs.frozen
class World:
    ca1: K.LocalCa
    ca2: K.LocalCa
    a: TpmProvider
    b: TpmProvider
    c: TpmProvider
    tcti_a: str
    dir: Path
    events: tuple[tuple[int, bytes], ...]

    def verifier(self, *cas: K.LocalCa) -> T.TpmVerifier:
        return T.TpmVerifier([ca.root for ca in (cas or (self.ca1,))])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("tpm")
    ca1, ca2 = K.local_ca(d / "ca1"), K.local_ca(d / "ca2")
    for ca, name in ((ca1, "a"), (ca1, "b"), (ca2, "c")):
        K.manufacture(ca, d / name)
    events = ((4, KERNEL), (9, INITRD))
    (d / "log").write_bytes(K.event_log(events))
    procs = []
    with ExitStack() as stack:
        tpms = {n: stack.enter_context(K.running(d / n)) for n in "abc"}
        procs = [t.proc for t in tpms.values()]
        for pcr, digest in events:
            K.tpm2(tpms["a"].tcti, "tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}")
        empty = d / "empty.log"
        empty.write_bytes(b"")

        def provider(n: str, ca: K.LocalCa) -> TpmProvider:
            return TpmProvider(tpms[n].tcti, d / f"agent-{n}", ek_chain=(ca.issuer_der,),
                               event_log=d / "log" if n == "a" else empty)

        yield World(ca1, ca2, provider("a", ca1), provider("b", ca1), provider("c", ca2),
                    tpms["a"].tcti, d, events)
    assert all(p.poll() is not None for p in procs), "an swtpm outlived the tests"


@pytest.fixture(scope="module")
def good(world: World) -> T.TpmEvidence:
    return world.a.evidence(QD)


def verify(world: World, ev: T.TpmEvidence | bytes, *, qd: bytes = QD,
           now: float = NOW, cas: tuple[K.LocalCa, ...] = ()) -> T.TpmResult:
    return world.verifier(*cas).verify(ev, expected_qualifying_data=qd, now=now)


def with_attest(ev: T.TpmEvidence, attest: bytes) -> T.TpmEvidence:
    return attrs.evolve(ev, attest=attest)


# --- the good path -------------------------------------------------------------------------


def test_good_quote_verifies_and_the_ak_activates(world: World, good: T.TpmEvidence) -> None:
    result = verify(world, good.encode())
    assert result.ok, result.reasons
    expected = K.replay(world.events)
    assert result.pcrs[4] == expected[4] and result.pcrs[9] == expected[9]
    assert result.pcrs[0] == bytes(32) and sorted(result.pcrs) == list(range(10))
    assert result.event_count == 2
    assert result.ak_name == T.parse_public(world.a.ak_public()).name
    assert result.ek_fingerprint == hashlib.sha256(good.ek_cert).hexdigest()
    assert result.qualifying_ok
    assert result.measurement == "tpm:" + hashlib.sha256(expected[4] + expected[9]).hexdigest()
    credential = world.verifier().credential(result)
    answer = world.a.activate(credential.credential_blob, credential.encrypted_secret)
    assert credential.matches(answer)
    assert not credential.matches(bytes(len(answer)))


def test_qualifying_data_binds_the_registration_report_data() -> None:
    assert hashlib.sha256(registration_report_data(NONCE, KEY)).digest() == QD
    assert len(QD) == 32


def test_policy_applies_to_the_quoted_pcr4_and_pcr9(world: World, good: T.TpmEvidence) -> None:
    evaluate_tpm = policy.evaluate_tpm
    result = verify(world, good)
    pcr4, pcr9 = result.pcrs[4].hex(), result.pcrs[9].hex()
    allow = policy.Policy.from_json({"providers": ["tpm"], "pcr4": [pcr4], "pcr9": [pcr9]})
    assert evaluate_tpm(allow, None, result.pcrs, verification_reasons=result.reasons).admitted
    other = policy.Policy.from_json({"providers": ["tpm"], "pcr4": ["00" * 32]})
    assert not evaluate_tpm(other, None, result.pcrs).admitted
    tdx_only = policy.Policy.from_json({"providers": ["tdx"], "pcr4": [pcr4]})
    assert not evaluate_tpm(tdx_only, None, result.pcrs).admitted


# --- binding to the handshake ------------------------------------------------------------------


@pytest.mark.parametrize("nonce,key", [(b"\x01" * 32, KEY), (NONCE, b"\x08" * 32)],
                         ids=["wrong-nonce", "wrong-session-key"])
def test_quote_for_another_nonce_or_key_is_refused(world: World, good: T.TpmEvidence,
                                                   nonce: bytes, key: bytes) -> None:
    result = verify(world, good, qd=T.qualifying_data(nonce, key))
    assert [r.split(":")[0] for r in result.reasons] == ["QUALIFYING_DATA_MISMATCH"]
    assert not result.qualifying_ok
    with pytest.raises(ValueError):  # refused evidence gets no credential challenge
        world.verifier().credential(result)


# --- PCRs and the event log ---------------------------------------------------------------------


def test_tampered_pcr_value_with_a_matching_log_is_refused(world: World,
                                                           good: T.TpmEvidence) -> None:
    # The attacker claims another kernel and sends a log that replays to its claim.
    other = ((4, hashlib.sha256(b"evil vmlinuz").digest()), (9, INITRD))
    values = list(good.pcr_values)
    values[4] = K.replay(other)[4]
    forged = attrs.evolve(good, pcr_values=tuple(values), event_log=K.event_log(other))
    assert verify(world, forged).reasons == ("PCR values do not match the quote's PCR digest",)


def test_event_log_that_does_not_replay_to_the_quote_is_refused(world: World,
                                                                good: T.TpmEvidence) -> None:
    forged = attrs.evolve(good, event_log=K.event_log(((4, hashlib.sha256(b"x").digest()),
                                                       (9, INITRD))))
    assert verify(world, forged).reasons == (
        "event log replay does not give the quoted value of PCR 4",)
    silent = attrs.evolve(good, event_log=b"")  # measured PCRs without their events
    assert verify(world, silent).reasons == (
        "event log replay does not give the quoted value of PCR 4, 9",)


def test_startup_locality_sets_pcr0_initial_value() -> None:
    log = K.event_log(((0, KERNEL),), locality=3)
    assert T.replay_event_log(log)[0] == hashlib.sha256(bytes(31) + b"\x03" + KERNEL).digest()


# --- signature and AK ------------------------------------------------------------------------


def test_tampered_signature_is_refused(world: World, good: T.TpmEvidence) -> None:
    sig = bytearray(good.signature)
    sig[8] ^= 1  # inside r
    result = verify(world, attrs.evolve(good, signature=bytes(sig)))
    assert result.reasons == ("quote signature does not verify with the AK",)


def test_tampered_attest_is_refused(world: World, good: T.TpmEvidence) -> None:
    attest = bytearray(good.attest)
    attest[-1] ^= 1  # last byte of pcrDigest
    result = verify(world, with_attest(good, bytes(attest)))
    assert "quote signature does not verify with the AK" in result.reasons


def soft_evidence(good: T.TpmEvidence, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                  *, attributes: int = T.AK_REQUIRED, scheme: int | None = None,
                  name_alg: int = T.ALG_SHA256, **attest_kw: object) -> T.TpmEvidence:
    """Evidence signed by a software key posing as an AK, quoting A's real PCR values
    (or whatever *attest_kw* says), with A's EK certificate."""
    fields: dict[str, object] = {"extra": QD, "pcrs": range(10),
                                 "digest": hashlib.sha256(b"".join(good.pcr_values)).digest()}
    fields.update(attest_kw)
    attest = K.attest_bytes(**fields)  # type: ignore[arg-type]
    public = K.soft_public(key, attributes=attributes, scheme=scheme, name_alg=name_alg)
    return attrs.evolve(good, ak_public=public, attest=attest,
                        signature=K.soft_sign(key, attest, scheme=scheme))


@pytest.mark.parametrize("key,scheme", [
    (ec.generate_private_key(ec.SECP256R1()), None),
    (ec.generate_private_key(ec.SECP384R1()), None),
    (rsa.generate_private_key(65537, 2048), T.ALG_RSASSA),
    (rsa.generate_private_key(65537, 2048), T.ALG_RSAPSS),
], ids=["p256", "p384", "rsassa", "rsapss"])
def test_software_ak_claiming_restricted_verifies_but_never_activates(
        world: World, good: T.TpmEvidence, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        scheme: int | None) -> None:
    # Everything a forger controls checks out; only credential activation stops it:
    # no TPM holds this key, so no TPM can release the secret for its name.
    forged = soft_evidence(good, key, scheme=scheme)
    result = verify(world, forged)
    assert result.ok, result.reasons
    credential = world.verifier().credential(result)
    with pytest.raises(ProviderError):
        world.a.activate(credential.credential_blob, credential.encrypted_secret)


def test_unrestricted_ak_is_refused(world: World, good: T.TpmEvidence) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    for attributes in (T.AK_REQUIRED & ~T.RESTRICTED, T.AK_REQUIRED & ~T.FIXED_TPM,
                       T.AK_REQUIRED | T.DECRYPT):
        result = verify(world, soft_evidence(good, key, attributes=attributes))
        assert len(result.reasons) == 1 and result.reasons[0].startswith("AK attributes")


def test_attest_not_made_by_a_tpm_is_refused(world: World, good: T.TpmEvidence) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    result = verify(world, soft_evidence(good, key, magic=0xFF544348))
    assert result.reasons == ("attest magic is not TPM_GENERATED_VALUE",)


def test_other_pcr_bank_or_bad_selection_is_refused(world: World, good: T.TpmEvidence) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert verify(world, soft_evidence(good, key, bank=T.ALG_SHA1)).reasons == (
        "the quote selects a PCR bank other than SHA-256",)
    assert verify(world, soft_evidence(good, key, pcrs=range(9))).reasons == (
        "10 PCR values for 9 quoted PCRs",)


def test_pcr_outside_the_bank_is_refused(world: World, good: T.TpmEvidence) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    forged = soft_evidence(good, key, pcrs=[*range(9), 25], select_size=4)
    assert verify(world, forged).reasons == ("the quote's PCR selection is invalid",)


def test_ak_name_algorithm_must_be_sha256(world: World, good: T.TpmEvidence) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert verify(world, soft_evidence(good, key, name_alg=T.ALG_SHA1)).reasons == (
        "AK name algorithm is not SHA-256",)


def test_signature_hash_must_be_sha256(world: World, good: T.TpmEvidence) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    forged = soft_evidence(good, key)
    sig = forged.signature[:2] + struct.pack(">H", T.ALG_SHA384) + forged.signature[4:]
    assert verify(world, attrs.evolve(forged, signature=sig)).reasons == (
        "quote signature hash 0x000c is not SHA-256",)


def test_signature_scheme_must_match_the_ak(world: World, good: T.TpmEvidence) -> None:
    key = rsa.generate_private_key(65537, 2048)
    forged = soft_evidence(good, key, scheme=T.ALG_RSASSA)
    pss = K.soft_sign(key, forged.attest, scheme=T.ALG_RSAPSS)
    assert verify(world, attrs.evolve(forged, signature=pss)).reasons == (
        "quote signature scheme differs from the AK's scheme",)


# --- EK certificate and AK binding ----------------------------------------------------------------


def test_ek_cert_from_an_untrusted_ca_is_refused(world: World) -> None:
    evidence = world.c.evidence(QD)  # TPM C, manufactured by CA2
    refused = verify(world, evidence)  # both local CAs use the same names: the link fails
    assert refused.reasons == (
        "EK certificate: swtpm-localca is not signed by swtpm-localca-rootca",)
    assert verify(world, evidence, cas=(world.ca2,)).ok


def test_ek_chain_must_link_to_the_root(world: World, good: T.TpmEvidence) -> None:
    # CA2's issuer certificate in place of CA1's: its subject names the same issuer DN
    # (swtpm-localca), but it did not sign A's EK certificate.
    swapped = attrs.evolve(good, ek_chain=(world.ca2.issuer_der,))
    result = verify(world, swapped, cas=(world.ca1,))
    assert result.reasons and all(r.startswith("EK certificate") for r in result.reasons)
    missing = attrs.evolve(good, ek_chain=())
    assert "no trusted root issued" in verify(world, missing).reasons[0]


def test_ek_cert_outside_its_validity_is_refused(world: World, good: T.TpmEvidence) -> None:
    reasons = verify(world, good, now=0.0).reasons
    assert reasons and all("not yet valid" in r for r in reasons)


def test_ek_cert_garbage_is_refused(world: World, good: T.TpmEvidence) -> None:
    flipped = good.ek_cert[:-1] + bytes([good.ek_cert[-1] ^ 1])
    result = verify(world, attrs.evolve(good, ek_cert=flipped))
    assert result.reasons and result.reasons[0].startswith("EK")


def test_ek_key_must_fit_a_standard_template(world: World, good: T.TpmEvidence) -> None:
    """A certificate the CA signed for a key no standard EK template makes (RSA-3072):
    refused before any credential is made for it."""
    ca_key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test EK CA")])
    start, end = datetime(2020, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(ca_key.public_key()).serial_number(1).not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    ek = (x509.CertificateBuilder().subject_name(x509.Name([]))
          .issuer_name(name).public_key(rsa.generate_private_key(65537, 3072).public_key())
          .serial_number(2).not_valid_before(start).not_valid_after(end)
          .sign(ca_key, hashes.SHA256()))
    evidence = attrs.evolve(good, ek_cert=ek.public_bytes(Encoding.DER), ek_chain=())
    result = T.TpmVerifier([root]).verify(evidence, expected_qualifying_data=QD, now=NOW)
    assert result.reasons == ("EK certificate: RSA EK of 3072 bits (only RSA-2048 is "
                              "supported)",)
    with pytest.raises(ValueError):
        T.TpmVerifier([root]).credential(result)


def test_ak_from_another_tpm_cannot_activate(world: World) -> None:
    # Attacker: owns TPM B, presents A's (public) EK certificate and B's AK and quote.
    b_evidence = world.b.evidence(QD)
    a_cert = world.a.ek_certificate()
    chimera = attrs.evolve(b_evidence, ek_cert=a_cert)
    result = verify(world, chimera)
    assert result.ok  # every signature checks out; the AK is just not in TPM A
    credential = world.verifier().credential(result)
    with pytest.raises(ProviderError):  # B cannot decrypt what was sealed to A's EK
        world.b.activate(credential.credential_blob, credential.encrypted_secret)
    with pytest.raises(ProviderError):  # A can decrypt, but its AK has another name
        world.a.activate(credential.credential_blob, credential.encrypted_secret)


# --- malformed bytes: refused with a reason, never another exception ----------------------


def test_truncated_evidence_at_every_length_is_a_format_error(world: World,
                                                              good: T.TpmEvidence) -> None:
    blob = good.encode()
    for n in range(len(blob)):
        with pytest.raises(T.TpmFormatError):
            verify(world, blob[:n])
    with pytest.raises(T.TpmFormatError):
        verify(world, blob + b"\x00")


@pytest.mark.parametrize("field", ["attest", "ak_public", "signature", "event_log"])
def test_truncated_parts_at_every_length(world: World, good: T.TpmEvidence, field: str) -> None:
    whole: bytes = getattr(good, field)
    for n in range(len(whole)):
        try:
            result = verify(world, attrs.evolve(good, **{field: whole[:n]}).encode())
        except QuoteFormatError:
            continue
        assert not result.ok, (field, n)


@pytest.mark.parametrize("field", ["attest", "ak_public", "signature"])
def test_every_byte_flip_is_refused(world: World, good: T.TpmEvidence, field: str) -> None:
    whole: bytes = getattr(good, field)
    activated: list[tuple[int, int]] = []
    for i in range(len(whole)):
        for mask in (0x01, 0x80):
            flipped = bytearray(whole)
            flipped[i] ^= mask
            try:
                result = verify(world, attrs.evolve(good, **{field: bytes(flipped)}).encode())
            except QuoteFormatError:
                continue
            if result.ok:
                # Bits that change only the AK's name (reserved or policy attributes):
                # the quote still checks, but no TPM holds a key with the new name.
                assert field == "ak_public", (field, i, mask)
                activated.append((i, mask))
                credential = world.verifier().credential(result)
                with pytest.raises(ProviderError):
                    world.a.activate(credential.credential_blob, credential.encrypted_secret)
    assert len(activated) < 16, activated


def test_attest_caps_and_type() -> None:
    base = K.attest_bytes(extra=QD, pcrs=range(10), digest=bytes(32))
    with pytest.raises(T.TpmFormatError, match="TPM_ST_ATTEST_QUOTE"):
        T.parse_attest(K.attest_bytes(extra=QD, pcrs=[4], digest=bytes(32), type_=0x8017))
    with pytest.raises(T.TpmFormatError, match="extraData"):
        T.parse_attest(base[:42] + b"\x00\x41" + base[44:])  # extraData size 65 > 64
    safe = 6 + 36 + 34 + 16  # magic, type, qualifiedSigner, extraData, clock..restart
    assert base[safe] == 1
    with pytest.raises(T.TpmFormatError, match="TPMI_YES_NO"):
        T.parse_attest(base[:safe] + b"\x02" + base[safe + 1:])
    with pytest.raises(T.TpmFormatError, match="trailing"):
        T.parse_attest(base + b"\x00")
    with pytest.raises(T.TpmFormatError, match="longer than"):
        T.parse_attest(bytes(T.MAX_ATTEST + 1))
    count = base.index(struct.pack(">IH", 1, T.ALG_SHA256))
    with pytest.raises(T.TpmFormatError, match="selections"):
        T.parse_attest(base[:count] + struct.pack(">I", 1000) + base[count + 4:])


def test_evidence_fields_out_of_order_or_repeated_are_refused(good: T.TpmEvidence) -> None:
    blob = good.encode()
    with pytest.raises(T.TpmFormatError, match="magic"):
        T.TpmEvidence.decode(b"EETPM\x00\x02\x00" + blob[8:])
    body = blob[8:]
    first = 5 + struct.unpack(">I", body[1:5])[0]
    with pytest.raises(T.TpmFormatError, match="repeated field"):  # ek_cert twice
        T.TpmEvidence.decode(blob[:8] + body[:first] + body)

    def field(tag: int, value: bytes) -> bytes:
        return struct.pack(">BI", tag, len(value)) + value

    swapped = blob[:8] + field(1, good.ek_cert) + field(4, good.attest) + field(3, good.ak_public)
    with pytest.raises(T.TpmFormatError, match="unexpected field tag 3"):
        T.TpmEvidence.decode(swapped)
    with pytest.raises(T.TpmFormatError, match="missing"):
        T.TpmEvidence.decode(blob[:8] + body[:first])


def test_unforeseen_failure_is_a_refusal(world: World, good: T.TpmEvidence,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(T, "_verify_signature", boom)
    result = verify(world, good)
    assert result.reasons == ("VERIFY_ERROR: KeyError: 'surprise'",)


# --- MakeCredential against tpm2-tools ----------------------------------------------------------


def test_make_credential_matches_tpm2_tools(world: World, good: T.TpmEvidence) -> None:
    """Same wire layout as `tpm2_makecredential --tcti none`; both activate in TPM A,
    with the RSA EK (standard template) and swtpm's ECC P-384 EK."""
    d = world.dir / "mkcred"
    d.mkdir(exist_ok=True)
    ak = T.parse_public(good.ak_public)
    secret = b"S" * 32
    K.tpm2(world.tcti_a, "tpm2_readpublic", "-c", "0x81010001", "-o", str(d / "ek.pub"))
    subprocess.run(["tpm2_makecredential", "--tcti", "none", "-u", str(d / "ek.pub"),
                    "-s", "-", "-n", ak.name.hex(), "-o", str(d / "theirs")],
                   input=secret, check=True, capture_output=True, timeout=30)
    theirs = (d / "theirs").read_bytes()
    ek_cert = x509.load_der_x509_certificate(good.ek_cert)
    ours = make_credential(ek_cert.public_key(), ak.name, secret)
    magic = struct.pack(">II", 0xBADCC0DE, 1)
    assert theirs[:8] == magic
    assert len(theirs) == 8 + len(ours.credential_blob) + len(ours.encrypted_secret)
    assert theirs[8:12] == ours.credential_blob[:4]  # sizes of ID object and outer HMAC
    blob_end = 8 + len(ours.credential_blob)
    assert theirs[blob_end:blob_end + 2] == ours.encrypted_secret[:2]
    assert world.a.activate(theirs[8:blob_end], theirs[blob_end:]) == secret
    assert world.a.activate(ours.credential_blob, ours.encrypted_secret) == secret

    ecc_cert = x509.load_der_x509_certificate(
        K.tpm2(world.tcti_a, "tpm2_nvread", "0x01c00016"))
    ecc = make_credential(ecc_cert.public_key(), ak.name, secret)
    (d / "ecc").write_bytes(magic + ecc.credential_blob + ecc.encrypted_secret)
    K.tpm2(world.tcti_a, "tpm2_activatecredential", "-c", str(world.a.workdir / "ak.ctx"),
           "-C", "0x81010016", "-i", str(d / "ecc"), "-o", str(d / "ecc.out"))
    K.tpm2(world.tcti_a, "tpm2_flushcontext", "-t")
    assert (d / "ecc.out").read_bytes() == secret
