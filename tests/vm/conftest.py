"""What the VM tests share: a libvirt connection (skip, saying what to start, when there
is none), a built image (``$EE_VM_IMAGE``, else one build per session from the cached
debootstrap), and eectl as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
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
def vm_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("EE_VM_IMAGE")
    if prebuilt:
        return Path(prebuilt)
    from ee.image.build import BUILD_TOOLS, BuildOptions, Progress, build_image
    from ee.image.profile import load_profile
    from image.conftest import image_cache, require_tools

    require_tools(BUILD_TOOLS)
    out = tmp_path_factory.mktemp("vm-image") / "agent"
    build_image(load_profile("agent"), BuildOptions(out=out, cache=image_cache()), Progress())
    return out


def eectl(*argv: str, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ee.ctl.main", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)
