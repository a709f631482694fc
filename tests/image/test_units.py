"""The pure parts of the image build: sources, module order, cpio, symlinks, argv."""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

import pytest

from ee.image.build import mirror_from_sources
from ee.image.errors import BuildFailed, ProfileError
from ee.image.initramfs import (
    CpioEntry,
    module_closure,
    parse_modules_dep,
    resolve_in_root,
    write_cpio,
)
from ee.image.manifest import diff_file_lists
from ee.image.profile import load_profile
from ee.image.qemu import VmSpec, choose_accel, qemu_command

DEB822 = """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_apt_sources() -> None:
    assert mirror_from_sources([DEB822], "bookworm") == "http://deb.debian.org/debian"
    assert mirror_from_sources([DEB822], "trixie") is None
    one_line = "deb [arch=amd64] http://mirror.example/debian/ bookworm main contrib\n"
    assert mirror_from_sources([one_line], "bookworm") == "http://mirror.example/debian"
    assert mirror_from_sources(["deb http://x/debian bookworm contrib\n"], "bookworm") is None


DEP = """kernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz \
kernel/lib/reed_solomon/reed_solomon.ko.xz kernel/drivers/md/dm-mod.ko.xz
kernel/drivers/md/dm-bufio.ko.xz: kernel/drivers/md/dm-mod.ko.xz
kernel/drivers/md/dm-mod.ko.xz:
kernel/lib/reed_solomon/reed_solomon.ko.xz:
kernel/fs/squashfs/squashfs.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
"""


def test_module_closure_orders_dependencies_first_and_skips_builtins() -> None:
    deps = parse_modules_dep(DEP)
    order = module_closure(["virtio_blk", "dm-verity", "squashfs"], deps,
                           ["kernel/drivers/block/virtio_blk.ko"])
    names = [p.rsplit("/", 1)[1] for p in order]
    assert "virtio_blk.ko.xz" not in names
    assert names.index("dm-mod.ko.xz") < names.index("dm-bufio.ko.xz") < \
        names.index("dm-verity.ko.xz")
    assert names.index("reed_solomon.ko.xz") < names.index("dm-verity.ko.xz")
    assert names[-1] == "squashfs.ko.xz"
    with pytest.raises(BuildFailed, match="not found"):
        module_closure(["nosuch"], deps, [])


def test_cpio_is_sorted_and_deterministic() -> None:
    entries = [CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
               CpioEntry("bin", stat.S_IFDIR | 0o755)]
    a = write_cpio(entries, 1234)
    assert a == write_cpio(list(reversed(entries)), 1234)
    raw = gzip.decompress(a)
    assert raw.startswith(b"070701")
    assert raw.index(b"bin\0") < raw.index(b"init\0")
    assert raw.rstrip(b"\0").endswith(b"TRAILER!!!")
    assert a != write_cpio(entries, 1235)


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/real.so").write_text("x")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "usr/lib/abs.so").symlink_to("/usr/lib/real.so")
    assert resolve_in_root(tmp_path, "/lib/abs.so") == "/usr/lib/real.so"
    (tmp_path / "usr/lib/up.so").symlink_to("../../../../etc/passwd")
    assert resolve_in_root(tmp_path, "/lib/up.so") == "/etc/passwd"  # inside the root


def test_profile_is_data_and_strict(tmp_path: Path) -> None:
    profile = load_profile("agent")
    assert "docker.io" in profile.packages and "python3" in profile.packages
    assert "dm-verity" in profile.kernel.initramfs_modules
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles/bad.json").write_text('{"name": "bad", "typo": 1}')
    with pytest.raises(ProfileError):
        load_profile("bad", tmp_path)
    with pytest.raises(ProfileError, match="bad profile name"):
        load_profile("../agent")


def test_qemu_command_forwards_only_loopback(tmp_path: Path) -> None:
    spec = VmSpec(kernel=tmp_path / "k", initrd=tmp_path / "i", root=tmp_path / "r",
                  cmdline="console=ttyS0", serial_log=tmp_path / "s", agent_port=18080,
                  tpm_socket=tmp_path / "tpm.sock",
                  fw_cfg=(("opt/easyenclave/sim-td.json", tmp_path / "sim"),))
    argv = qemu_command(spec)
    netdev = argv[argv.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:18080-:8080" in netdev
    assert "-no-reboot" in argv and "tpm-tis,tpmdev=tpm0" in argv
    assert f"file={tmp_path / 'r'},format=raw,if=virtio,readonly=on" in argv


def test_choose_accel(tmp_path: Path) -> None:
    assert choose_accel({"EE_QEMU_ACCEL": "kvm"}) == "kvm"
    assert choose_accel({}, dev_kvm=tmp_path / "nokvm") == "tcg"
    (tmp_path / "kvm_pvm").mkdir()
    assert choose_accel({}, sys_module=tmp_path) == "tcg"


def test_diff_file_lists_names_paths() -> None:
    a = ["aa\t100644\t0:0\t/etc/x", "bb\t100644\t0:0\t/etc/y"]
    b = ["aa\t100644\t0:0\t/etc/x", "cc\t100644\t0:0\t/etc/y", "dd\t100644\t0:0\t/etc/z"]
    assert diff_file_lists(a, b) == ["/etc/y", "/etc/z"]


def test_cli_reports_missing_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from ee.ctl import image

    monkeypatch.setenv("PATH", str(tmp_path))
    assert image.main(["image", "build", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing host tools: debootstrap" in err and "apt-get install" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:
        image.main(["image", "build"])
    assert exc.value.code == 2
