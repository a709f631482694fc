"""The image definition as data: ``image/profiles/<name>.json`` in the checkout."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs

from ee.image.errors import ProfileError
from ee.protocol.strict import make_converter, problems

__all__ = ["KernelSpec", "Profile", "checkout_root", "load_profile"]

_NAME = re.compile(r"\A[a-z][a-z0-9-]{0,31}\Z")


@attrs.frozen
class KernelSpec:
    """Which Debian kernel package, which modules go to the root and to the initramfs."""

    package_regex: str
    rootfs_modules: tuple[str, ...]
    rootfs_modules_exclude: tuple[str, ...]
    initramfs_modules: tuple[str, ...]


@attrs.frozen
class Profile:
    """One image profile (see ``image/profiles/agent.json``)."""

    name: str = attrs.field(validator=attrs.validators.matches_re(_NAME))
    description: str
    suite: str
    variant: str
    components: tuple[str, ...]
    packages: tuple[str, ...]
    kernel: KernelSpec
    initramfs_debs: tuple[str, ...]
    initramfs_binaries: tuple[str, ...]
    cmdline: str
    enable_units: tuple[str, ...]
    mask_units: tuple[str, ...]
    remove_paths: tuple[str, ...]
    empty_dirs: tuple[str, ...]
    symlinks: dict[str, str]
    hostname: str
    python_site: str
    #: the ``cp`` profile: the CP container image its VMs run, by digest
    #: (``eectl cp bootstrap`` refuses a tag); None elsewhere
    control_plane_image: str | None = None


_converter = make_converter(forbid_extra_keys=True)


def checkout_root() -> Path:
    """The checkout this package was imported from (it holds ``image/`` and ``src/``)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "image" / "profiles").is_dir() or not (root / "pyproject.toml").is_file():
        raise ProfileError(
            f"{root} is not an EasyEnclave checkout (no image/profiles): images are built "
            "from a source checkout"
        )
    return root


def load_profile(name: str, image_dir: Path | None = None) -> Profile:
    """Read and validate ``<image_dir>/profiles/<name>.json`` (ProfileError on problems)."""
    if not _NAME.match(name):
        raise ProfileError(f"bad profile name {name!r}")
    base = image_dir if image_dir is not None else checkout_root() / "image"
    path = base / "profiles" / f"{name}.json"
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"no profile {name!r} ({path} not found)") from None
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{path}: unreadable ({exc})") from None
    try:
        profile: Profile = _converter.structure(data, Profile)
    except Exception as exc:  # cattrs raises exception groups of any builtin kind
        field, reason = problems(exc)[0]
        raise ProfileError(f"{path}: field {field}: {reason}") from None
    return profile
