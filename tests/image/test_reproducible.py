"""Reproducibility: a second build from scratch (its own empty cache) gives the same
manifest — the same root hash, kernel, initrd and cmdline — as the session's build."""

from __future__ import annotations

from pathlib import Path

import pytest

from ee.image.build import BuildResult, Progress, reproducibility_check
from ee.image.profile import load_profile

pytestmark = pytest.mark.slow


def test_reproducibility_check_passes(built_image: BuildResult, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = reproducibility_check(load_profile("agent"), tmp_path, reference=built_image.out,
                                 progress=Progress())
    err = capsys.readouterr().err
    assert code == 0, err[-4000:]
    assert f"reproducible: root_hash {built_image.manifest.root_hash}" in err


def test_reproducibility_check_names_differing_files(built_image: BuildResult,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A build whose root differs in one file is reported, naming that file."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(built_image.out, other)
    files = (other / "rootfs.files").read_text().splitlines()
    files = [("0" * 64 + line[64:]) if line.endswith("\t/etc/hostname") else line
             for line in files]
    (other / "rootfs.files").write_text("\n".join(files) + "\n")
    manifest = (other / "manifest.json").read_text()
    (other / "manifest.json").write_text(manifest.replace('"rootfs.files"', '"rootfs.files" '))
    from ee.image import build

    assert build.compare_builds(built_image.out, other, Progress()) == 1
    err = capsys.readouterr().err
    assert "differs in root: /etc/hostname" in err
