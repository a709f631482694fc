"""`tpm`: vTPM evidence through tpm2-tools (non-TDX VMs; swtpm in tests).

The provider owns the TPM while the agent runs:

* **EK**: the persistent endorsement key at ``ek_handle`` (0x81010001, where
  ``swtpm_setup``/manufacturing put the RSA-2048 EK) -- or, when that handle is empty,
  the EK recreated from the standard template (`tpm2_createek`, deterministic from the
  endorsement seed, so it matches the certificate). Its certificate is read from NV
  index ``ek_cert_nv`` (0x01c00002 for RSA-2048) or from a configured file.
* **AK**: a fresh restricted ECDSA P-256 signing key under the EK, made at the first
  use by this process (`tpm2_createak`), its context in ``workdir``. Nothing about it
  needs to survive a restart: every registration proves the AK anew by credential
  activation, and re-attestation only needs the AK of the current session.
* **quote** (`evidence`): PCR values read before and after `tpm2_quote` (retried when a
  PCR moved in between), the quote over the SHA-256 bank of ``pcrs`` with the given
  qualifying data, and the firmware event log; packed as `TpmEvidence`.
* **activate**: TPM2_ActivateCredential with the EK (under a PolicySecret(endorsement)
  session, the EK's standard policy) and the AK; returns the CP's secret.

TCTI: ``device:/dev/tpm0`` in a VM, ``swtpm:path=...`` in tests. The in-kernel
resource manager (``/dev/tpmrm0``) flushes a policy session when the tool that made it
exits, so activation needs the raw device (the agent is the TPM's only user) or
tpm2-abrmd (``tabrmd``). Transient objects are flushed after every operation. Calls are
blocking and serialised by a lock: run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from ee.attestation.errors import ProviderError
from ee.attestation.tpm import MAX_EVENT_LOG, TpmEvidence, pcr_selection_arg

DEFAULT_EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
DEFAULT_PCRS: tuple[int, ...] = tuple(range(10))
RSA_EK_HANDLE = 0x81010001
RSA_EK_CERT_NV = 0x01C00002
ENDORSEMENT = "0x4000000B"
_CREDENTIAL_FILE_MAGIC = struct.pack(">II", 0xBADCC0DE, 1)  # tpm2-tools' credential file


class TpmProvider:
    """The `tpm` attestation provider (see the module docstring)."""

    name = "tpm"

    def __init__(
        self,
        tcti: str,
        workdir: str | os.PathLike[str],
        *,
        ek_handle: int = RSA_EK_HANDLE,
        ek_cert_nv: int | None = RSA_EK_CERT_NV,
        ek_cert_file: str | os.PathLike[str] | None = None,
        ek_chain: Sequence[bytes] = (),
        event_log: str | os.PathLike[str] | None = DEFAULT_EVENT_LOG,
        pcrs: Sequence[int] = DEFAULT_PCRS,
        timeout_s: float = 30.0,
        attempts: int = 3,
    ) -> None:
        if shutil.which("tpm2_quote") is None:
            raise ProviderError("tpm: tpm2-tools are not installed")
        self.tcti = tcti
        self.workdir = Path(workdir)
        self.ek_handle = ek_handle
        self.ek_cert_nv = ek_cert_nv
        self.ek_cert_file = Path(ek_cert_file) if ek_cert_file is not None else None
        self.ek_chain = tuple(ek_chain)
        self.event_log = Path(event_log) if event_log is not None else None
        self.pcrs = tuple(sorted(set(pcrs)))
        self.timeout_s = timeout_s
        self.attempts = attempts
        self._lock = threading.Lock()
        self._ek: str | None = None
        self._ek_cert: bytes | None = None
        self._ak_ready = False

    # -- tpm2-tools -------------------------------------------------------------------

    def _run(self, *args: str) -> bytes:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            done = subprocess.run(args, cwd=self.workdir, env=env, capture_output=True,
                                  timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise ProviderError(f"tpm: {args[0]} timed out after {self.timeout_s:g} s") from None
        except OSError as exc:
            raise ProviderError(f"tpm: cannot run {args[0]}: {exc}") from None
        if done.returncode != 0:
            lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
            # tpm2-tools ends with "Unable to run <tool>"; the line before names the cause.
            why = [ln for ln in lines if "Unable to run" not in ln][-1:] or lines[-1:]
            raise ProviderError(f"tpm: {args[0]} failed: "
                                f"{why[0][:200] if why else f'exit status {done.returncode}'}")
        return done.stdout

    def _flush(self) -> None:
        try:
            self._run("tpm2_flushcontext", "-t")
        except ProviderError:
            pass

    def _path(self, name: str) -> str:
        return str(self.workdir / name)

    # -- keys --------------------------------------------------------------------------

    def _ensure_keys(self) -> str:
        """Prepare EK and AK (once); the EK argument for tpm2-tools."""
        if self._ek is not None and self._ak_ready:
            return self._ek
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = f"0x{self.ek_handle:08x}"
        try:
            self._run("tpm2_readpublic", "-c", handle)
            ek = handle
        except ProviderError:
            self._run("tpm2_createek", "-G", "rsa", "-c", self._path("ek.ctx"))
            ek = self._path("ek.ctx")
        try:
            self._run("tpm2_createak", "-C", ek, "-c", self._path("ak.ctx"), "-G", "ecc",
                      "-g", "sha256", "-s", "ecdsa", "-u", self._path("ak.pub"),
                      "-n", self._path("ak.name"), "-f", "tss")
        finally:
            self._flush()
        self._ek, self._ak_ready = ek, True
        return ek

    def ek_certificate(self) -> bytes:
        """The EK certificate (DER), from the configured file or the TPM's NV index."""
        if self._ek_cert is None:
            if self.ek_cert_file is not None:
                try:
                    self._ek_cert = self.ek_cert_file.read_bytes()
                except OSError as exc:
                    raise ProviderError(f"tpm: cannot read the EK certificate: {exc}") from None
            elif self.ek_cert_nv is not None:
                self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._run("tpm2_nvread", f"0x{self.ek_cert_nv:08x}", "-o", self._path("ek.der"))
                self._ek_cert = (self.workdir / "ek.der").read_bytes()
            else:
                raise ProviderError("tpm: no EK certificate configured")
        return self._ek_cert

    def ak_public(self) -> bytes:
        """The AK's TPM2B_PUBLIC (created at the first call)."""
        with self._lock:
            self._ensure_keys()
            return (self.workdir / "ak.pub").read_bytes()

    # -- evidence ------------------------------------------------------------------------

    def _read_pcrs(self) -> bytes:
        out = self._path("pcrs.bin")
        self._run("tpm2_pcrread", pcr_selection_arg(self.pcrs), "-o", out)
        return Path(out).read_bytes()

    def _read_event_log(self) -> bytes:
        if self.event_log is None or not self.event_log.exists():
            return b""
        try:
            with open(self.event_log, "rb") as f:
                data = f.read(MAX_EVENT_LOG + 1)
        except OSError as exc:
            raise ProviderError(f"tpm: cannot read the event log: {exc}") from None
        if len(data) > MAX_EVENT_LOG:
            raise ProviderError(f"tpm: the event log exceeds {MAX_EVENT_LOG} bytes")
        return data

    def evidence(self, qualifying: bytes) -> TpmEvidence:
        """Quote the PCRs with *qualifying* data (1..32 bytes) and pack the evidence."""
        if not 0 < len(qualifying) <= 32:
            raise ValueError("qualifying data is 1..32 bytes")
        ek_cert = self.ek_certificate()
        with self._lock:
            self._ensure_keys()
            try:
                for _ in range(max(1, self.attempts)):
                    before = self._read_pcrs()
                    self._run("tpm2_quote", "-c", self._path("ak.ctx"), "-l",
                              pcr_selection_arg(self.pcrs), "-q", qualifying.hex(),
                              "-m", self._path("quote.msg"), "-s", self._path("quote.sig"),
                              "-g", "sha256")
                    log = self._read_event_log()
                    if self._read_pcrs() == before:
                        break
                else:
                    raise ProviderError("tpm: PCRs kept changing while quoting")
            finally:
                self._flush()
            return TpmEvidence(
                ek_cert=ek_cert,
                ek_chain=self.ek_chain,
                ak_public=(self.workdir / "ak.pub").read_bytes(),
                attest=(self.workdir / "quote.msg").read_bytes(),
                signature=(self.workdir / "quote.sig").read_bytes(),
                pcr_values=tuple(before[i : i + 32] for i in range(0, len(before), 32)),
                event_log=log,
            )

    def get_quote(self, report_data: bytes) -> bytes:
        """The `QuoteProvider` face: evidence whose qualifying data is SHA-256 of the
        64-byte *report_data* (`ee.attestation.tpm.qualifying_data`), encoded."""
        if len(report_data) != 64:
            raise ValueError("REPORTDATA is exactly 64 bytes")
        return self.evidence(hashlib.sha256(report_data).digest()).encode()

    # -- credential activation ------------------------------------------------------------

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential: the secret the CP sealed to our EK for our AK's name.
        Raises `ProviderError` when the TPM refuses (another TPM's EK or AK)."""
        with self._lock:
            ek = self._ensure_keys()
            with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
                blob = Path(tmp) / "credential"
                blob.write_bytes(_CREDENTIAL_FILE_MAGIC + credential_blob + encrypted_secret)
                session = str(Path(tmp) / "session.ctx")
                out = Path(tmp) / "secret"
                self._run("tpm2_startauthsession", "--policy-session", "-S", session)
                try:
                    self._run("tpm2_policysecret", "-S", session, "-c", ENDORSEMENT)
                    self._run("tpm2_activatecredential", "-c", self._path("ak.ctx"), "-C", ek,
                              "-i", str(blob), "-o", str(out), "-P", f"session:{session}")
                    return out.read_bytes()
                finally:
                    try:
                        self._run("tpm2_flushcontext", session)
                    except ProviderError:
                        pass
                    self._flush()
