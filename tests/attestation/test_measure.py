"""Measurement predictions: Authenticode, QEMU's header patches, the fixed EFI events,
the command line and initrd events, and MRTD from TDVF metadata.

Expected values are either published numbers (cited at each) or independent
formulations of the same definition (byte ranges concatenated by hand); the end-to-end
proof against a real firmware is test_ovmf_pcrs.py.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from pathlib import Path

import pytest

from ee.attestation.eventlog import ALG_SHA384, replay_digests
from ee.attestation.measure import (
    ATTR_MR_EXTEND,
    ATTR_PAGE_AUG,
    MeasureError,
    authenticode,
    cmdline_event_data,
    fixed_event_digests,
    gib,
    mrtd_from_tdvf,
    predict,
    qemu_patch_kernel,
    tdvf_sections,
)

# SHA-384 of the fixed RTMR1 events, as they appear in a published TDX event log (a
# dstack CVM's log with its RTMRs, see test_eventlog.PUBLISHED_EVENTS) and in the
# hardware vectors of a public TDX measurement crate (QEMU 10.2.4, edk2-stable202602).
PUBLISHED_FIXED_SHA384 = [
    "77a0dab2312b4e1e57a84d865a21e5b2ee8d677a21012ada819d0a98988078d3d740f6346bfe0abaa938ca20439a8d71",
    "394341b7182cd227c5c6b07ef8000cdfd86136c4292b8e576573ad7ed9ae41019f5818b4b971c9effc60e1ad9f1289f0",
    "214b0bef1379756011344877743fdc2a5382bac6e70362d624ccf3f654407c1b4badf7d8f9295dd3dabdef65b27677e0",
    "0a2e01c85deae718a530ad8c6d20a84009babe6c8989269e950d8cf440c6e997695e64d455c4174a652cd080f6230b74",
]
# SHA-256 of the same events, from the real OVMF 2022.11 + swtpm log in data/ (PCR4/PCR5).
OVMF_FIXED_SHA256 = [
    "3d6772b4f84ed47595d72a2c4c5ffd15f5bb72c7507fe26f2aaee2c69d5633ba",
    "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119",
    "d8043d6b7b85ad358eb3b6ae6a873ab7ef23a26352c5dc4faa5aeedacf5eb41b",
    "b54f7542cbd872a81a9d9dea839b2b8d747c7ebd5ea6615c40f42f44a6dbeba0",
]
# Hardware vectors of that crate: cmdline, the measured load options' SHA-384, the
# initrd's SHA-384 and the RTMR2 the TD reported (edk2-stable202602 puts initrd=initrd
# first).
HW_CMDLINE = "root=LABEL=cloudimg-rootfs ro console=ttyS0"
HW_LOAD_OPTIONS = (
    "b8c85d40a1d555a451571e24d7d7c4c331bc15721d6e4b2a"
    "5cb5093214c44174822a0916aa4d622d4309644de99cd59c"
)
HW_INITRD_SHA384 = (
    "88de90bedcc560064688c74ccd6609a25ed9d48b0a0e13d8"
    "b2a558212724d8755b2c8114dcf04b8d51ea4cf7782e3091"
)
HW_RTMR2 = (
    "972547466cb6bcb8a23cd479e9258c3affbbc4f0ba2805d7"
    "32477200d0dff8432447c7a775e70453cdb51f018a306ece"
)


def test_fixed_event_digests_are_the_published_ones() -> None:
    assert [d.hex() for d in fixed_event_digests("sha384")] == PUBLISHED_FIXED_SHA384
    assert [d.hex() for d in fixed_event_digests("sha256")] == OVMF_FIXED_SHA256


def test_rtmr2_from_the_published_hardware_vector() -> None:
    options = cmdline_event_data(HW_CMDLINE, initrd_arg="prefix")
    assert hashlib.sha384(options).hexdigest() == HW_LOAD_OPTIONS
    rtmr2 = replay_digests([bytes.fromhex(HW_LOAD_OPTIONS), bytes.fromhex(HW_INITRD_SHA384)])
    assert rtmr2.hex() == HW_RTMR2
    # this machine's OVMF appends it instead (test_ovmf_pcrs proves it against PCR9)
    assert cmdline_event_data("a b") == "a b initrd=initrd".encode("utf-16-le") + b"\0\0"
    assert cmdline_event_data("a b", with_initrd=False) == "a b".encode("utf-16-le") + b"\0\0"


# --- Authenticode on a synthetic PE ------------------------------------------------

SIZE_OF_HEADERS = 0x200
OPT = 0x58  # optional header offset (e_lfanew 0x40 + 4 + 20)
CHECKSUM = OPT + 64
SECURITY = OPT + 112 + 4 * 8  # PE32+: data directories at +112


def build_pe(rva_count: int = 16, cert_size: int = 0x20, size: int = 0x440) -> bytes:
    pe = bytearray((i * 7 + 3) & 0xFF for i in range(size))
    pe[:64] = bytes(64)
    pe[:2] = b"MZ"
    struct.pack_into("<I", pe, 0x3C, 0x40)
    pe[0x40:0x44] = b"PE\0\0"
    coff = 0x44
    pe[coff : coff + 20] = bytes(20)
    struct.pack_into("<HH", pe, coff, 0x8664, 2)
    struct.pack_into("<H", pe, coff + 16, 240)
    pe[OPT : OPT + 240] = bytes(240)
    struct.pack_into("<H", pe, OPT, 0x20B)
    struct.pack_into("<I", pe, OPT + 60, SIZE_OF_HEADERS)
    struct.pack_into("<I", pe, CHECKSUM, 0x12345678)
    struct.pack_into("<I", pe, OPT + 108, rva_count)
    struct.pack_into("<II", pe, SECURITY, 0x420, cert_size)
    table = OPT + 240
    pe[table : table + 80] = bytes(80)
    # .text listed first but placed after .data: sections are hashed in file order
    for i, (name, ptr) in enumerate(((b".text", 0x300), (b".data", 0x200))):
        hdr = table + 40 * i
        pe[hdr : hdr + 8] = name.ljust(8, b"\0")
        struct.pack_into("<II", pe, hdr + 16, 0x100, ptr)
    return bytes(pe)


def test_authenticode_skips_checksum_security_entry_and_certificates() -> None:
    pe = build_pe()
    expected = hashlib.sha384(
        pe[:CHECKSUM]
        + pe[CHECKSUM + 4 : SECURITY]
        + pe[SECURITY + 8 : SIZE_OF_HEADERS]
        + pe[0x200:0x300]
        + pe[0x300:0x400]
        + pe[0x400:0x420]  # trailing bytes before the 0x20-byte certificate table
    ).digest()
    assert authenticode(pe) == expected
    # the excluded fields really are excluded
    for at in (CHECKSUM, SECURITY, SECURITY + 4 + 3, 0x420, 0x43F):
        flipped = bytearray(pe)
        flipped[at] ^= 0x01
        if at == SECURITY + 4 + 3:
            continue  # changes the certificate size: a different image
        assert authenticode(bytes(flipped)) == expected, at
    for at in (0x10, 0x100, 0x1FF, 0x200, 0x3FF, 0x41F):
        flipped = bytearray(pe)
        flipped[at] ^= 0x01
        assert authenticode(bytes(flipped)) != expected, at


def test_authenticode_without_a_security_entry_hashes_everything_after_the_checksum() -> None:
    pe = build_pe(rva_count=4)
    expected = hashlib.sha256(
        pe[:CHECKSUM] + pe[CHECKSUM + 4 : SIZE_OF_HEADERS] + pe[0x200:0x400] + pe[0x400:]
    ).digest()
    assert authenticode(pe, "sha256") == expected


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda pe: b"ZM" + pe[2:], "no MZ"),
        (lambda pe: pe[:0x40] + b"XX" + pe[0x42:], "no PE signature"),
        (lambda pe: pe[:0x3C] + struct.pack("<I", 0x7FFFFFF0) + pe[0x40:], "no PE signature"),
        (lambda pe: build_pe(cert_size=0x41), "certificate table"),
        (lambda pe: pe[:0x3F0], r"section\[0\] ends beyond the file"),
        (lambda pe: pe[:0x50], "beyond the file"),
    ],
)
def test_authenticode_refuses_bad_images(mutate: object, message: str) -> None:
    with pytest.raises(MeasureError, match=message):
        authenticode(mutate(build_pe()))  # type: ignore[operator]


# --- QEMU's setup header patches ---------------------------------------------------


def bzimage(protocol: int = 0x20F, xloadflags: int = 0x7F, initrd_max: int = 0x7FFFFFFF) -> bytes:
    k = bytearray(0x1000)
    k[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", k, 0x206, protocol)
    k[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", k, 0x22C, initrd_max)
    struct.pack_into("<H", k, 0x236, xloadflags)
    return bytes(k)


def fields(k: bytes) -> dict[str, int]:
    return {
        "type_of_loader": k[0x210],
        "loadflags": k[0x211],
        "ramdisk_image": struct.unpack_from("<I", k, 0x218)[0],
        "ramdisk_size": struct.unpack_from("<I", k, 0x21C)[0],
        "heap_end_ptr": struct.unpack_from("<I", k, 0x224)[0],
        "cmd_line_ptr": struct.unpack_from("<I", k, 0x228)[0],
    }


def test_qemu_header_patches() -> None:
    size = 0x100000
    k = qemu_patch_kernel(bzimage(), initrd_size=size, memory=512 << 20)
    top = (512 << 20) - 0x28000 - 1  # below-4G memory minus QEMU's ACPI reserve
    assert fields(k) == {
        "type_of_loader": 0xB0,
        "loadflags": 0x81,
        "ramdisk_image": (top - size) & ~0xFFF,
        "ramdisk_size": size,
        "heap_end_ptr": 0x20000 - 0x10000 - 0x200,
        "cmd_line_ptr": 0x20000,
    }
    # nothing else changes
    diff = [i for i, (a, b) in enumerate(zip(k, bzimage(), strict=True)) if a != b]
    assert set(diff) <= set(range(0x210, 0x22C))


def test_initrd_placement_depends_on_memory_below_2_75_gib() -> None:
    def addr(mib: int, **kw: int) -> int:
        return fields(qemu_patch_kernel(bzimage(**kw), initrd_size=4096, memory=mib << 20))[
            "ramdisk_image"
        ]

    # q35: all memory is below 4G up to 2.75 GiB, then 2 GiB is
    assert addr(2048) == addr(2816) == addr(8192) == addr(65536)
    assert addr(2048) != addr(2047) != addr(2560) != addr(2815)
    # without XLF_CAN_BE_LOADED_ABOVE_4G the header's initrd_addr_max caps it
    assert addr(2560, xloadflags=0) == addr(2700, xloadflags=0) == (0x7FFFFFFF - 4096) & ~0xFFF
    assert addr(2560) != addr(2560, xloadflags=0)


def test_patch_refusals() -> None:
    with pytest.raises(MeasureError, match="too short"):
        qemu_patch_kernel(b"MZ", initrd_size=0, memory=1 << 30)
    with pytest.raises(MeasureError, match="HdrS"):
        qemu_patch_kernel(bytes(0x1000), initrd_size=0, memory=1 << 30)
    with pytest.raises(MeasureError, match="does not fit"):
        qemu_patch_kernel(bzimage(), initrd_size=600 << 20, memory=512 << 20)


def test_gib() -> None:
    assert gib(2) == 2 << 30
    assert gib(0.5) == 512 << 20
    for bad in (0, -1, 1e-9):
        with pytest.raises(MeasureError):
            gib(bad)


# --- the prediction as a whole -------------------------------------------------------


def kernel() -> bytes:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.skip("no /boot/vmlinuz-*")
    return kernels[-1].read_bytes()


def test_prediction_event_lists() -> None:
    k = kernel()
    p = predict(k, b"initrd bytes", "console=ttyS0", memory=2 << 30)
    patched = qemu_patch_kernel(k, initrd_size=12, memory=2 << 30)
    assert p.rtmr1_events == (authenticode(patched), *fixed_event_digests("sha384"))
    assert p.pcr4_events == (
        authenticode(patched, "sha256"),
        *fixed_event_digests("sha256")[:2],
    )
    assert p.rtmr2_events == (
        hashlib.sha384("console=ttyS0 initrd=initrd".encode("utf-16-le") + b"\0\0").digest(),
        hashlib.sha384(b"initrd bytes").digest(),
    )
    assert p.rtmr1 == replay_digests(p.rtmr1_events, ALG_SHA384)
    unpatched = predict(k, b"initrd bytes", "console=ttyS0", memory=2 << 30, patched=False)
    assert unpatched.rtmr1_events[0] == authenticode(k) != p.rtmr1_events[0]
    assert predict(k, b"", "x", memory=2 << 30).rtmr2_events == (
        hashlib.sha384("x".encode("utf-16-le") + b"\0\0").digest(),
    )
    with pytest.raises(MeasureError, match="NUL"):
        predict(k, b"", "a\0b", memory=2 << 30)


# --- MRTD ---------------------------------------------------------------------------

FOOTER = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
TDX_META = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le


def section(off: int, raw: int, addr: int, size: int, kind: int, attr: int) -> bytes:
    return struct.pack("<IIQQII", off, raw, addr, size, kind, attr)


def build_tdvf() -> bytes:
    """Three pages: BFV and CFV (measured), a page with the descriptor and the GUIDed
    table; a TD_HOB (added, not extended) and a PAGE.AUG TEMP_MEM (nothing)."""
    fw = bytearray((i * 13 + 5) & 0xFF for i in range(0x3000))
    desc = b"TDVF" + struct.pack("<III", 16 + 4 * 32, 1, 4)
    desc += section(0x0000, 0x1000, 0xFFFFF000, 0x1000, 0, ATTR_MR_EXTEND)
    desc += section(0x1000, 0x1000, 0xFFFFE000, 0x1000, 1, ATTR_MR_EXTEND)
    desc += section(0, 0, 0x00809000, 0x2000, 2, 0)
    desc += section(0, 0, 0x0080B000, 0x1000, 3, ATTR_PAGE_AUG)
    fw[0x2000 : 0x2000 + len(desc)] = desc

    def entry(guid: bytes, data: bytes) -> bytes:
        return data + struct.pack("<H", len(data) + 18) + guid

    entries = (
        entry(b"\x11" * 16, b"unrelated")
        + entry(TDX_META, struct.pack("<I", len(fw) - 0x2000))
        + entry(b"\x22" * 16, b"\xab" * 4)
    )
    tail = entries + struct.pack("<H", len(entries) + 18) + FOOTER + bytes(32)
    fw[len(fw) - len(tail) :] = tail
    return bytes(fw)


def block(tag: bytes, gpa: int) -> bytes:
    return tag.ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)


def test_mrtd_is_one_hash_over_page_adds_and_extends() -> None:
    fw = build_tdvf()
    assert [s.type for s in tdvf_sections(fw)] == [0, 1, 2, 3]
    h = hashlib.sha384()
    for base, data_off in ((0xFFFFF000, 0x0000), (0xFFFFE000, 0x1000)):
        h.update(block(b"MEM.PAGE.ADD", base))
        for c in range(0, 4096, 256):
            h.update(block(b"MR.EXTEND", base + c) + fw[data_off + c : data_off + c + 256])
    h.update(block(b"MEM.PAGE.ADD", 0x00809000))
    h.update(block(b"MEM.PAGE.ADD", 0x0080A000))
    assert mrtd_from_tdvf(fw) == h.digest()
    # one page per section: QEMU 8's order (adds, then extends) is the same here
    assert mrtd_from_tdvf(fw, interleaved=False) == h.digest()
    # a measured byte moves it; an unmeasured byte does not
    moved = bytearray(fw)
    moved[0x123] ^= 1
    assert mrtd_from_tdvf(bytes(moved)) != h.digest()
    still = bytearray(fw)
    still[0x2800] ^= 1
    assert mrtd_from_tdvf(bytes(still)) == h.digest()


def test_mrtd_refusals() -> None:
    fw = build_tdvf()
    with pytest.raises(MeasureError, match="footer"):
        mrtd_from_tdvf(bytes(100))
    no_meta = bytearray(fw)
    at = fw.index(TDX_META)
    no_meta[at : at + 16] = b"\x33" * 16
    with pytest.raises(MeasureError, match="no TDX metadata"):
        mrtd_from_tdvf(bytes(no_meta))
    bad_sig = bytearray(fw)
    bad_sig[0x2000:0x2004] = b"XXXX"
    with pytest.raises(MeasureError, match="no TDVF descriptor"):
        mrtd_from_tdvf(bytes(bad_sig))
    beyond = bytearray(fw)
    struct.pack_into("<I", beyond, 0x2000 + 16 + 32 + 4, 0x10000)  # CFV raw size
    with pytest.raises(MeasureError, match="beyond the file"):
        mrtd_from_tdvf(bytes(beyond))


def test_debian_ovmf_tdvf_metadata_parses() -> None:
    # Debian's 2 MiB OVMF.fd carries TDX metadata (the 4 MiB split build does not)
    fw_path = Path("/usr/share/ovmf/OVMF.fd")
    if not fw_path.is_file():
        pytest.skip("ovmf is not installed")
    fw = fw_path.read_bytes()
    sections = tdvf_sections(fw)
    assert {s.type for s in sections} >= {0, 1, 2}  # BFV, CFV, TD_HOB
    assert len(mrtd_from_tdvf(fw)) == 48
    with pytest.raises(MeasureError, match="no TDX metadata"):
        tdvf_sections(Path("/usr/share/OVMF/OVMF_CODE_4M.fd").read_bytes())
