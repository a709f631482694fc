"""Predict boot measurements from the image's artefacts alone.

Theory of operation
-------------------
A VM booted by QEMU with ``-kernel/-initrd/-append`` and OVMF (or TDVF under TDX)
measures, in this order (verified on this machine's OVMF 2022.11 + swtpm by reading
the guest's TPM event log; see tests/attestation/test_ovmf_pcrs.py):

====  ===================================================  ====================
PCR   event (type, data)                                   TDX register
====  ===================================================  ====================
4     EV_EFI_BOOT_SERVICES_APPLICATION: the kernel's        RTMR1
      Authenticode digest, as QEMU patched its setup
      header for this memory size
4     EV_EFI_ACTION "Calling EFI Application from Boot      RTMR1
      Option"
4     EV_SEPARATOR 00000000                                 RTMR1
5     EV_EFI_ACTION "Exit Boot Services Invocation",        RTMR1
      "... Returned with Success" (the TPM puts these in
      PCR5, so PCR4 holds three events; TDX maps PCR5 to
      RTMR1 too)
9     EV_EVENT_TAG "LOADED_IMAGE::LoadOptions": digest of   RTMR2
      UTF-16LE(cmdline + " initrd=initrd") + NUL NUL
      (newer TDVF: "initrd=initrd " + cmdline)
9     EV_EVENT_TAG "Linux initrd": digest of the initrd     RTMR2
      file
====  ===================================================  ====================

(the PCR9 events come from the Linux EFI stub, which measures the load options and the
initrd it loads; on TDX the same stub measures through the CC protocol into RTMR2).
Each register starts at zeros and is extended ``R = H(R || digest)``; SHA-384 for the
RTMRs, SHA-256 for the TPM's SHA-256 bank. RTMR1 is the five events in the order
above (TDX measures one separator per RTMR, not per PCR).

QEMU's header patches (hw/i386/x86.c x86_load_linux, q35): type_of_loader 0xB0,
CAN_USE_HEAP, heap_end_ptr, cmd_line_ptr, and -- when an initrd is given --
ramdisk_image/ramdisk_size, where ramdisk_image depends on the memory below 4 GiB
(q35: all of it below 2.75 GiB, else 2 GiB) minus QEMU's ACPI reserve. So the kernel
digest depends on the memory size unless the firmware measures the file unpatched
(OVMF >= edk2-stable202505; `patched=False`).

MRTD (TDX only) depends on the firmware and QEMU's page-adding order only:
`mrtd_from_tdvf`. RTMR0 (ACPI tables, HOBs) is not predicted here.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from typing import Literal

import attrs

from ee.attestation.errors import AttestationError
from ee.attestation.eventlog import ALG_SHA256, ALG_SHA384, replay_digests

CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
SEPARATOR = b"\x00\x00\x00\x00"
EXIT_BOOT_SERVICES = b"Exit Boot Services Invocation"
EXIT_BOOT_SERVICES_OK = b"Exit Boot Services Returned with Success"
INITRD_ARG = "initrd=initrd"  # OVMF's QemuKernelLoaderFs names the initrd "initrd"
# Where OVMF puts it in the load options: after the command line (OVMF 2022.11, as
# booted here; dstack's TDVF) or before it (edk2-stable202602 TDVF, per published
# hardware vectors).
InitrdArg = Literal["suffix", "prefix"]

# QEMU (hw/i386/pc.c) reserves this much below the top of low memory for ACPI data.
QEMU_ACPI_DATA_SIZE = 0x20000 + 0x8000
Q35_HIGH_MEM_THRESHOLD = 0xB0000000
MAX_KERNEL_BYTES = 256 * 1024 * 1024
GIB = 1024**3


class MeasureError(AttestationError):
    """An artefact cannot be measured (not a PE bzImage, truncated, too large...)."""


def _u16(data: bytes | bytearray, off: int, what: str) -> int:
    if off < 0 or off + 2 > len(data):
        raise MeasureError(f"{what} at offset {off:#x} is beyond the file ({len(data)} bytes)")
    v: int = struct.unpack_from("<H", data, off)[0]
    return v


def _u32(data: bytes | bytearray, off: int, what: str) -> int:
    if off < 0 or off + 4 > len(data):
        raise MeasureError(f"{what} at offset {off:#x} is beyond the file ({len(data)} bytes)")
    v: int = struct.unpack_from("<I", data, off)[0]
    return v


def authenticode(data: bytes, algorithm: str = "sha384") -> bytes:
    """The Authenticode digest of a PE/COFF image as EDK2 measures it
    (SecurityPkg DxeTpm2MeasureBootLib / Tcg2Dxe ``MeasurePeImage``)."""
    if len(data) > MAX_KERNEL_BYTES:
        raise MeasureError(f"image of {len(data)} bytes exceeds {MAX_KERNEL_BYTES}")
    if data[:2] != b"MZ":
        raise MeasureError("not a PE image (no MZ header)")
    pe = _u32(data, 0x3C, "e_lfanew")
    if data[pe : pe + 4] != b"PE\x00\x00":
        raise MeasureError(f"no PE signature at e_lfanew {pe:#x}")
    coff = pe + 4
    sections_count = _u16(data, coff + 2, "NumberOfSections")
    opt_size = _u16(data, coff + 16, "SizeOfOptionalHeader")
    opt = coff + 20
    magic = _u16(data, opt, "optional header magic")
    if magic == 0x10B:
        rva_count_off, dirs = opt + 92, opt + 96
    elif magic == 0x20B:
        rva_count_off, dirs = opt + 108, opt + 112
    else:
        raise MeasureError(f"unknown optional header magic {magic:#x}")
    checksum = opt + 64
    size_of_headers = _u32(data, opt + 60, "SizeOfHeaders")
    rva_count = _u32(data, rva_count_off, "NumberOfRvaAndSizes")
    if size_of_headers > len(data):
        raise MeasureError(f"SizeOfHeaders {size_of_headers} is beyond the file")
    h = hashlib.new(algorithm)
    h.update(data[:checksum])
    if rva_count <= 4:  # no security directory entry
        h.update(data[checksum + 4 : size_of_headers])
        cert_size = 0
    else:
        sec = dirs + 4 * 8
        if sec + 8 > size_of_headers:
            raise MeasureError("the security directory entry is beyond SizeOfHeaders")
        h.update(data[checksum + 4 : sec])
        h.update(data[sec + 8 : size_of_headers])
        cert_size = _u32(data, sec + 4, "certificate table size")
    table = opt + opt_size
    sections = []
    for i in range(sections_count):
        s = table + 40 * i
        raw_size = _u32(data, s + 16, f"section[{i}].SizeOfRawData")
        raw_ptr = _u32(data, s + 20, f"section[{i}].PointerToRawData")
        if raw_size:
            if raw_ptr + raw_size > len(data):
                raise MeasureError(f"section[{i}] ends beyond the file")
            sections.append((raw_ptr, raw_size))
    hashed = size_of_headers
    for ptr, size in sorted(sections):
        h.update(data[ptr : ptr + size])
        hashed += size
    if len(data) > hashed:
        if len(data) < hashed + cert_size:
            raise MeasureError("the certificate table does not fit after the sections")
        h.update(data[hashed : len(data) - cert_size])
    return h.digest()


def qemu_patch_kernel(
    kernel: bytes,
    *,
    initrd_size: int,
    memory: int,
    acpi_data_size: int = QEMU_ACPI_DATA_SIZE,
) -> bytes:
    """The kernel as QEMU's x86_load_linux (q35 machine) patches its setup header."""
    if len(kernel) < 0x1000:
        raise MeasureError("the kernel image is too short to be a bzImage")
    if kernel[0x202:0x206] != b"HdrS":
        raise MeasureError("no Linux setup header (HdrS) at 0x202")
    k = bytearray(kernel)
    protocol = _u16(k, 0x206, "boot protocol")
    if protocol < 0x200 or not k[0x211] & 0x01:
        real_addr, cmdline_addr = 0x90000, 0x9A000
    else:
        real_addr, cmdline_addr = 0x10000, 0x20000
    if protocol >= 0x200:
        k[0x210] = 0xB0
    if protocol >= 0x201:
        k[0x211] |= 0x80
        struct.pack_into("<I", k, 0x224, cmdline_addr - real_addr - 0x200)
    if protocol >= 0x202:
        struct.pack_into("<I", k, 0x228, cmdline_addr)
    else:
        raise MeasureError(f"boot protocol {protocol:#x} is too old")
    if initrd_size > 0:
        if protocol >= 0x20C and _u16(k, 0x236, "xloadflags") & 0x40:
            initrd_max = 0xFFFFFFFF
        elif protocol >= 0x203:
            initrd_max = _u32(k, 0x22C, "initrd_addr_max") or 0x37FFFFFF
        else:
            initrd_max = 0x37FFFFFF
        lowmem = 0x80000000 if memory >= Q35_HIGH_MEM_THRESHOLD else Q35_HIGH_MEM_THRESHOLD
        below_4g = min(memory, lowmem)
        if below_4g <= acpi_data_size:
            raise MeasureError(f"memory size {memory} is too small")
        if initrd_max >= below_4g - acpi_data_size:
            initrd_max = below_4g - acpi_data_size - 1
        if initrd_size >= initrd_max:
            raise MeasureError(f"initrd of {initrd_size} bytes does not fit below {initrd_max:#x}")
        struct.pack_into("<I", k, 0x218, (initrd_max - initrd_size) & ~0xFFF)
        struct.pack_into("<I", k, 0x21C, initrd_size)
    return bytes(k)


