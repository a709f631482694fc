"""The pure and fast parts of the GCP disk: layouts, the UKI, a bake of a small fake image
(two bakes byte-identical), reading the UKI back, and `trust measure --disk` refusals."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import struct
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ee.agent.config import ConfigError, _cmdline_params, _measurement_flag
from ee.attestation.measure import authenticode, predict_uki
from ee.image.disk import (
    BAKE_TOOLS,
    ESP_TYPE,
    GIB,
    MIB,
    ROOT_TYPE,
    STUB,
    VERITY_TYPE,
    bake_gcp,
    build_uki,
    disk_cmdline,
    gpt_layout,
    pe_checksum,
    pe_sections,
    read_gpt,
    read_uki,
    section_data,
    uki_layout,
    uki_parts,
)
from ee.image.errors import BuildFailed
from ee.image.qemu import DiskVmSpec, disk_qemu_command

from .conftest import require_tools

ROOT_HASH = hashlib.sha256(b"root").hexdigest()


def test_disk_cmdline_names_partitions_by_type_and_label() -> None:
    direct = ("console=ttyS0 panic=1 ee.root=/dev/vda ee.verity.roothash=aa "
              "ee.verity.hash_start=45421 ee.verity.data_blocks=45421")
    out = disk_cmdline(direct).split()
    assert "ee.root=/dev/vda" not in out and "ee.verity.hash_start=45421" not in out
    assert f"ee.root=GPT:{ROOT_TYPE}:ee-root" in out
    assert f"ee.verity.hashdev=GPT:{VERITY_TYPE}:ee-verity" in out
    assert {"ee.verity.hash_start=0", "systemd.gpt_auto=0", "ee.verity.roothash=aa",
            "ee.verity.data_blocks=45421"} <= set(out)
    assert disk_cmdline(" ".join(out)) == " ".join(out)  # idempotent


def test_uki_layout_is_aligned_and_disjoint() -> None:
    rvas = uki_layout(0x19300, [10, 0x1000, 1, 5 * MIB])
    assert rvas[0] == 0x1A000 and all(r % 0x1000 == 0 for r in rvas)
    sizes = [10, 0x1000, 1, 5 * MIB]
    for (a, size), b in zip(zip(rvas, sizes, strict=True), rvas[1:], strict=False):
        assert a + size <= b


def test_gpt_layout() -> None:
    disk, guid, parts = gpt_layout(64 * MIB, 186 * MIB + 4096, 2 * MIB, ROOT_HASH)
    assert disk == GIB and [p.label for p in parts] == ["ESP", "ee-root", "ee-verity"]
    assert [p.type for p in parts] == [ESP_TYPE, ROOT_TYPE, VERITY_TYPE]
    assert parts[0].offset == MIB and all(p.offset % MIB == 0 for p in parts)
    for a, b in itertools.pairwise(parts):
        assert a.offset + a.size == b.offset
    assert parts[-1].offset + parts[-1].size + 33 * 512 <= disk  # room for the backup GPT
    # the root's and the tree's GUIDs are the root hash's halves (as systemd-repart does)
    assert parts[1].guid.replace("-", "") == ROOT_HASH[:32]
    assert parts[2].guid.replace("-", "") == ROOT_HASH[32:]
    assert gpt_layout(64 * MIB, MIB, MIB, ROOT_HASH) == gpt_layout(64 * MIB, MIB, MIB, ROOT_HASH)
    assert guid != gpt_layout(64 * MIB, MIB, MIB, "00" * 32)[1]
    with pytest.raises(BuildFailed, match="exceeds"):
        gpt_layout(64 * MIB, 70 * GIB, MIB, ROOT_HASH)


@pytest.fixture
def stub() -> Path:
    require_tools(BAKE_TOOLS)
    if not STUB.is_file():
        pytest.skip(f"{STUB} is missing (apt-get install systemd-boot-efi)")
    return STUB


def test_pe_checksum_matches_the_linkers(stub: Path) -> None:
    data = stub.read_bytes()
    off = struct.unpack_from("<I", data, 0x3C)[0] + 24 + 64
    assert pe_checksum(data) == struct.unpack_from("<I", data, off)[0]


def test_uki_sections_round_trip(stub: Path, tmp_path: Path) -> None:
    parts = {".linux": stub.read_bytes(), ".osrel": b"ID=x\n", ".cmdline": b"console=ttyS0",
             ".initrd": b"\x1f\x8b" + bytes(5000)}
    uki = build_uki(stub, parts, tmp_path)
    assert uki_parts(uki) == parts
    _, sections = pe_sections(uki)
    names = [s.name for s in sections]
    assert names[-4:] == [".linux", ".osrel", ".cmdline", ".initrd"]  # the stub's order
    off = struct.unpack_from("<I", uki, 0x3C)[0]
    assert struct.unpack_from("<I", uki, off + 8)[0] == 0  # no timestamp
    assert struct.unpack_from("<I", uki, off + 24 + 64)[0] == pe_checksum(uki)
    assert build_uki(stub, parts, tmp_path) == uki
    authenticode(uki, "sha256")  # a well-formed PE
    with pytest.raises(BuildFailed, match="already has sections"):
        build_uki(stub, {".sbat": b"x"}, tmp_path)


def fake_image(d: Path, stub: Path) -> Path:
    """An image directory as `eectl image build` writes it, with tiny artefacts (the
    stub stands in for the kernel: any PE will do for the disk layout)."""
    d.mkdir()
    kernel, initrd = stub.read_bytes(), b"\x1f\x8b" + b"initrd" * 100
    root = bytes(range(256)) * 64 + b"T" * 4096  # 16 KiB "squashfs" + 4 KiB "tree"
    (d / "vmlinuz").write_bytes(kernel)
    (d / "initrd.img").write_bytes(initrd)
    (d / "root.img").write_bytes(root)
    (d / "cmdline").write_text(f"console=ttyS0 ee.root=/dev/vda ee.verity.roothash={ROOT_HASH}"
                               " ee.verity.hash_start=4\n")
    art = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
           for n, b in (("vmlinuz", kernel), ("initrd.img", initrd), ("root.img", root))}
    (d / "manifest.json").write_text(json.dumps({
        "profile": "agent", "root_hash": ROOT_HASH, "source_date_epoch": 1_700_000_000,
        "verity": {"hash_offset": 16384}, "artefacts": art}))
    return d


@pytest.mark.slow  # three bakes: three GiB of disk through gzip
def test_fake_bake_is_reproducible_and_reads_back(stub: Path, tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img", stub)
    a = bake_gcp(image, tmp_path / "a.tar.gz", name="n", family="f")
    b = bake_gcp(image, tmp_path / "b.tar.gz", name="n", family="f")
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    assert a.info == b.info and a.disk_size == GIB
    uki, gpt = read_uki(tmp_path / "a.tar.gz")
    assert hashlib.sha256(uki).hexdigest() == a.info["uki_sha256"]
    assert [p.label for p in gpt.partitions] == ["ESP", "ee-root", "ee-verity"]
    sections = uki_parts(uki)
    assert sections[".cmdline"].decode() == a.info["cmdline"]
    assert sections[".linux"] == stub.read_bytes()
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        member = tar.getmember("disk.raw")
        data = tar.extractfile(member)
        assert data is not None
        disk = data.read()
    root, tree = gpt.partitions[1], gpt.partitions[2]
    raw = (image / "root.img").read_bytes()
    assert disk[root.offset:root.offset + 16384] == raw[:16384]
    assert disk[tree.offset:tree.offset + 4096] == raw[16384:]
    prediction = predict_uki(uki, sections, gpt.event_data())
    assert prediction.registers["pcr12"] == bytes(32)
    # another name in .osrel is another UKI: another PCR4
    c = bake_gcp(image, tmp_path / "c.tar.gz", name="other", family="f")
    assert c.info["uki_sha256"] != a.info["uki_sha256"]


def test_bake_refuses_an_image_that_does_not_match_its_manifest(stub: Path,
                                                                tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img", stub)
    (image / "initrd.img").write_bytes(b"changed")
    with pytest.raises(BuildFailed, match="does not match manifest"):
        bake_gcp(image, tmp_path / "a.tar.gz", name="n", family="f")


def measure(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ee.ctl.main", "trust", "measure", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


def test_measure_disk_refuses_what_is_not_a_baked_disk(tmp_path: Path) -> None:
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        info = tarfile.TarInfo("evil.raw")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    done = measure("--disk", str(other))
    assert done.returncode == 1 and "not disk.raw" in done.stderr
    (tmp_path / "zeros.raw").write_bytes(bytes(1 << 16))
    done = measure("--disk", str(tmp_path / "zeros.raw"))
    assert done.returncode == 1 and "no GPT header" in done.stderr
    done = measure("--disk", str(tmp_path / "zeros.raw"), "--image", str(tmp_path))
    assert done.returncode == 2


def hostile_gpt(label: bytes, type_guid: str = "0fc63daf-8483-4772-8e79-3d69d8477de4"
                ) -> bytes:
    """A 34-sector disk whose GPT has one entry with the raw UTF-16 *label* bytes."""
    disk = bytearray(34 * 512)
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<I", header, 12, 92)
    struct.pack_into("<QII", header, 72, 2, 1, 128)
    disk[512:604] = header
    entry = bytearray(128)
    entry[:16] = uuid.UUID(type_guid).bytes_le
    entry[16:32] = uuid.UUID(int=1).bytes_le
    struct.pack_into("<QQ", entry, 32, 34, 2047)
    entry[56:56 + len(label)] = label
    disk[1024:1152] = entry
    return bytes(disk)


def test_a_gpt_label_that_is_not_utf16_is_read_not_a_traceback(tmp_path: Path) -> None:
    lone = b"\x00\xd8" + "EE".encode("utf-16-le")  # a high surrogate with no pair
    gpt = read_gpt(hostile_gpt(lone))
    assert gpt.partitions[0].label == "\ufffdEE"
    (tmp_path / "d.raw").write_bytes(hostile_gpt(lone, ESP_TYPE))
    done = measure("--disk", str(tmp_path / "d.raw"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr


def tiny_pe(vsize: int, name: bytes = b".linux", opt_size: int = 240) -> bytes:
    """A minimal PE32+ header with one section (*name*, VirtualSize *vsize*)."""
    pe = bytearray(0x40 + 24 + opt_size + 40 + 16)
    pe[:2] = b"MZ"
    struct.pack_into("<I", pe, 0x3C, 0x40)
    pe[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<HH", pe, 0x44, 0x8664, 1)
    struct.pack_into("<H", pe, 0x40 + 20, opt_size)
    struct.pack_into("<H", pe, 0x40 + 24, 0x20B)
    s = 0x40 + 24 + opt_size
    pe[s:s + len(name)] = name
    struct.pack_into("<IIII", pe, s + 8, vsize, 0x1000, 16, len(pe) - 16)
    return bytes(pe)


def test_a_hostile_pe_is_refused_with_a_build_error() -> None:
    assert uki_parts(tiny_pe(16)) == {".linux": bytes(16)}
    for truncated in (b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"PE\0\0",
                      b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"PE\0\0" + bytes(18),
                      tiny_pe(16)[:0x40 + 24 + 30]):
        with pytest.raises(BuildFailed, match=r"truncated|beyond"):
            pe_sections(truncated)
    with pytest.raises(BuildFailed, match=r"VirtualSize|over 256 MiB"):
        uki_parts(tiny_pe(0xFFFFFFF0))  # no 4 GiB allocation
    (huge,) = pe_sections(tiny_pe(0xFFFFFFF0))[1]
    with pytest.raises(BuildFailed, match="VirtualSize"):
        section_data(tiny_pe(0xFFFFFFF0), huge)


def test_bake_refuses_a_command_line_measure_would_refuse(stub: Path, tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img", stub)
    cmdline = (image / "cmdline").read_text().strip() + " ee.note=caf\u00e9"
    (image / "cmdline").write_text(cmdline + "\n")
    manifest = json.loads((image / "manifest.json").read_text())
    with pytest.raises(BuildFailed, match="cannot be measured"):
        bake_gcp(image, tmp_path / "a.tar.gz", name="n", family="f")
    assert not (tmp_path / "a.tar.gz").exists() and manifest


def test_disk_qemu_command_boots_the_disk_over_nvme() -> None:
    spec = DiskVmSpec(disk=Path("/d.raw"), serial_log=Path("/s"), ovmf_code=Path("/c"),
                      ovmf_vars=Path("/v"), agent_port=4000)
    argv = disk_qemu_command(spec)
    assert "-kernel" not in argv and "-append" not in argv
    assert "nvme,drive=boot0,serial=ee-boot,bootindex=0" in argv
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:4000-:8080" in argv
    assert "virtio-net-pci,netdev=net0,romfile=" in argv


# --- the image's GCP metadata config unit (run on the host with its paths redirected) ---

SCRIPT = Path(__file__).resolve().parents[2] / "image/rootfs/usr/lib/easyenclave/ee-gcp-config"


@pytest.fixture
def metadata_server() -> Iterator[tuple[str, dict[str, object]]]:
    """A loopback metadata server: serves ``state["body"]`` (bytes, or None for 404)
    with ``Metadata-Flavor: state["flavor"]``."""
    state: dict[str, object] = {"body": None, "flavor": "Google"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = state["body"]
            if self.headers.get("Metadata-Flavor") != "Google" or body is None:
                self.send_response(404 if body is None else 403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            assert isinstance(body, bytes)
            self.send_response(200)
            self.send_header("Metadata-Flavor", str(state["flavor"]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/attr", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_config_unit(tmp: Path, url: str, *, product: str = "Google Compute Engine",
                    cmdline: str = "console=ttyS0") -> tuple[int, str, Path]:
    (tmp / "product").write_text(product + "\n")
    (tmp / "cmdline").write_text(cmdline + "\n")
    out = tmp / "run" / "config.json"
    env = {"EE_DMI_PRODUCT": str(tmp / "product"), "EE_CMDLINE": str(tmp / "cmdline"),
           "EE_GCP_METADATA_URL": url, "EE_GCP_CONFIG_OUT": str(out),
           "EE_GCP_METADATA_DEADLINE": "2", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["/usr/bin/python3", str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    return done.returncode, done.stdout + done.stderr, out


def test_gcp_config_unit(metadata_server: tuple[str, dict[str, object]],
                         tmp_path: Path) -> None:
    url, state = metadata_server
    config = {"cp_url": "wss://cp/api/v2/agents/connect", "bootstrap_token": "t0k"}
    state["body"] = json.dumps(config).encode()
    code, out, path = run_config_unit(tmp_path, url)
    assert code == 0 and json.loads(path.read_text()) == config, out
    assert path.stat().st_mode & 0o777 == 0o600
    path.unlink()
    # not on GCP / measurement mode on the measured cmdline: metadata is not read
    for kw in ({"product": "Standard PC (Q35 + ICH9, 2009)"},
               {"cmdline": "console=ttyS0 easyenclave.measurement=1"}):
        code, out, path = run_config_unit(tmp_path, url, **kw)  # type: ignore[arg-type]
        assert code == 0 and not path.exists(), out
    # refused answers: no Google flavour, measurement mode asked by metadata, not an object
    for body, flavor in ((json.dumps(config).encode(), "Other"),
                         (json.dumps({**config, "measurement_mode": True}).encode(), "Google"),
                         (b"[1]", "Google"), (b"x" * (65 * 1024), "Google")):
        state["body"], state["flavor"] = body, flavor
        code, out, path = run_config_unit(tmp_path, url)
        assert code == 1 and not path.exists(), out
    state["body"] = None  # no item: nothing, and no failure
    code, out, path = run_config_unit(tmp_path, url)
    assert code == 0 and "no ee-agent-config" in out and not path.exists()


MEASURING = ["easyenclave.measurement=1", "easyenclave.measurement", "easyenclave.measurement=",
             "easyenclave.measurement=true", "easyenclave.measurement=yes",
             "easyenclave.measurement=on"]  # one the agent refuses: no metadata either
NOT_MEASURING = ["easyenclave.measurement=0", "easyenclave.measurement=false",
                 "easyenclave.measurement=no", "easyenclave.measurementx=1",
                 "xeasyenclave.measurement=1"]


def test_gcp_config_unit_follows_the_agents_measurement_rule(
        metadata_server: tuple[str, dict[str, object]], tmp_path: Path) -> None:
    """Every spelling the agent takes as measurement mode keeps the metadata out."""
    url, state = metadata_server
    config = {"cp_url": "wss://cp/api/v2/agents/connect", "bootstrap_token": "t0k"}
    state["body"] = json.dumps(config).encode()
    for flag in MEASURING:
        cmdline = f"console=ttyS0 {flag} quiet"
        try:
            assert _measurement_flag(_cmdline_params(cmdline))
        except ConfigError:
            pass  # the agent refuses to start on it
        code, out, path = run_config_unit(tmp_path, url, cmdline=cmdline)
        assert code == 0 and "measurement mode" in out and not path.exists(), (flag, out)
    for flag in NOT_MEASURING:
        cmdline = f"console=ttyS0 {flag}"
        assert not _measurement_flag(_cmdline_params(cmdline))
        code, out, path = run_config_unit(tmp_path, url, cmdline=cmdline)
        assert code == 0 and json.loads(path.read_text()) == config, (flag, out)
        path.unlink()
