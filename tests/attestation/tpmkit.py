"""Test kit for the `tpm` provider: real swtpm TPMs with EK certificates from a local CA,
synthetic TCG2 event logs, and software-made TPM structures (forgeries for the verifier).

`LocalCa(dir)` is a swtpm-localca (root CA + issuer); `manufacture(ca, state)` runs
``swtpm_setup --tpm2 --create-ek-cert`` against it; `running(state)` serves the TPM on a
unix socket (``swtpm socket``, a child process killed and reaped on exit, so nothing
outlives the test). `tpm2(tcti, ...)` runs one tpm2-tools command.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID

from ee.attestation import eventlog as E
from ee.attestation import tpm as T


@attrs.frozen
class LocalCa:
    dir: Path

    @property
    def setup_conf(self) -> Path:
        return self.dir / "swtpm_setup.conf"

    @property
    def root_pem(self) -> bytes:
        return (self.dir / "swtpm-localca-rootca-cert.pem").read_bytes()

    @property
    def issuer_pem(self) -> bytes:
        return (self.dir / "issuercert.pem").read_bytes()

    @property
    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_pem)

    @property
    def issuer_der(self) -> bytes:
        return T.certificate_der(x509.load_pem_x509_certificate(self.issuer_pem))


def local_ca(directory: Path) -> LocalCa:
    """Config files for a swtpm-localca in *directory* (keys are made at first use)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "localca.conf").write_text(
        f"statedir = {directory}\nsigningkey = {directory}/signkey.pem\n"
        f"issuercert = {directory}/issuercert.pem\ncertserial = {directory}/certserial\n")
    (directory / "localca.options").write_text(
        "--platform-manufacturer EE\n--platform-version 2.1\n--platform-model test\n")
    (directory / "swtpm_setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {directory}/localca.conf\n"
        f"create_certs_tool_options = {directory}/localca.options\n"
        "active_pcr_banks = sha256\n")
    return LocalCa(directory)


def direct_ca(directory: Path) -> LocalCa:
    """A swtpm-localca whose signing key is a self-signed root CA made here, so the EK
    certificates it issues chain to the root directly (no intermediate for the agent to
    send: what a VM that carries no ``tpm_ek_chain`` file needs). ``root_pem`` is that
    root, the one to pin as an EK root. ECDSA P-256 (bundles also accept RSA EK roots)."""
    ca = local_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EE test EK root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "signkey.pem").write_bytes(key.private_bytes(
        Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption()))
    (directory / "signkey.pem").chmod(0o600)
    for f in ("issuercert.pem", "swtpm-localca-rootca-cert.pem"):
        (directory / f).write_bytes(cert.public_bytes(Encoding.PEM))
    return ca


def manufacture(ca: LocalCa, state: Path) -> None:
    """A TPM 2.0 state with RSA and ECC EKs and their certificates signed by *ca*."""
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
         "--config", str(ca.setup_conf), "--logfile", str(state.parent / "setup.log"),
         "--overwrite"],
        check=True, capture_output=True, timeout=120)


@attrs.frozen
class SwTpm:
    state: Path
    socket: Path
    proc: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket}"


@contextmanager
def running(state: Path) -> Iterator[SwTpm]:
    """Serve the TPM in *state* on a unix socket until the block ends."""
    sock = state.parent / f"{state.name}.sock"
    for p in (sock, Path(f"{sock}.ctrl")):
        p.unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--ctrl", f"type=unixio,path={sock}.ctrl", "--server", f"type=unixio,path={sock}",
         "--flags", "startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (sock.exists() and Path(f"{sock}.ctrl").exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("swtpm did not start")
            time.sleep(0.02)
        tpm = SwTpm(state, sock, proc)
        yield tpm
        # An orderly TPM2_Shutdown: without one the next startup counts a dictionary
        # attack failure, and a few restarts lock DA-protected keys (the AK) out.
        subprocess.run(["tpm2_shutdown"], env={**os.environ, "TPM2TOOLS_TCTI": tpm.tcti},
                       capture_output=True, timeout=30, check=False)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tpm2(tcti: str, *args: str, cwd: Path | None = None) -> bytes:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    done = subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]}: {done.stderr.decode(errors='replace')[-400:]}")
    return done.stdout


