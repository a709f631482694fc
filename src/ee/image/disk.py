"""``eectl image bake-gcp``: the measured image as a UEFI-bootable GPT disk for GCP.

Theory of operation
-------------------

A GCP confidential VM boots a disk through its UEFI firmware; it never takes a kernel
from the host. So the direct-kernel artefacts of an image build (``vmlinuz``,
``initrd.img``, ``cmdline``, ``root.img`` = squashfs + appended dm-verity tree) are
re-packed, not rebuilt:

1. **UKI** — one PE/COFF EFI application: the systemd EFI stub
   (``/usr/lib/systemd/boot/efi/linuxx64.efi.stub``, package ``systemd-boot-efi``; its
   own sections end below RVA 0x1a000) with four sections appended by ``objcopy``, in
   the order systemd-stub measures them (``.linux``, ``.osrel``, ``.cmdline``,
   ``.initrd``), each at the next 4 KiB-aligned RVA after the previous one
   (:func:`uki_layout`; the stub's ImageBase is 0, so RVA = VMA). ``.cmdline`` is the
   image's command line with ``ee.root``/``ee.verity.hashdev`` naming GPT partitions
   instead of ``/dev/vda`` and ``ee.verity.hash_start=0`` (the tree has its own
   partition); no trailing newline. objcopy stamps the PE header with the current time:
   TimeDateStamp is set to 0 and the PE checksum recomputed, so equal inputs give
   equal bytes. The UKI's Authenticode digest covers every section, so the firmware's
   measurement of the UKI (PCR4 / RTMR1) binds kernel, initrd and the root hash.
2. **ESP** — a FAT file system (``mkfs.vfat --invariant``, fixed volume id, mtools with
   ``SOURCE_DATE_EPOCH``) holding only ``/EFI/BOOT/BOOTX64.EFI`` (the removable-media
   path every UEFI boots without a boot entry).
3. **disk.raw** — GPT written by ``sgdisk`` on a plain file (no loop devices), 1 MiB
   aligned, with fixed GUIDs derived from the root hash: ``ESP`` (EFI system type),
   ``ee-root`` (the squashfs, type "root x86-64" of the Discoverable Partitions
   Specification) and ``ee-verity`` (its hash tree, type "root x86-64 verity"). The
   initramfs finds root and tree by GPT name *and* type on any disk; which disk or
   which partition number does not matter. The file is a whole number of GiB (GCP
   requires it) and sparse.
4. **FILE.tar.gz** — ``disk.raw`` alone in a GNU-format tar (mtime = the image's
   SOURCE_DATE_EPOCH, uid/gid 0, no user names), gzip'd without name or timestamp in
   its header: what ``images.insert`` imports. ``FILE.tar.gz.json`` beside it records
   the digests ``publish-gcp`` and ``trust measure`` use.

Everything here is a function of the image directory and the stub file: two bakes of
the same inputs are byte-identical (``tests/image/test_gcp_disk.py`` checks it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from ee.attestation.measure import MeasureError, load_options_data
from ee.image.errors import BuildFailed, ToolMissing
from ee.image.manifest import sha256_file

__all__ = [
    "BAKE_TOOLS",
    "ESP_TYPE",
    "ROOT_LABEL",
    "ROOT_TYPE",
    "STUB",
    "UKI_SECTIONS",
    "VERITY_LABEL",
    "VERITY_TYPE",
    "BakeResult",
    "GptPartition",
    "bake_gcp",
    "disk_cmdline",
    "gpt_layout",
    "pe_checksum",
    "pe_sections",
    "read_disk_prefix",
    "read_gpt",
    "read_uki",
    "section_data",
    "uki_layout",
    "uki_parts",
]

BAKE_TOOLS: dict[str, str] = {
    "sgdisk": "gdisk",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "objcopy": "binutils",
}
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
# Discoverable Partitions Specification (uapi-group.org) type GUIDs
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
ROOT_TYPE = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"  # root, x86-64
VERITY_TYPE = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5"  # root verity, x86-64
ESP_LABEL, ROOT_LABEL, VERITY_LABEL = "ESP", "ee-root", "ee-verity"
UKI_PATH = "/EFI/BOOT/BOOTX64.EFI"
#: systemd-stub's section list, in the order it measures them into PCR11
UKI_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd")
SECTOR = 512
MIB = 1 << 20
GIB = 1 << 30
ESP_MIN = 64 * MIB
GPT_ENTRIES = 128
MAX_DISK = 64 * GIB
MAX_ESP_READ = 256 * MIB


@attrs.frozen
class BakeResult:
    out: Path
    info: dict[str, Any]
    disk_size: int


# --- pure parts --------------------------------------------------------------------


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def disk_cmdline(cmdline: str) -> str:
    """The image's direct-boot command line for the disk: the root and hash tree named
    by GPT type and label, the tree at block 0 of its partition, gpt-auto off (systemd
    must not mount partitions it discovers by type)."""
    kept = [w for w in cmdline.split()
            if not w.startswith(("ee.root=", "ee.verity.hashdev=", "ee.verity.hash_start=",
                                 "systemd.gpt_auto="))]
    return " ".join([*kept, f"ee.root=GPT:{ROOT_TYPE}:{ROOT_LABEL}",
                     f"ee.verity.hashdev=GPT:{VERITY_TYPE}:{VERITY_LABEL}",
                     "ee.verity.hash_start=0", "systemd.gpt_auto=0"])


def uki_layout(stub_size_of_image: int, sizes: Sequence[int],
               align: int = 0x1000) -> list[int]:
    """RVAs for sections of *sizes* appended after a stub whose SizeOfImage is given."""
    out, at = [], _align(stub_size_of_image, align)
    for size in sizes:
        out.append(at)
        at = _align(at + max(size, 1), align)
    return out


@attrs.frozen
class PeSection:
    name: str
    virtual_size: int
    rva: int
    raw_size: int
    raw_ptr: int


def pe_sections(pe: bytes) -> tuple[int, list[PeSection]]:
    """(SizeOfImage, sections) of a PE32+ image (BuildFailed when it is not one)."""
    try:
        return _pe_sections(pe)
    except struct.error:  # a header field beyond the end of a truncated file
        raise BuildFailed("uki", "truncated PE image (headers beyond the file)") from None


def _pe_sections(pe: bytes) -> tuple[int, list[PeSection]]:
    if pe[:2] != b"MZ" or len(pe) < 0x40:
        raise BuildFailed("uki", "not a PE image")
    off = struct.unpack_from("<I", pe, 0x3C)[0]
    if pe[off:off + 4] != b"PE\0\0":
        raise BuildFailed("uki", "no PE signature")
    count, opt_size = struct.unpack_from("<H", pe, off + 6)[0], struct.unpack_from(
        "<H", pe, off + 20)[0]
    opt = off + 24
    size_of_image = struct.unpack_from("<I", pe, opt + 56)[0]
    table = opt + opt_size
    sections = []
    for i in range(count):
        s = table + 40 * i
        if s + 40 > len(pe):
            raise BuildFailed("uki", "section table beyond the file")
        name = pe[s:s + 8].rstrip(b"\0").decode("ascii", "replace")
        vsize, rva, rsize, rptr = struct.unpack_from("<IIII", pe, s + 8)
        sections.append(PeSection(name, vsize, rva, rsize, rptr))
    return size_of_image, sections


def section_data(pe: bytes, section: PeSection) -> bytes:
    """What the loader maps for *section*: its raw bytes, cut or zero-filled to
    VirtualSize (systemd-stub measures exactly this). BuildFailed above the ESP read
    cap: a hostile VirtualSize must not make us allocate gigabytes."""
    if section.virtual_size > MAX_ESP_READ:
        raise BuildFailed("uki", f"section {section.name} has a VirtualSize of "
                          f"{section.virtual_size} bytes (over {MAX_ESP_READ >> 20} MiB)")
    raw = pe[section.raw_ptr:section.raw_ptr + min(section.raw_size, section.virtual_size)]
    return raw.ljust(section.virtual_size, b"\0")


def pe_checksum(pe: bytes) -> int:
    """The PE optional header CheckSum of *pe* (the field itself counted as zero)."""
    off = struct.unpack_from("<I", pe, 0x3C)[0] + 24 + 64
    data = pe[:off] + b"\0\0\0\0" + pe[off + 4:]
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("<H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return (total + len(pe)) & 0xFFFFFFFF


def _fix_header(pe: bytearray) -> None:
    off = struct.unpack_from("<I", pe, 0x3C)[0]
    struct.pack_into("<I", pe, off + 8, 0)  # TimeDateStamp
    struct.pack_into("<I", pe, off + 24 + 64, pe_checksum(bytes(pe)))


@attrs.frozen
class GptPartition:
    number: int
    label: str
    type: str
    guid: str
    first_lba: int
    last_lba: int

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * SECTOR


def _guid(seed: str, root_hash: str) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(f"{seed}:{root_hash}".encode()).digest()[:16],
                         version=4))


def gpt_layout(esp: int, root: int, verity: int, root_hash: str) -> tuple[int, str,
                                                                          list[GptPartition]]:
    """(disk size, disk GUID, partitions): 1 MiB aligned, the disk a whole number of GiB
    with room for the backup GPT; GUIDs derived from the root hash (the root's and the
    tree's are the hash's halves, as systemd-repart names verity pairs)."""
    parts, at = [], MIB
    h = bytes.fromhex(root_hash)
    specs = ((ESP_LABEL, ESP_TYPE, esp, _guid("esp", root_hash)),
             (ROOT_LABEL, ROOT_TYPE, root, str(uuid.UUID(bytes=h[:16]))),
             (VERITY_LABEL, VERITY_TYPE, verity, str(uuid.UUID(bytes=h[16:32]))))
    for number, (label, ptype, size, guid) in enumerate(specs, start=1):
        size = _align(size, MIB)
        parts.append(GptPartition(number, label, ptype, guid, at // SECTOR,
                                  (at + size) // SECTOR - 1))
        at += size
    disk = _align(at + MIB, GIB)
    if disk > MAX_DISK:
        raise BuildFailed("disk", f"a disk of {disk} bytes exceeds {MAX_DISK}")
    return disk, _guid("disk", root_hash), parts


# --- tools -------------------------------------------------------------------------


def _check_tools() -> None:
    missing = [t for t in BAKE_TOOLS if shutil.which(t) is None]
    if missing:
        raise ToolMissing(missing, [BAKE_TOOLS[t] for t in missing])


def _run(step: str, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, env=env,
                              check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildFailed(step, f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise BuildFailed(step, f"{' '.join(argv[:2])} ... exited {done.returncode}: {tail}")
    return done.stdout


def _env(epoch: int) -> dict[str, str]:
    return {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "TZ": "UTC", "LC_ALL": "C",
            "MTOOLS_SKIP_CHECK": "1"}


# --- steps -------------------------------------------------------------------------


def build_uki(stub: Path, parts: dict[str, bytes], work: Path) -> bytes:
    """The UKI: *stub* with *parts* (name -> bytes, names from UKI_SECTIONS) appended."""
    stub_bytes = stub.read_bytes()
    size_of_image, existing = pe_sections(stub_bytes)
    clash = {s.name for s in existing} & set(parts)
    if clash:
        raise BuildFailed("uki", f"the stub already has sections {sorted(clash)}")
    names = [n for n in UKI_SECTIONS if n in parts]
    rvas = uki_layout(size_of_image, [len(parts[n]) for n in names])
    argv = ["objcopy"]
    for name, rva in zip(names, rvas, strict=True):
        path = work / f"section{name}"
        path.write_bytes(parts[name])
        argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={rva:#x}",
                 "--set-section-flags", f"{name}=data,readonly"]
    out = work / "uki.efi"
    _run("uki", [*argv, str(stub), str(out)])
    pe = bytearray(out.read_bytes())
    _fix_header(pe)
    _, sections = pe_sections(bytes(pe))
    for name in names:
        found = [s for s in sections if s.name == name]
        if len(found) != 1 or section_data(bytes(pe), found[0]) != parts[name]:
            raise BuildFailed("uki", f"objcopy did not lay out {name} as asked")
    return bytes(pe)


def _esp(uki: bytes, size: int, volume_id: str, work: Path, epoch: int) -> Path:
    img = work / "esp.img"
    with img.open("wb") as f:
        f.truncate(size)
    env = _env(epoch)
    _run("esp", ["mkfs.vfat", "--invariant", "-i", volume_id, "-n", "ESP", str(img)], env)
    src = work / "BOOTX64.EFI"
    src.write_bytes(uki)
    os.utime(src, (epoch, epoch))
    _run("esp", ["mmd", "-i", str(img), "::/EFI", "::/EFI/BOOT"], env)
    _run("esp", ["mcopy", "-m", "-i", str(img), str(src), "::" + UKI_PATH], env)
    return img


def _copy_into(dst: IO[bytes], offset: int, src: Path, start: int = 0,
               length: int | None = None) -> None:
    dst.seek(offset)
    with src.open("rb") as f:
        f.seek(start)
        left = length if length is not None else src.stat().st_size - start
        while left > 0:
            chunk = f.read(min(left, 4 * MIB))
            if not chunk:
                raise BuildFailed("disk", f"{src} is shorter than expected")
            dst.write(chunk)
            left -= len(chunk)


def _sgdisk(disk: Path, disk_guid: str, parts: list[GptPartition]) -> None:
    argv = ["sgdisk", "--clear", "--disk-guid", disk_guid]
    for p in parts:
        argv += ["--new", f"{p.number}:{p.first_lba}:{p.last_lba}",
                 "--typecode", f"{p.number}:{p.type}", "--partition-guid",
                 f"{p.number}:{p.guid}", "--change-name", f"{p.number}:{p.label}"]
    _run("gpt", [*argv, str(disk)])


def pack_tar(disk: Path, out: Path, epoch: int) -> None:
    """*disk* as ``disk.raw``, alone, in a GNU tar, gzip'd with no name or time."""
    info = tarfile.TarInfo("disk.raw")
    info.size = disk.stat().st_size
    info.mtime = epoch
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar, \
            disk.open("rb") as f:
        tar.addfile(info, f)
    tmp.replace(out)


