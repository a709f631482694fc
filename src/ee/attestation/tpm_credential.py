"""TPM2_MakeCredential at the CP: prove an AK lives in the TPM an EK certificate names.

Theory of operation
-------------------
An attestation key (AK) is worth something only when it is known to be a restricted
signing key inside a genuine TPM. The EK certificate (checked against the configured
CA) names a genuine TPM's endorsement key; credential activation ties the AK to that
same TPM (TPM 2.0 Part 1 §24, "Credential Protection"):

1. the CP picks a random secret and *makes a credential* for the AK's name, encrypted
   to the EK public key taken from the EK certificate (never from the agent);
2. the agent's TPM runs TPM2_ActivateCredential with the EK and the AK loaded: the TPM
   releases the secret only if it can decrypt the seed (EK private key, which never
   leaves the TPM) *and* the name of the loaded AK equals the name the CP bound into
   the credential's integrity HMAC;
3. the CP compares the returned secret (constant time).

The construction, with ``nameAlg``/``sym`` from the EK's standard template:

* RSA EK: ``seed`` = 32 random bytes (digest size of nameAlg),
  ``encryptedSecret`` = RSA-OAEP(EK, seed, nameAlg, label ``"IDENTITY\\0"``);
* ECC EK: an ephemeral ECDH key pair on the EK's curve, ``Z`` = shared x,
  ``seed`` = KDFe(nameAlg, Z, "IDENTITY", ephemeral.x, EK.x, digest bits),
  ``encryptedSecret`` = TPMS_ECC_POINT(ephemeral);
* ``symKey`` = KDFa(nameAlg, seed, "STORAGE", AK name, "", sym key bits),
  ``encIdentity`` = AES-CFB(symKey, IV = 0, TPM2B_DIGEST(secret)),
  ``HMACkey`` = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits),
  ``outerHMAC`` = HMAC(nameAlg, HMACkey, encIdentity || AK name);
* ``credentialBlob`` = TPM2B_ID_OBJECT(TPM2B_DIGEST(outerHMAC) || encIdentity),
  ``secret`` = TPM2B_ENCRYPTED_SECRET(encryptedSecret).

KDFa is SP 800-108 counter-mode HMAC (`cryptography`'s KBKDFHMAC with a 4-byte
counter before ``label || 0x00 || context || L``); KDFe is SP 800-56A's concatenation
KDF (`ConcatKDFHash` with ``label\\0 || partyU || partyV`` as other info). Only the
standard EK templates are supported (TCG EK Credential Profile: RSA-2048 and NIST
P-256 with SHA-256/AES-128, NIST P-384 with SHA-384/AES-256); a TPM whose EK uses
another template cannot activate, which refuses it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import attrs
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

__all__ = [
    "CREDENTIAL_SECRET_BYTES",
    "Credential",
    "EkTemplate",
    "UnsupportedEk",
    "ek_template",
    "kdfa",
    "kdfe",
    "make_credential",
]

CREDENTIAL_SECRET_BYTES = 32
EkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class UnsupportedEk(ValueError):
    """The EK certificate's key fits no standard EK template."""


@attrs.frozen
class EkTemplate:
    """What MakeCredential needs from the EK's template: its name and symmetric algs."""

    name_hash: str  # "sha256" | "sha384"
    aes_bits: int  # 128 | 256

    @property
    def digest_size(self) -> int:
        return hashlib.new(self.name_hash).digest_size

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return hashes.SHA256() if self.name_hash == "sha256" else hashes.SHA384()