# --- event logs --------------------------------------------------------------------------


def event_log(events: Sequence[tuple[int, bytes]], *, locality: int | None = None) -> bytes:
    """A TCG2 crypto-agile log (SHA-256 bank only) extending (PCR, digest) in order."""
    out = [E.encode_header([E.ALG_SHA256])]
    if locality is not None:
        out.append(E.encode_event(0, E.EV_NO_ACTION, {E.ALG_SHA256: bytes(32)},
                                  E.STARTUP_LOCALITY_SIGNATURE + bytes([locality])))
    out += [E.encode_event(pcr, E.EV_IPL, {E.ALG_SHA256: digest}, b"ee test event")
            for pcr, digest in events]
    return b"".join(out)


def replay(events: Sequence[tuple[int, bytes]]) -> dict[int, bytes]:
    pcrs: dict[int, bytes] = {}
    for pcr, digest in events:
        pcrs[pcr] = hashlib.sha256(pcrs.get(pcr, bytes(32)) + digest).digest()
    return pcrs


# --- software-made TPM structures (what an attacker can produce) ------------------------


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def soft_public(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *,
                attributes: int = T.AK_REQUIRED | 0x40, scheme: int | None = None,
                name_alg: int = T.ALG_SHA256) -> bytes:
    """A TPM2B_PUBLIC for *key*, claiming *attributes* (default: a restricted AK)."""
    head = struct.pack(">HHI", T.ALG_ECC if isinstance(key, ec.EllipticCurvePrivateKey)
                       else T.ALG_RSA, name_alg, attributes) + tpm2b(b"")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        nums = key.public_key().public_numbers()
        size = (key.curve.key_size + 7) // 8
        curve = 0x0003 if size == 32 else 0x0004
        body = (struct.pack(">HHHHH", T.ALG_NULL, scheme or T.ALG_ECDSA, T.ALG_SHA256, curve,
                            T.ALG_NULL)
                + tpm2b(nums.x.to_bytes(size, "big")) + tpm2b(nums.y.to_bytes(size, "big")))
    else:
        n = key.public_key().public_numbers().n
        body = (struct.pack(">HHHHI", T.ALG_NULL, scheme or T.ALG_RSASSA, T.ALG_SHA256,
                            key.key_size, 0) + tpm2b(n.to_bytes(key.key_size // 8, "big")))
    return tpm2b(head + body)


def attest_bytes(*, extra: bytes, pcrs: Sequence[int], digest: bytes,
                 magic: int = T.TPM_GENERATED_VALUE, type_: int = T.TPM_ST_ATTEST_QUOTE,
                 bank: int = T.ALG_SHA256, signer: bytes = b"\x00\x0b" + bytes(32),
                 select_size: int = 3) -> bytes:
    bitmap = bytearray(select_size)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    return (struct.pack(">IH", magic, type_) + tpm2b(signer) + tpm2b(extra)
            + struct.pack(">QIIBQ", 1234, 1, 0, 1, 0x2019102300163636)
            + struct.pack(">IHB", 1, bank, select_size) + bytes(bitmap) + tpm2b(digest))


def soft_sign(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, message: bytes, *,
              scheme: int | None = None) -> bytes:
    """A TPMT_SIGNATURE over *message* (SHA-256)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
        size = (key.curve.key_size + 7) // 8
        return (struct.pack(">HH", T.ALG_ECDSA, T.ALG_SHA256)
                + tpm2b(r.to_bytes(size, "big")) + tpm2b(s.to_bytes(size, "big")))
    if scheme == T.ALG_RSAPSS:
        pad: padding.AsymmetricPadding = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    else:
        pad = padding.PKCS1v15()
    sig = key.sign(message, pad, hashes.SHA256())
    return struct.pack(">HH", scheme or T.ALG_RSASSA, T.ALG_SHA256) + tpm2b(sig)