def cmdline_event_data(
    cmdline: str, *, with_initrd: bool = True, initrd_arg: InitrdArg = "suffix"
) -> bytes:
    """The load options OVMF hands the kernel (what the EFI stub measures): UTF-16LE of
    the command line with "initrd=initrd" when an initrd is given (after it, or before
    it with *initrd_arg* "prefix"), NUL-terminated."""
    text = cmdline
    if with_initrd:
        text = f"{cmdline} {INITRD_ARG}" if initrd_arg == "suffix" else f"{INITRD_ARG} {cmdline}"
    return text.encode("utf-16-le") + b"\x00\x00"


@attrs.frozen
class Prediction:
    """Predicted registers and the event digests they replay from (hex in `to_json`)."""

    memory: int
    patched: bool
    rtmr1_events: tuple[bytes, ...]
    rtmr2_events: tuple[bytes, ...]
    pcr4_events: tuple[bytes, ...]
    pcr9_events: tuple[bytes, ...]
    mrtd: bytes | None = None

    @property
    def rtmr1(self) -> bytes:
        return replay_digests(self.rtmr1_events, ALG_SHA384)

    @property
    def rtmr2(self) -> bytes:
        return replay_digests(self.rtmr2_events, ALG_SHA384)

    @property
    def pcr4(self) -> bytes:
        return replay_digests(self.pcr4_events, ALG_SHA256)

    @property
    def pcr9(self) -> bytes:
        return replay_digests(self.pcr9_events, ALG_SHA256)

    def to_json(self) -> dict[str, object]:
        return {
            "memory_bytes": self.memory,
            "kernel_patched": self.patched,
            "mrtd": self.mrtd.hex() if self.mrtd is not None else None,
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
            "pcr4": self.pcr4.hex(),
            "pcr9": self.pcr9.hex(),
            "events": {
                "rtmr1": [d.hex() for d in self.rtmr1_events],
                "rtmr2": [d.hex() for d in self.rtmr2_events],
                "pcr4": [d.hex() for d in self.pcr4_events],
                "pcr9": [d.hex() for d in self.pcr9_events],
            },
        }


