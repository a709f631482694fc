"""Host side of the agent config chain: how a VM is handed its config at boot.

``eectl vm`` puts an :class:`~ee.agent.config.AgentConfig` on the kernel command line
when it fits (``easyenclave.configz=``, zlib + base64 of the config's canonical JSON),
and otherwise on an ISO9660 config drive (volume label ``CIDATA``, file
``/config.json`` with Rock Ridge and Joliet names, so Linux sees exactly
``config.json``). Both are read back by :func:`ee.agent.config.resolve_config`.

A config in measurement mode also carries ``easyenclave.measurement=1`` on the
cmdline, so the booted agent refuses any config drive, and it never falls back to a
drive: a measured VM must have all of its config in its measured cmdline.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import zlib
from pathlib import Path

import attrs
import pycdlib

from ee.agent.config import (
    CMDLINE_CONFIGZ,
    CMDLINE_LIMIT,
    CMDLINE_MEASUREMENT,
    CONFIG_DRIVE_FILE,
    CONFIG_DRIVE_LABEL,
    AgentConfig,
    config_to_dict,
)
from ee.protocol.canonical import canonical_json

__all__ = [
    "BootConfig",
    "BootConfigError",
    "encode_cmdline",
    "plan_boot_config",
    "write_config_drive",
]

StrPath = str | os.PathLike[str]


class BootConfigError(Exception):
    """The config cannot be delivered to the VM the way its mode requires."""


@attrs.frozen
class BootConfig:
    """How to boot: the full kernel cmdline, and the config drive to attach (if any)."""

    cmdline: str
    config_drive: str | None = None


def encode_cmdline(config: AgentConfig) -> str:
    """The cmdline fragment carrying *config* (plus the measurement flag when set)."""
    packed = zlib.compress(canonical_json(config_to_dict(config)), 9)
    fragment = f"{CMDLINE_CONFIGZ}={base64.b64encode(packed).decode('ascii')}"
    if config.measurement_mode:
        fragment = f"{CMDLINE_MEASUREMENT}=1 {fragment}"
    return fragment


def write_config_drive(config: AgentConfig, path: StrPath) -> None:
    """Write an ISO9660 config drive holding *config* as ``/config.json`` (atomically)."""
    data = canonical_json(config_to_dict(config))
    target = Path(path)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=CONFIG_DRIVE_LABEL, joliet=3, rock_ridge="1.09")
    try:
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            iso_path="/" + CONFIG_DRIVE_FILE.upper() + ";1",
            rr_name=CONFIG_DRIVE_FILE,
            joliet_path="/" + CONFIG_DRIVE_FILE,
        )
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            iso.write(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        iso.close()


def plan_boot_config(
    config: AgentConfig,
    *,
    config_drive_path: StrPath,
    base_cmdline: str = "",
    limit: int = CMDLINE_LIMIT,
) -> BootConfig:
    """Put *config* on the cmdline if the whole cmdline fits in *limit* bytes.

    Otherwise write a config drive at *config_drive_path* and return it with
    *base_cmdline* unchanged. A measurement-mode config that does not fit raises
    :class:`BootConfigError` (config drives are refused in measurement mode).
    """
    fragment = encode_cmdline(config)
    full = f"{base_cmdline} {fragment}" if base_cmdline else fragment
    if len(full.encode("utf-8")) <= limit:
        return BootConfig(cmdline=full)
    if config.measurement_mode:
        raise BootConfigError(
            f"config needs a {len(full.encode('utf-8'))}-byte kernel cmdline, over the "
            f"{limit}-byte limit, and measurement mode refuses config drives"
        )
    write_config_drive(config, config_drive_path)
    return BootConfig(cmdline=base_cmdline, config_drive=os.fspath(config_drive_path))