def _read_image(image: Path) -> tuple[dict[str, Any], bytes, bytes, str, Path]:
    try:
        manifest = json.loads((image / "manifest.json").read_text())
        kernel = (image / "vmlinuz").read_bytes()
        initrd = (image / "initrd.img").read_bytes()
        cmdline = (image / "cmdline").read_text().strip()
    except (OSError, ValueError) as exc:
        raise BuildFailed("inputs", f"{image} is not a built image ({exc})") from None
    root = image / "root.img"
    try:
        for name, data in (("vmlinuz", kernel), ("initrd.img", initrd)):
            if hashlib.sha256(data).hexdigest() != manifest["artefacts"][name]["sha256"]:
                raise BuildFailed("inputs", f"{image / name} does not match manifest.json")
        if not root.is_file() or \
                root.stat().st_size != manifest["artefacts"]["root.img"]["size"]:
            raise BuildFailed("inputs", f"{root} does not match manifest.json")
        missing = [k for k in ("profile", "root_hash", "source_date_epoch") if k not in manifest]
        if missing:
            raise KeyError(missing[0])
        int(manifest["verity"]["hash_offset"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BuildFailed("inputs", f"{image / 'manifest.json'}: malformed ({exc!r})") from None
    return manifest, kernel, initrd, cmdline, root


def os_release(manifest: dict[str, Any], name: str) -> bytes:
    return (f'NAME="EasyEnclave"\nID=easyenclave\nIMAGE_ID={name}\n'
            f'IMAGE_VERSION={manifest["root_hash"][:16]}\n'
            f'PRETTY_NAME="EasyEnclave agent ({manifest["profile"]})"\n').encode()


def bake_gcp(image: Path, out: Path, *, name: str, family: str, stub: Path = STUB,
             work_dir: Path | None = None) -> BakeResult:
    """Bake *image* (an ``eectl image build`` output) into *out* (``.tar.gz``) and
    ``out.json``; BuildFailed / ToolMissing on problems."""
    _check_tools()
    if not stub.is_file():
        raise ToolMissing(["linuxx64.efi.stub"], ["systemd-boot-efi"])
    manifest, kernel, initrd, cmdline, root = _read_image(image)
    verity = manifest["verity"]
    root_hash = manifest["root_hash"]
    if not re.fullmatch(r"[0-9a-f]{64}", root_hash):
        raise BuildFailed("inputs", "manifest root_hash is not a sha256")
    epoch = int(manifest["source_date_epoch"])
    hash_offset = int(verity["hash_offset"])
    tree_size = root.stat().st_size - hash_offset
    if hash_offset <= 0 or tree_size <= 0 or hash_offset % 4096:
        raise BuildFailed("inputs", "manifest verity offsets do not fit root.img")
    command = disk_cmdline(cmdline)
    try:
        load_options_data(command.encode())  # what `eectl trust measure --disk` will read
    except MeasureError as exc:
        raise BuildFailed("inputs", f"the command line cannot be measured: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="ee-bake-", dir=work_dir) as tmp:
        work = Path(tmp)
        uki = build_uki(stub, {".linux": kernel, ".osrel": os_release(manifest, name),
                               ".cmdline": command.encode(), ".initrd": initrd}, work)
        esp_size = max(ESP_MIN, _align(len(uki) * 2, MIB))
        disk_size, disk_guid, parts = gpt_layout(esp_size, hash_offset, tree_size, root_hash)
        esp = _esp(uki, parts[0].size, root_hash[:8], work, epoch)
        disk = work / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(disk_size)
        _sgdisk(disk, disk_guid, parts)
        with disk.open("r+b") as f:
            _copy_into(f, parts[0].offset, esp)
            _copy_into(f, parts[1].offset, root, 0, hash_offset)
            _copy_into(f, parts[2].offset, root, hash_offset, tree_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        pack_tar(disk, out, epoch)
        info = {
            "name": name, "family": family, "profile": manifest["profile"],
            "root_hash": root_hash, "source_date_epoch": epoch,
            "tar_sha256": sha256_file(out), "tar_size": out.stat().st_size,
            "disk_sha256": sha256_file(disk), "disk_size": disk_size,
            "uki_sha256": hashlib.sha256(uki).hexdigest(), "cmdline": command,
            "stub_sha256": sha256_file(stub),
            "partitions": [attrs.asdict(p) for p in parts],
        }
    Path(f"{out}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return BakeResult(out, info, disk_size)


# --- reading a baked disk back (eectl trust measure --disk) --------------------------


def read_disk_prefix(path: Path, limit: int) -> bytes:
    """The first *limit* bytes of a disk: ``disk.raw`` itself or the ``disk.raw`` member
    of a GCP ``.tar.gz`` (streamed: the rest is never decompressed)."""
    try:
        with path.open("rb") as f:
            magic = f.read(2)
        if magic != b"\x1f\x8b":
            with path.open("rb") as f:
                return f.read(limit)
        with tarfile.open(path, mode="r:gz") as tar:
            member = tar.next()
            if member is None or member.name != "disk.raw" or not member.isfile():
                raise BuildFailed("disk", f"{path}: the first member is not disk.raw")
            data = tar.extractfile(member)
            assert data is not None
            return data.read(limit)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BuildFailed("disk", f"{path}: {exc}") from None


@attrs.frozen
class GptRead:
    header: bytes  # HeaderSize bytes of the primary header
    entries: tuple[bytes, ...]  # the non-empty entries, in table order
    partitions: tuple[GptPartition, ...]

    def event_data(self) -> bytes:
        """UEFI_GPT_DATA as EDK2 measures it into PCR5 (EV_EFI_GPT_EVENT): the header,
        UINT64 partition count, the non-empty entries."""
        return self.header + struct.pack("<Q", len(self.entries)) + b"".join(self.entries)


def read_gpt(disk: bytes) -> GptRead:
    """The primary GPT of *disk* (a prefix of at least 34 sectors; BuildFailed)."""
    if len(disk) < 34 * SECTOR or disk[SECTOR:SECTOR + 8] != b"EFI PART":
        raise BuildFailed("disk", "no GPT header at LBA 1")
    header_size = struct.unpack_from("<I", disk, SECTOR + 12)[0]
    entries_lba, count, esize = struct.unpack_from("<QII", disk, SECTOR + 72)
    if not 92 <= header_size <= SECTOR or esize < 128 or count > 1024 or \
            entries_lba * SECTOR + count * esize > len(disk):
        raise BuildFailed("disk", "GPT header out of range")
    entries, parts = [], []
    for i in range(count):
        e = disk[entries_lba * SECTOR + i * esize:entries_lba * SECTOR + (i + 1) * esize]
        if e[:16] == bytes(16):
            continue
        entries.append(e)
        first, last = struct.unpack_from("<QQ", e, 32)
        label = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(GptPartition(i + 1, label, str(uuid.UUID(bytes_le=e[:16])),
                                  str(uuid.UUID(bytes_le=e[16:32])), first, last))
    return GptRead(disk[SECTOR:SECTOR + header_size], tuple(entries), tuple(parts))


def read_uki(path: Path) -> tuple[bytes, GptRead]:
    """(the UKI on the ESP, the GPT) of a baked disk or its ``.tar.gz``."""
    head = read_disk_prefix(path, 64 * SECTOR)
    gpt = read_gpt(head)
    esps = [p for p in gpt.partitions if p.type == ESP_TYPE]
    if len(esps) != 1:
        raise BuildFailed("disk", f"{path}: {len(esps)} EFI system partitions (want one)")
    esp = esps[0]
    if esp.size > MAX_ESP_READ:
        raise BuildFailed("disk", f"{path}: the ESP is larger than {MAX_ESP_READ >> 20} MiB")
    disk = read_disk_prefix(path, esp.offset + esp.size)
    if len(disk) < esp.offset + esp.size:
        raise BuildFailed("disk", f"{path}: truncated before the end of the ESP")
    with tempfile.TemporaryDirectory(prefix="ee-measure-") as tmp:
        img = Path(tmp) / "esp.img"
        img.write_bytes(disk[esp.offset:esp.offset + esp.size])
        try:
            done = subprocess.run(["mcopy", "-n", "-i", str(img), "::" + UKI_PATH,
                                   str(Path(tmp) / "uki.efi")], capture_output=True,
                                  text=True, timeout=60, check=False,
                                  env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildFailed("disk", f"mcopy: {exc}") from None
        if done.returncode != 0:
            raise BuildFailed("disk", f"{path}: no {UKI_PATH} on the ESP "
                              f"({done.stderr.strip()[-200:]})")
        return (Path(tmp) / "uki.efi").read_bytes(), gpt


def uki_parts(uki: bytes) -> dict[str, bytes]:
    """The UKI's systemd-stub sections (name -> the bytes the stub measures)."""
    _, sections = pe_sections(uki)
    out: dict[str, bytes] = {}
    total = 0
    for s in sections:
        if s.name in UKI_SECTIONS:
            if s.name in out:
                raise BuildFailed("uki", f"two {s.name} sections")
            total += s.virtual_size
            if total > MAX_ESP_READ:
                raise BuildFailed("uki", f"the stub sections add up to over "
                                  f"{MAX_ESP_READ >> 20} MiB")
            out[s.name] = section_data(uki, s)
    return out