def predict(
    kernel: bytes,
    initrd: bytes,
    cmdline: str,
    *,
    memory: int,
    patched: bool = True,
    firmware: bytes | None = None,
    qemu_interleaved: bool = True,
    initrd_arg: InitrdArg = "suffix",
) -> Prediction:
    """Predict RTMR1/RTMR2 (SHA-384), PCR4/PCR9 (SHA-256) and, given a TDVF *firmware*,
    MRTD, for a direct kernel boot of *memory* bytes (pure; CPU-bound: run it in a
    thread from an event loop)."""
    if "\x00" in cmdline:
        raise MeasureError("the command line contains a NUL")
    image = qemu_patch_kernel(kernel, initrd_size=len(initrd), memory=memory) if patched else kernel
    options = cmdline_event_data(cmdline, with_initrd=bool(initrd), initrd_arg=initrd_arg)

    def events(alg: str, kernel_digest: bytes, exit_events: bool) -> tuple[bytes, ...]:
        fixed = [CALLING_EFI_APPLICATION, SEPARATOR]
        if exit_events:
            fixed += [EXIT_BOOT_SERVICES, EXIT_BOOT_SERVICES_OK]
        return (kernel_digest, *(hashlib.new(alg, f).digest() for f in fixed))

    def stub_events(alg: str) -> tuple[bytes, ...]:
        out = [hashlib.new(alg, options).digest()]
        if initrd:
            out.append(hashlib.new(alg, initrd).digest())
        return tuple(out)

    return Prediction(
        memory=memory,
        patched=patched,
        rtmr1_events=events("sha384", authenticode(image, "sha384"), True),
        rtmr2_events=stub_events("sha384"),
        pcr4_events=events("sha256", authenticode(image, "sha256"), False),
        pcr9_events=stub_events("sha256"),
        mrtd=mrtd_from_tdvf(firmware, interleaved=qemu_interleaved) if firmware else None,
    )


