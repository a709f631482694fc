"""What the VM tests share: a libvirt connection (skip, saying what to start, when there
is none), a built image (``$EE_VM_IMAGE``, else one build per session from the cached
debootstrap), and eectl as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ee.vm.errors import VmError
from ee.vm.host import VmHost

URI = os.environ.get("EE_VM_CONNECT", "qemu:///system")


@pytest.fixture
def host() -> Iterator[VmHost]:
    try:
        h = VmHost(URI)
    except VmError as exc:
        pytest.skip(f"{exc} (tools/vm/services starts virtlogd and libvirtd)")
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="session")
def vm_image() -> Iterator[Path]:
    """The built agent image, where QEMU (libvirt's ``libvirt-qemu`` user) can read it:
    not under pytest's 0700 temporary directories, but a 0711 directory in /var/tmp."""
    yield from _built_image("agent", os.environ.get("EE_VM_IMAGE"))


@pytest.fixture(scope="session")
def cp_vm_image() -> Iterator[Path]:
    """The built cp-profile image (``$EE_VM_CP_IMAGE``, else one build per session)."""
    yield from _built_image("cp", os.environ.get("EE_VM_CP_IMAGE"))


def _built_image(profile: str, prebuilt: str | None) -> Iterator[Path]:
    if prebuilt:
        yield Path(prebuilt)
        return
    from ee.image.build import BUILD_TOOLS, BuildOptions, Progress, build_image
    from ee.image.profile import load_profile
    from image.conftest import image_cache, require_tools

    require_tools(BUILD_TOOLS)
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ee-vm-image-"))
    try:
        os.chmod(base, 0o711)
        out = base / profile
        build_image(load_profile(profile), BuildOptions(out=out, cache=image_cache()),
                    Progress())
        os.chmod(out, 0o755)
        for path in out.iterdir():
            if path.is_file():
                os.chmod(path, 0o644)
        yield out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def eectl(*argv: str, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ee.ctl.main", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)
