"""One image build per test session, shared by the boot and reproducibility tests.

The debootstrap stage is cached under ``$EE_IMAGE_CACHE`` (default
``~/.cache/easyenclave/image``), keyed by its inputs, so CI pays a cold build once and
warm builds after. Tests skip with a message only when a host tool is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ee.image.build import BuildOptions, BuildResult, Progress, build_image, default_cache_dir
from ee.image.errors import ToolMissing
from ee.image.profile import load_profile
from ee.image.qemu import QEMU_TOOLS


def require_tools(tools: dict[str, str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(str(ToolMissing(missing, [tools[t] for t in missing])))


def image_cache() -> Path:
    return Path(os.environ.get("EE_IMAGE_CACHE") or default_cache_dir())


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    from ee.image.build import BUILD_TOOLS

    require_tools(BUILD_TOOLS)
    out = tmp_path_factory.mktemp("image") / "agent"
    return build_image(load_profile("agent"), BuildOptions(out=out, cache=image_cache()),
                       Progress())


@pytest.fixture
def qemu_tools() -> None:
    require_tools(QEMU_TOOLS)