# --- MRTD from TDVF metadata -------------------------------------------------------

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
TDX_METADATA_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
SECTION_TYPES = {
    0: "BFV",
    1: "CFV",
    2: "TD_HOB",
    3: "TEMP_MEM",
    4: "PERM_MEM",
    5: "PAYLOAD",
    6: "PAYLOAD_PARAM",
}
ATTR_MR_EXTEND = 0x1
ATTR_PAGE_AUG = 0x2
PAGE = 4096
MAX_FIRMWARE_BYTES = 64 * 1024 * 1024
MAX_SECTIONS = 64


@attrs.frozen
class TdvfSection:
    data_offset: int
    raw_size: int
    mem_address: int
    mem_size: int
    type: int
    attributes: int


def tdvf_sections(fw: bytes) -> tuple[TdvfSection, ...]:
    """The TDVF metadata sections of a firmware image (strict; `MeasureError`)."""
    if len(fw) > MAX_FIRMWARE_BYTES:
        raise MeasureError(f"firmware of {len(fw)} bytes exceeds {MAX_FIRMWARE_BYTES}")
    # The table ends 32 bytes before the end of the image; its last entry is the footer
    # (u16 table length, then the footer GUID); entries are {data, u16 length, GUID}
    # and are walked from the end.
    foot = len(fw) - 32 - 16
    if foot < 18 or fw[foot : foot + 16] != FOOTER_GUID:
        raise MeasureError("no OVMF GUIDed table footer GUID 48 bytes before the end")
    table_len = _u16(fw, foot - 2, "GUIDed table length")
    start = foot + 16 - table_len
    if table_len < 18 or start < 0:
        raise MeasureError(f"GUIDed table length {table_len} is out of range")
    pos = foot - 2  # end of the current entry's data (entries grow downwards)
    offset_from_end: int | None = None
    while pos > start:
        if pos - 18 < start:
            raise MeasureError(f"truncated GUIDed table entry at {pos:#x}")
        guid = fw[pos - 16 : pos]
        size = _u16(fw, pos - 18, "GUIDed entry length")
        if size < 18 or pos - size < start:
            raise MeasureError(f"GUIDed table entry at {pos:#x} has length {size}")
        if guid == TDX_METADATA_GUID:
            offset_from_end = _u32(fw, pos - 22, "TDX metadata offset")
            break
        pos -= size
    if offset_from_end is None:
        raise MeasureError("the firmware has no TDX metadata (not a TDVF image)")
    desc = len(fw) - offset_from_end
    if desc < 0 or fw[desc : desc + 4] != b"TDVF":
        raise MeasureError(f"no TDVF descriptor at {desc:#x}")
    if desc + 16 > len(fw):
        raise MeasureError(f"the TDVF descriptor at {desc:#x} is beyond the file")
    _length, version, count = struct.unpack_from("<III", fw, desc + 4)
    if version != 1:
        raise MeasureError(f"TDVF descriptor version {version}")
    if not 1 <= count <= MAX_SECTIONS:
        raise MeasureError(f"TDVF section count {count}")
    out = []
    for i in range(count):
        at = desc + 16 + 32 * i
        if at + 32 > len(fw):
            raise MeasureError(f"TDVF section {i} is beyond the file")
        s = TdvfSection(*struct.unpack_from("<IIQQII", fw, at))
        if s.mem_address % PAGE or s.mem_size % PAGE:
            raise MeasureError(f"TDVF section {i} is not page aligned")
        if s.raw_size and s.data_offset + s.raw_size > len(fw):
            raise MeasureError(f"TDVF section {i} data is beyond the file")
        out.append(s)
    return tuple(out)