def ek_template(key: object) -> EkTemplate:
    """The standard template an EK with public key *key* was created from."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size == 2048:
            return EkTemplate("sha256", 128)
        raise UnsupportedEk(f"RSA EK of {key.key_size} bits (only RSA-2048 is supported)")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return EkTemplate("sha256", 128)
        if isinstance(key.curve, ec.SECP384R1):
            return EkTemplate("sha384", 256)
        raise UnsupportedEk(f"ECC EK on curve {key.curve.name} (only P-256 and P-384)")
    raise UnsupportedEk(f"EK key of type {type(key).__name__} is neither RSA nor ECC")


def kdfa(hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes,
         bits: int) -> bytes:
    """TPM KDFa (Part 1 §11.4.10.2): SP 800-108 counter mode with HMAC-*hash_name*."""
    algorithm = hashes.SHA256() if hash_name == "sha256" else hashes.SHA384()
    return KBKDFHMAC(
        algorithm=algorithm, mode=Mode.CounterMode, length=(bits + 7) // 8, rlen=4, llen=4,
        location=CounterLocation.BeforeFixed, label=label, context=context_u + context_v,
        fixed=None,
    ).derive(key)


def kdfe(hash_name: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes,
         bits: int) -> bytes:
    """TPM KDFe (Part 1 §11.4.10.3): SP 800-56A concatenation KDF."""
    algorithm = hashes.SHA256() if hash_name == "sha256" else hashes.SHA384()
    return ConcatKDFHash(
        algorithm=algorithm, length=(bits + 7) // 8, otherinfo=label + b"\x00" + party_u + party_v
    ).derive(z)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@attrs.frozen
class Credential:
    """What the CP sends (``credential_blob``, ``encrypted_secret``, TPM wire form) and
    what it expects back (``secret``, never sent)."""

    credential_blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET
    secret: bytes = attrs.field(repr=False)

    def matches(self, answer: bytes) -> bool:
        """Is *answer* the secret (constant-time compare)?"""
        return hmac.compare_digest(self.secret, answer)


def _seed(key: EkPublicKey, tpl: EkTemplate) -> tuple[bytes, bytes]:
    """(seed, encryptedSecret contents) for an EK."""
    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(tpl.digest_size)
        algorithm = tpl.hash_algorithm()
        oaep = padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm,
                            label=b"IDENTITY\x00")
        return seed, key.encrypt(seed, oaep)
    ephemeral = ec.generate_private_key(key.curve)
    z = ephemeral.exchange(ec.ECDH(), key)
    size = (key.curve.key_size + 7) // 8
    ours = ephemeral.public_key().public_numbers()
    theirs = key.public_numbers()
    ux, uy = ours.x.to_bytes(size, "big"), ours.y.to_bytes(size, "big")
    seed = kdfe(tpl.name_hash, z, b"IDENTITY", ux, theirs.x.to_bytes(size, "big"),
                tpl.digest_size * 8)
    return seed, _tpm2b(ux) + _tpm2b(uy)


def make_credential(ek_public_key: object, ak_name: bytes,
                    secret: bytes | None = None) -> Credential:
    """TPM2_MakeCredential for *ak_name*, encrypted to *ek_public_key* (from the EK
    certificate). *secret* defaults to 32 random bytes. Raises `UnsupportedEk`."""
    tpl = ek_template(ek_public_key)
    assert isinstance(ek_public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    if secret is None:
        secret = os.urandom(CREDENTIAL_SECRET_BYTES)
    if not 0 < len(secret) <= tpl.digest_size:
        raise ValueError(f"credential secret must be 1..{tpl.digest_size} bytes")
    seed, encrypted = _seed(ek_public_key, tpl)
    sym_key = kdfa(tpl.name_hash, seed, b"STORAGE", ak_name, b"", tpl.aes_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_tpm2b(secret)) + encryptor.finalize()
    hmac_key = kdfa(tpl.name_hash, seed, b"INTEGRITY", b"", b"", tpl.digest_size * 8)
    outer = hmac.new(hmac_key, enc_identity + ak_name, tpl.name_hash).digest()
    return Credential(
        credential_blob=_tpm2b(_tpm2b(outer) + enc_identity),
        encrypted_secret=_tpm2b(encrypted),
        secret=secret,
    )
