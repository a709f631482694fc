"""`eectl vm measure`: boot an image in measurement mode and compare what the VM's vTPM
quotes with what ``eectl trust measure`` predicts.

Theory of operation
-------------------
A measurement-mode VM (``vm create --measure --tpm``) carries all its configuration on
its measured kernel command line (``easyenclave.measurement=1``; a config drive is
refused) and boots OVMF with an emulated TPM 2.0, so the firmware measures the kernel
into PCR4 and the command line and initrd into PCR9, the registers the vTPM policy
pins (``eectl trust measure`` predicts them; the TDX RTMR1/RTMR2 are the same events).

The host hands the VM a fresh 32-byte nonce as the fw_cfg item :data:`NONCE_FW_CFG`
(fw_cfg is not measured, so the nonce changes nothing it is compared against). In the
guest, ``ee-measure.service`` (``ConditionKernelCommandLine=easyenclave.measurement=1``,
before the agent) runs :func:`guest_main`: the agent's own ``tpm`` provider quotes the
PCRs with the nonce as qualifying data, and the evidence (the agent's wire form,
`ee.attestation.tpm.TpmEvidence`) goes to the serial console base64 in numbered
:data:`LINE` chunks, closed by its SHA-256 (:data:`END`).

The host reassembles the evidence from the serial log (:func:`evidence_from_serial`;
a garbled or partial transcript is an error, never a guess) and verifies it as the CP
would (`ee.attestation.tpm.TpmVerifier`): the EK certificate up to the EK CA
(libvirt's ``swtpm_localca`` on this host), the AK's attributes and its signature over
the quote, the nonce, the PCR digest and the firmware event log's replay. Only a quote
that verifies is compared (:func:`compare`) with the prediction for the exact kernel,
initrd, command line and memory size the domain booted. What the measure run does not
prove: that the AK lives in the EK's TPM (credential activation needs a live round
trip with the agent; the host made this vTPM itself).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs
import trio
from cryptography import x509

from ee.attestation.measure import MeasureError, Prediction, gib, predict
from ee.attestation.tpm import TpmFormatError, TpmResult, TpmVerifier, load_ek_roots
from ee.vm.plan import NONCE_FW_CFG

__all__ = [
    "END",
    "LINE",
    "NONCE_FW_CFG",
    "SWTPM_LOCALCA",
    "Booted",
    "MeasureFailed",
    "booted_from_xml",
    "compare",
    "ek_roots",
    "evidence_from_serial",
    "evidence_lines",
    "guest_main",
    "predict_booted",
    "verify",
    "wait_evidence",
]

GUEST_NONCE = Path("/sys/firmware/qemu_fw_cfg/by_name") / NONCE_FW_CFG / "raw"
LINE = "ee-measure: evidence"
END = "ee-measure: end"
CHUNK = 512
MAX_EVIDENCE = 4 << 20  # the evidence's own caps (event log 1 MiB) with room
MAX_CHUNKS = (MAX_EVIDENCE * 4 // 3) // CHUNK + 2
MAX_SERIAL = 64 << 20
#: where libvirt's swtpm_setup (swtpm_localca) keeps the CA of the vTPMs' EK certificates
SWTPM_LOCALCA = (Path("/var/lib/swtpm-localca/issuercert.pem"),
                 Path("/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem"))
#: the PCRs the vTPM policy pins (`ee.attestation.policy`): kernel, cmdline + initrd
POLICY_PCRS = (4, 9)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CHUNK_RE = re.compile(re.escape(LINE) + r" (\d{1,6})/(\d{1,6}) ([A-Za-z0-9+/=]{1,4096})\s*$")
_END_RE = re.compile(re.escape(END) + r" ([0-9a-f]{64}) (\d{1,8})\s*$")


class MeasureFailed(Exception):
    """The measurement could not be read or did not verify; one line for an operator."""


def evidence_lines(blob: bytes) -> list[str]:
    """The console lines that carry *blob* (what the guest prints)."""
    text = base64.b64encode(blob).decode("ascii")
    parts = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]
    lines = [f"{LINE} {i + 1}/{len(parts)} {p}" for i, p in enumerate(parts)]
    return [*lines, f"{END} {hashlib.sha256(blob).hexdigest()} {len(blob)}"]


def evidence_from_serial(text: str) -> bytes | None:
    """The evidence the guest printed in *text* (a serial log); None while its end line
    has not come yet; MeasureFailed when the transcript is garbled or inconsistent."""
    chunks: dict[int, str] = {}
    total: int | None = None
    end: tuple[str, int] | None = None
    for raw in _ANSI.sub("", text).splitlines():
        if (m := _END_RE.search(raw)) is not None:
            end = (m[1], int(m[2]))
            continue
        if (m := _CHUNK_RE.search(raw)) is None:
            continue
        index, count = int(m[1]), int(m[2])
        if not 1 <= index <= count <= MAX_CHUNKS or (total is not None and count != total):
            raise MeasureFailed(f"serial log: evidence chunk {index}/{count} is inconsistent")
        if chunks.get(index, m[3]) != m[3]:
            raise MeasureFailed(f"serial log: evidence chunk {index} appears twice, differing")
        total = count
        chunks[index] = m[3]
    if end is None:
        return None
    if total is None or sorted(chunks) != list(range(1, total + 1)):
        raise MeasureFailed(f"serial log: evidence incomplete ({len(chunks)} of "
                            f"{total or '?'} chunks before its end line)")
    try:
        blob = base64.b64decode("".join(chunks[i] for i in range(1, total + 1)),
                                validate=True)
    except ValueError:
        raise MeasureFailed("serial log: the evidence is not base64") from None
    if len(blob) != end[1] or hashlib.sha256(blob).hexdigest() != end[0]:
        raise MeasureFailed("serial log: the evidence does not match its end line "
                            "(garbled on the console?)")
    return blob


@attrs.frozen
class Row:
    register: str
    quoted: str
    predicted: str

    @property
    def ok(self) -> bool:
        return self.quoted == self.predicted


def compare(pcrs: Mapping[int, bytes], prediction: Prediction) -> list[Row]:
    """Quoted vs predicted, one row per policy PCR (a PCR the quote lacks is 'missing')."""
    predicted = {4: prediction.pcr4, 9: prediction.pcr9}
    return [Row(f"pcr{i}", pcrs[i].hex() if i in pcrs else "missing", predicted[i].hex())
            for i in POLICY_PCRS]


@attrs.frozen
class Booted:
    """What a domain booted, from its XML (what the prediction needs)."""

    kernel: Path
    initrd: Path
    cmdline: str
    memory_mib: int


def booted_from_xml(xml: str) -> Booted:
    """The kernel, initrd, cmdline and memory of a domain XML (MeasureFailed if absent)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise MeasureFailed(f"domain XML: {exc}") from None
    kernel, initrd = root.findtext("os/kernel"), root.findtext("os/initrd")
    cmdline, memory = root.findtext("os/cmdline"), root.find("memory")
    if not kernel or not initrd or cmdline is None or memory is None or not memory.text:
        raise MeasureFailed("domain XML: not a direct kernel boot (no kernel, initrd, "
                            "cmdline or memory)")
    scale = {"MiB": 1, "GiB": 1024, "KiB": 1 / 1024}.get(memory.get("unit", "KiB"))
    if scale is None or not memory.text.strip().isdigit():
        raise MeasureFailed(f"domain XML: memory {memory.text!r} {memory.get('unit')!r}")
    return Booted(Path(kernel), Path(initrd), cmdline, int(int(memory.text) * scale))