def _block(tag: bytes, gpa: int) -> bytes:
    b = bytearray(128)
    b[: len(tag)] = tag
    struct.pack_into("<Q", b, 16, gpa)
    return bytes(b)


def mrtd_from_tdvf(fw: bytes, *, interleaved: bool = True) -> bytes:
    """MRTD of a TD started with TDVF firmware *fw*: one SHA-384 over MEM.PAGE.ADD and
    MR.EXTEND blocks per page of each metadata section (QEMU >= 9 interleaves them per
    page, *interleaved*; QEMU 8.x TDX builds add a section's pages first)."""
    h = hashlib.sha384()
    for s in tdvf_sections(fw):
        pages = range(s.mem_address, s.mem_address + s.mem_size, PAGE)
        data = fw[s.data_offset : s.data_offset + s.raw_size].ljust(s.mem_size, b"\x00")

        def add(gpa: int, s: TdvfSection = s) -> None:
            if not s.attributes & ATTR_PAGE_AUG:
                h.update(_block(b"MEM.PAGE.ADD", gpa))

        def extend(gpa: int, s: TdvfSection = s, data: bytes = data) -> None:
            if s.attributes & ATTR_MR_EXTEND:
                for chunk in range(gpa, gpa + PAGE, 256):
                    h.update(_block(b"MR.EXTEND", chunk))
                    off = chunk - s.mem_address
                    h.update(data[off : off + 256])

        if interleaved:
            for gpa in pages:
                add(gpa)
                extend(gpa)
        else:
            for gpa in pages:
                add(gpa)
            for gpa in pages:
                extend(gpa)
    return h.digest()


Register = Literal["rtmr1", "rtmr2", "pcr4", "pcr9"]


def gib(value: float) -> int:
    """Bytes in *value* GiB (must be a whole number of MiB)."""
    b = int(value * GIB)
    if b <= 0 or b % (1024 * 1024) or b != value * GIB:
        raise MeasureError(f"memory {value} GiB is not a positive whole number of MiB")
    return b


def fixed_event_digests(alg: str) -> Sequence[bytes]:
    """The fixed EFI event digests (calling, separator, exit boot services x2)."""
    return [
        hashlib.new(alg, d).digest()
        for d in (CALLING_EFI_APPLICATION, SEPARATOR, EXIT_BOOT_SERVICES, EXIT_BOOT_SERVICES_OK)
    ]


# --- UEFI boot of a unified kernel image from a disk (GCP) ------------------------

UKI_MEASURED_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb",
                         ".pcrsig", ".pcrpkey")
"""systemd-stub (252)'s section list: each present section but ``.pcrsig`` is measured
into PCR11 in this order, its name (ASCII + NUL) then its bytes (VirtualSize)."""
UKI_UNMEASURED = frozenset({".pcrsig"})
PCR11_PHASES = (b"sysinit", b"ready")
"""What systemd-pcrphase (252, in the root) extends into PCR11 once booted from a UKI,
before the agent starts: the running system's PCR11 is the stub's events then these."""


@attrs.frozen
class UkiPrediction:
    """Predicted registers of a UEFI disk boot of a UKI (see `predict_uki`)."""

    pcr4_events: tuple[bytes, ...]
    pcr5_events: tuple[bytes, ...]
    pcr9_events: tuple[bytes, ...]
    pcr11_events: tuple[bytes, ...]
    rtmr1_events: tuple[bytes, ...]
    rtmr2_events: tuple[bytes, ...]
    uki_authenticode_sha256: bytes
    kernel_authenticode_sha256: bytes

    @property
    def registers(self) -> dict[str, bytes]:
        out = {f"pcr{n}": replay_digests(getattr(self, f"pcr{n}_events"), ALG_SHA256)
               for n in (4, 5, 9, 11)}
        phases = [hashlib.sha256(p).digest() for p in PCR11_PHASES]
        out["pcr11_running"] = replay_digests((*self.pcr11_events, *phases), ALG_SHA256)
        out["pcr12"] = bytes(32)  # no command line from the boot entry
        out["rtmr1"] = replay_digests(self.rtmr1_events, ALG_SHA384)
        out["rtmr2"] = replay_digests(self.rtmr2_events, ALG_SHA384)
        return out

    def to_json(self) -> dict[str, object]:
        return {
            **{k: v.hex() for k, v in self.registers.items()},
            "uki_authenticode_sha256": self.uki_authenticode_sha256.hex(),
            "kernel_authenticode_sha256": self.kernel_authenticode_sha256.hex(),
            "events": {
                name: [d.hex() for d in getattr(self, f"{name}_events")]
                for name in ("pcr4", "pcr5", "pcr9", "pcr11", "rtmr1", "rtmr2")
            },
        }


def load_options_data(cmdline: bytes) -> bytes:
    """The LoadOptions systemd-stub gives the kernel for a ``.cmdline`` section: the
    text as UTF-16LE with a terminating NUL (what the Linux EFI stub measures)."""
    try:
        text = cmdline.decode("ascii")
    except UnicodeDecodeError:
        raise MeasureError("the UKI's .cmdline is not ASCII") from None
    if "\x00" in text:
        raise MeasureError("the UKI's .cmdline contains a NUL")
    return text.encode("utf-16-le") + b"\x00\x00"


def predict_uki(uki: bytes, sections: dict[str, bytes], gpt_event: bytes) -> UkiPrediction:
    """Predict a UEFI (OVMF/TDVF-style boot manager) boot of *uki* from a GPT disk whose
    EV_EFI_GPT_EVENT data is *gpt_event*; *sections* are the UKI's stub sections as
    `ee.image.disk.uki_parts` reads them. Pure; CPU-bound.

    PCR4: "Calling EFI Application", separator (ReadyToBoot), the UKI's Authenticode
    digest (the firmware's LoadImage), the kernel's (``.linux``, loaded by the stub
    through LoadImage, unpatched). PCR5: separator, the GPT, Exit Boot Services x2.
    PCR9: the Linux EFI stub's LoadOptions (the ``.cmdline`` as UTF-16 + NUL) and initrd
    (``.initrd``) events. PCR11: systemd-stub's section names and contents (and, once
    the root runs, systemd-pcrphase's words: ``pcr11_running``). TDX maps
    PCR4/5 to RTMR1 (one separator) and PCR9 to RTMR2; systemd 252's stub measures only
    through the TPM protocol, so PCR11 has no RTMR counterpart (the UKI digest in RTMR1
    covers the same bytes)."""
    for required in (".linux", ".cmdline", ".initrd"):
        if required not in sections:
            raise MeasureError(f"the UKI has no {required} section")
    kernel = sections[".linux"]
    options = load_options_data(sections[".cmdline"])

    def h(alg: str, data: bytes) -> bytes:
        return hashlib.new(alg, data).digest()

    def uefi(alg: str) -> tuple[list[bytes], list[bytes]]:
        pcr4 = [h(alg, CALLING_EFI_APPLICATION), h(alg, SEPARATOR), authenticode(uki, alg),
                authenticode(kernel, alg)]
        pcr5 = [h(alg, SEPARATOR), h(alg, gpt_event), h(alg, EXIT_BOOT_SERVICES),
                h(alg, EXIT_BOOT_SERVICES_OK)]
        return pcr4, pcr5

    pcr4, pcr5 = uefi("sha256")
    t4, t5 = uefi("sha384")
    pcr11 = []
    for name in UKI_MEASURED_SECTIONS:
        if name in sections and name not in UKI_UNMEASURED:
            pcr11 += [h("sha256", name.encode() + b"\x00"), h("sha256", sections[name])]
    return UkiPrediction(
        pcr4_events=tuple(pcr4),
        pcr5_events=tuple(pcr5),
        pcr9_events=(h("sha256", options), h("sha256", sections[".initrd"])),
        pcr11_events=tuple(pcr11),
        rtmr1_events=(t4[0], t4[1], t5[1], t4[2], t4[3], t5[2], t5[3]),
        rtmr2_events=(h("sha384", options), h("sha384", sections[".initrd"])),
        uki_authenticode_sha256=pcr4[2],
        kernel_authenticode_sha256=pcr4[3],
    )