def ek_roots(paths: Iterable[Path]) -> list[x509.Certificate]:
    """The EK CA certificates in *paths* (PEM); MeasureFailed naming what is missing."""
    roots: list[x509.Certificate] = []
    for path in paths:
        try:
            roots += load_ek_roots(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise MeasureFailed(f"EK CA {path}: {exc} (libvirt's swtpm_localca makes it "
                                f"when it first sets up a vTPM; or pass --ek-ca FILE)") from None
    return roots


def verify(blob: bytes, nonce: bytes, roots: list[x509.Certificate], *,
           now: float) -> TpmResult:
    """The evidence verified as a CP would (no credential activation; see above);
    MeasureFailed naming every reason when it does not verify."""
    try:
        result = TpmVerifier(roots).verify(blob, expected_qualifying_data=nonce, now=now)
    except TpmFormatError as exc:
        raise MeasureFailed(f"the VM's evidence is malformed: {exc}") from None
    if not result.ok:
        raise MeasureFailed("the VM's quote does not verify: " + "; ".join(result.reasons))
    return result


def predict_booted(booted: Booted) -> Prediction:
    """`eectl trust measure`'s prediction for what the domain booted (CPU-bound)."""
    try:
        return predict(booted.kernel.read_bytes(), booted.initrd.read_bytes(),
                       booted.cmdline, memory=gib(booted.memory_mib / 1024))
    except (OSError, MeasureError) as exc:
        raise MeasureFailed(f"cannot predict: {exc}") from None


async def wait_evidence(serial: Path, alive: Callable[[], bool], *,
                        timeout_s: float) -> bytes:
    """The evidence from *serial* once the guest has printed it; MeasureFailed (with
    the last serial lines) when the domain stops or time runs out."""
    from ee.vm.manage import serial_tail

    try:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    text = await trio.Path(serial).read_text(errors="replace")
                except FileNotFoundError:
                    text = ""
                if len(text) > MAX_SERIAL:
                    raise MeasureFailed(f"{serial} is over {MAX_SERIAL} bytes")
                blob = evidence_from_serial(text)
                if blob is not None:
                    return blob
                failed = re.search(r"ee-measure: (quote failed: .*|the host's nonce .*)", text)
                if failed:
                    raise MeasureFailed(f"the guest says: {failed[1].strip()}")
                if not await trio.to_thread.run_sync(alive):
                    raise MeasureFailed(f"the VM stopped before printing its evidence; last "
                                        f"serial lines:\n{serial_tail(serial)}")
                await trio.sleep(2)
    except trio.TooSlowError:
        raise MeasureFailed(f"no evidence on the serial console within {timeout_s:.0f}s; "
                            f"last serial lines:\n{serial_tail(serial)}") from None


# --- the guest side (ee-measure.service) --------------------------------------------


def guest_main() -> int:
    """Quote the vTPM with the host's nonce and print the evidence on the console.
    Exit 0 without a nonce (not a measure run); 1 when the quote fails (said why)."""
    from ee.attestation.errors import ProviderError
    from ee.attestation.providers.tpm import TpmProvider

    try:
        nonce = GUEST_NONCE.read_bytes().strip()
    except OSError:
        print("ee-measure: no nonce from the host (fw_cfg); nothing to quote", flush=True)
        return 0
    try:
        qualifying = bytes.fromhex(nonce.decode("ascii"))
        if len(qualifying) != 32:
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        print("ee-measure: the host's nonce is not 32 bytes of hex", flush=True)
        return 1
    work = Path("/run/easyenclave/measure-tpm")
    try:
        provider = TpmProvider(os.environ.get("EE_TPM_TCTI", "device:/dev/tpm0"), work)
        blob = provider.evidence(qualifying).encode()
    except (ProviderError, OSError) as exc:
        print(f"ee-measure: quote failed: {exc}", flush=True)
        return 1
    for line in evidence_lines(blob):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(guest_main())
