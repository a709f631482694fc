"""Agent configuration: the typed config and the source chain that resolves it.

Theory of operation
-------------------

An agent VM learns its configuration from the first of these that has one
(first hit wins; later sources are not read at all):

1. **file** — ``--config PATH``, or ``/etc/easyenclave/config.json`` when it exists.
   An explicitly named file must exist.
2. **config-drive** — ``/config.json`` on an ISO9660 image (volume label ``CIDATA``),
   read with pycdlib from the block device ``/dev/disk/by-label/CIDATA`` or an image
   file. A drive without ``config.json`` (say, a cloud-init seed) is not ours and is
   skipped.
3. **cmdline** — the kernel command line (``/proc/cmdline``):
   ``easyenclave.configz=<base64 of zlib-compressed JSON>`` or, when that is absent,
   ``easyenclave.config=<base64 JSON>``. A parameter given twice is an error.
4. **defaults** — :class:`AgentConfig` as constructed with no arguments.

Every source holds one JSON object with the fields of :class:`AgentConfig`. Unknown
fields are errors (a typo must not pass silently), and values must have their JSON
type (strict structuring, :mod:`ee.protocol.strict`). Errors are :class:`ConfigError`,
rendered on one line as ``<source>[ (<where>)]: field <path>: <reason>``.

**Measurement mode** (``easyenclave.measurement=1`` on the kernel cmdline, or the
``measurement_mode`` argument) is for VMs whose launch measurement must describe all of
their configuration: the kernel cmdline is measured, the image file is measured, but a
config drive is not. So in measurement mode a config drive is never read (if it would
have been the only source, resolution fails naming it), and a kernel cmdline over the
limit (2048 bytes; the kernel truncates beyond it, and a truncated config must never be
half-applied) fails fast. The resolved config then has ``measurement_mode=True``; a
config drive may not turn measurement mode on.

``python -m ee.agent.config --print-config [--cmdline FILE] [--config-drive FILE]
[--config FILE]`` prints the resolved ``{"source", "config"}`` as JSON (the semantics
of ``ee-agent --print-config``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import attrs
import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from ee.protocol.canonical import strict_json_loads
from ee.protocol.strict import FieldValueError, check, make_converter, problems

__all__ = [
    "CMDLINE_CONFIG",
    "CMDLINE_CONFIGZ",
    "CMDLINE_LIMIT",
    "CMDLINE_MEASUREMENT",
    "CONFIG_DRIVE_FILE",
    "CONFIG_DRIVE_LABEL",
    "DEFAULT_CMDLINE_PATH",
    "DEFAULT_CONFIG_DRIVE",
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "ConfigError",
    "HttpLimits",
    "ResolvedConfig",
    "Source",
    "TunnelConfig",
    "WorkloadLimits",
    "config_from_dict",
    "config_to_dict",
    "parse_host_port",
    "print_config_main",
    "read_config_drive",
    "resolve_config",
]

DEFAULT_CONFIG_PATH = "/etc/easyenclave/config.json"
DEFAULT_CONFIG_DRIVE = "/dev/disk/by-label/CIDATA"
DEFAULT_CMDLINE_PATH = "/proc/cmdline"
CONFIG_DRIVE_LABEL = "CIDATA"
CONFIG_DRIVE_FILE = "config.json"
CMDLINE_CONFIGZ = "easyenclave.configz"
CMDLINE_CONFIG = "easyenclave.config"
CMDLINE_MEASUREMENT = "easyenclave.measurement"
CMDLINE_LIMIT = 2048
MAX_CONFIG_BYTES = 1 << 20

Source: TypeAlias = Literal["file", "config-drive", "cmdline", "defaults"]
StrPath: TypeAlias = str | os.PathLike[str]

_MRTD = re.compile(r"\A[0-9a-f]{96}\Z")


class ConfigError(Exception):
    """A config source is unusable; names the source, where in it, and the field."""

    def __init__(
        self, source: str, reason: str, *, field: str | None = None, location: str | None = None
    ) -> None:
        self.source = source
        self.field = field
        self.reason = " ".join(reason.split())  # always one line
        self.location = location
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        field = f" field {self.field}:" if self.field else ""
        return f"{self.source}{where}:{field} {self.reason}"


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _is_host_port(value: str) -> bool:
    try:
        parse_host_port(value)
    except ValueError:
        return False
    return True


_nonempty = check(lambda v: len(v) > 0, "must not be empty")
_positive = check(lambda v: v > 0, "must be > 0")


def _each_mrtd(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, mrtd in enumerate(value):
        if not _MRTD.match(mrtd):
            raise FieldValueError(
                f"{attribute.name}[{index}]", f"must be 96 lowercase hex characters, got {mrtd!r}"
            )


_RELEASE_KEY = re.compile(r"^[0-9a-f]{64}$")


def _each_release_key(_inst: Any, attribute: attrs.Attribute[Any],
                      value: tuple[str, ...]) -> None:
    for index, key in enumerate(value):
        if not _RELEASE_KEY.match(key):
            raise FieldValueError(f"{attribute.name}[{index}]",
                                  f"must be an Ed25519 public key, 64 lowercase hex "
                                  f"characters, got {key!r}")


_at_least_one = check(lambda v: v >= 1, "must be >= 1")


@attrs.frozen
class HttpLimits:
    """Time and rate limits of the agent's HTTP port (`ee.agent.http` says how each
    applies): request head and body timeouts, upstream timeouts, and the attested-health
    rate limit per client (IPv4 address, IPv6 /64) under a ceiling for all of them."""

    header_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    body_idle_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    body_timeout_s: float = attrs.field(default=300.0, validator=_positive)
    upstream_connect_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    upstream_read_timeout_s: float = attrs.field(default=120.0, validator=_positive)
    attest_rate_per_s: float = attrs.field(default=1.0, validator=_positive)
    attest_burst: int = attrs.field(default=5, validator=_at_least_one)
    attest_global_rate_per_s: float = attrs.field(default=10.0, validator=_positive)
    attest_global_burst: int = attrs.field(default=20, validator=_at_least_one)
    attest_clients: int = attrs.field(default=4096, validator=_at_least_one)


@attrs.frozen
class WorkloadLimits:
    """Per-phase time limits of a deploy (`ee.agent.workload`: a phase that runs out
    ends the deploy ``failed`` with ``phase: "timeout"``) and how long an undeployed
    deployment's last log lines are kept (`ee.agent.logstore`; 0: not kept)."""

    pull_timeout_s: float = attrs.field(default=600.0, validator=_positive)
    build_timeout_s: float = attrs.field(default=900.0, validator=_positive)
    start_timeout_s: float = attrs.field(default=300.0, validator=_positive)
    health_timeout_s: float = attrs.field(default=120.0, validator=_positive)
    log_retention_s: float = attrs.field(
        default=86400.0, validator=check(lambda v: v >= 0, "must be >= 0"))


@attrs.frozen
class TunnelConfig:
    """Optional cloudflared tunnel, supervised with restart backoff."""

    enabled: bool = False
    command: str = attrs.field(default="cloudflared", validator=_nonempty)
    restart_backoff_base_s: float = attrs.field(default=1.0, validator=_positive)
    restart_backoff_max_s: float = attrs.field(default=60.0, validator=_positive)
    #: Consecutive quick failures (exit within ``restart_backoff_max_s``) before giving up.
    max_restarts: int = attrs.field(default=10, validator=check(lambda v: v >= 0, "must be >= 0"))

    def __attrs_post_init__(self) -> None:
        if self.restart_backoff_max_s < self.restart_backoff_base_s:
            raise FieldValueError("restart_backoff_max_s", "must be >= restart_backoff_base_s")


@attrs.frozen
class AgentConfig:
    """Everything an agent needs before it can reach its CP.

    ``cp_url`` is the agent-plane websocket URL (``ws://host:port/api/v2/agents/connect``);
    ``listen`` the agent's own HTTP address; ``vm_name`` defaults to the host name at
    run time and ``sim_dir`` to ``<data_dir>/sim``. ``reconnect_max_attempts=None``
    retries forever; ``terminal_action`` is what the agent does when it gives up
    (reconnects exhausted, unreachable for ``unreachable_terminate_after_s``):
    ``exit`` the process or run ``poweroff_command``. ``cp_envelope`` says whether CP
    writes must be signed by a key the CP proves with its own quote (``required`` by
    default; ``optional``: only when the CP sends a proof; ``disabled``), whose MRTD
    is checked against ``trusted_cp_mrtds`` (hex) or vouched for by the CP's release
    signed with one of ``trusted_release_keys`` (Ed25519 public keys, 64 hex; the
    release keys a CP bundle pins); with neither, the first MRTD seen is pinned. The
    quote must chain to Intel's root, or, for an agent that itself attests with
    ``sim``, to the sim root in ``sim_dir`` (see ``ee.agent.cptrust``). The CP
    dictates heartbeat and attestation intervals at registration, so they are not
    configured here. ``workload`` holds the per-phase deploy timeouts and the log
    retention window (:class:`WorkloadLimits`); ``http`` the HTTP port's limits.
    """

    cp_url: str | None = attrs.field(
        default=None,
        validator=check(
            lambda v: v.startswith(("ws://", "wss://")), "must be a ws:// or wss:// URL"
        ),
    )
    listen: str = attrs.field(
        default="0.0.0.0:8080", validator=check(_is_host_port, "must be host:port")
    )
    data_dir: str = attrs.field(default="/var/lib/easyenclave", validator=_nonempty)
    vm_name: str | None = attrs.field(default=None, validator=_nonempty)
    node_size: str = attrs.field(default="standard", validator=_nonempty)
    datacenter: str = attrs.field(default="local:dev", validator=_nonempty)
    attestation_provider: Literal["tsm", "sim", "tpm"] = "tsm"
    tsm_root: str = attrs.field(default="/sys/kernel/config/tsm/report", validator=_nonempty)
    sim_dir: str | None = attrs.field(default=None, validator=_nonempty)
    #: provider ``tpm``: the TCTI (the raw device: activation needs a policy session that
    #: outlives one tool process, which /dev/tpmrm0 does not keep; or ``tabrmd``), a PEM
    #: file of EK CA intermediates to send with the EK certificate, the firmware event log
    tpm_tcti: str = attrs.field(default="device:/dev/tpm0", validator=_nonempty)
    tpm_ek_chain: str | None = attrs.field(default=None, validator=_nonempty)
    tpm_event_log: str = attrs.field(
        default="/sys/kernel/security/tpm0/binary_bios_measurements", validator=_nonempty)
    connect_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    reconnect_max_attempts: int | None = attrs.field(
        default=None, validator=check(lambda v: v >= 1, "must be >= 1 (or null: unbounded)")
    )
    reconnect_backoff_base_s: float = attrs.field(default=1.0, validator=_positive)
    reconnect_backoff_max_s: float = attrs.field(default=60.0, validator=_positive)
    terminal_action: Literal["exit", "poweroff"] = "exit"
    poweroff_command: tuple[str, ...] = attrs.field(
        default=("systemctl", "poweroff"), validator=_nonempty
    )
    bootstrap_token: str | None = attrs.field(default=None, validator=_nonempty)
    tunnel: TunnelConfig = attrs.field(factory=TunnelConfig)
    cp_envelope: Literal["required", "optional", "disabled"] = "required"
    trusted_cp_mrtds: tuple[str, ...] = attrs.field(default=(), validator=_each_mrtd)
    trusted_release_keys: tuple[str, ...] = attrs.field(default=(),
                                                        validator=_each_release_key)
    unreachable_terminate_after_s: float | None = attrs.field(default=None, validator=_positive)
    measurement_mode: bool = False
    http: HttpLimits = attrs.field(factory=HttpLimits)
    workload: WorkloadLimits = attrs.field(factory=WorkloadLimits)

    def __attrs_post_init__(self) -> None:
        if self.reconnect_backoff_max_s < self.reconnect_backoff_base_s:
            raise FieldValueError("reconnect_backoff_max_s", "must be >= reconnect_backoff_base_s")


@attrs.frozen
class ResolvedConfig:
    """The config and the source it came from."""

    source: Source
    config: AgentConfig


_converter = make_converter(forbid_extra_keys=True)


def config_from_dict(data: Any, *, source: str, location: str | None = None) -> AgentConfig:
    """Structure one JSON value into an :class:`AgentConfig` (ConfigError on problems)."""
    try:
        config: AgentConfig = _converter.structure(data, AgentConfig)
    except Exception as exc:  # cattrs raises exception groups of any builtin kind
        found = problems(exc)
        path, reason = found[0]
        more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
        raise ConfigError(source, reason + more, field=path or None, location=location) from None
    return config


def config_to_dict(config: AgentConfig) -> dict[str, Any]:
    """The JSON form of *config* (what every source holds)."""
    result: dict[str, Any] = _converter.unstructure(config)
    return result


def _parse_json(raw: bytes, *, source: str, location: str | None) -> AgentConfig:
    try:
        data = strict_json_loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "not UTF-8 text", location=location) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(source, f"invalid JSON ({exc})", location=location) from None
    if not isinstance(data, dict):
        raise ConfigError(
            source, f"expected a JSON object, got {type(data).__name__}", location=location
        )
    return config_from_dict(data, source=source, location=location)


# --- sources ------------------------------------------------------------------------


def _read_file(path: StrPath, *, source: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(source, "not found", location=os.fspath(path)) from None
    except OSError as exc:
        raise ConfigError(
            source, f"unreadable ({exc.strerror})", location=os.fspath(path)
        ) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, f"larger than {MAX_CONFIG_BYTES} bytes", location=os.fspath(path))
    return raw


def read_config_drive(path: StrPath) -> bytes | None:
    """The bytes of ``/config.json`` on the ISO9660 image *path*; None if it has none.

    Rock Ridge and Joliet names are tried before the plain ISO9660 name
    (``CONFIG.JSON;1``). ConfigError when *path* is not a readable ISO9660 image.
    """
    location = os.fspath(path)
    iso = pycdlib.PyCdlib()
    try:
        iso.open(location)
    except (PyCdlibException, OSError) as exc:
        raise ConfigError(
            "config-drive", f"not a readable ISO9660 image ({exc})", location=location
        ) from None
    try:
        names: list[dict[str, str]] = []
        if iso.has_rock_ridge():
            names.append({"rr_path": "/" + CONFIG_DRIVE_FILE})
        if iso.has_joliet():
            names.append({"joliet_path": "/" + CONFIG_DRIVE_FILE})
        names.append({"iso_path": "/" + CONFIG_DRIVE_FILE.upper() + ";1"})
        for name in names:
            try:
                record = iso.get_record(**name)
            except PyCdlibException:
                continue
            if record.get_data_length() > MAX_CONFIG_BYTES:
                raise ConfigError(
                    "config-drive",
                    f"/{CONFIG_DRIVE_FILE} is larger than {MAX_CONFIG_BYTES} bytes",
                    location=location,
                )
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, **name)
            return out.getvalue()
        return None
    except (PyCdlibException, OSError) as exc:
        raise ConfigError(
            "config-drive", f"cannot read /{CONFIG_DRIVE_FILE} ({exc})", location=location
        ) from None
    finally:
        iso.close()


def _cmdline_params(cmdline: str) -> dict[str, str]:
    """Our ``easyenclave.*`` parameters; each may appear once."""
    found: dict[str, str] = {}
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if not key.startswith("easyenclave."):
            continue
        if key in found:
            raise ConfigError("cmdline", f"{key} given more than once")
        found[key] = value if sep else ""
    return found


def _measurement_flag(params: Mapping[str, str]) -> bool:
    value = params.get(CMDLINE_MEASUREMENT)
    if value is None:
        return False
    if value in ("1", "true", "yes", ""):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ConfigError("cmdline", f"{CMDLINE_MEASUREMENT} must be 1 or 0, got {value!r}")


def _b64decode(value: str, key: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("cmdline", f"{key} is not valid base64") from None


def _config_from_cmdline(params: Mapping[str, str]) -> AgentConfig | None:
    if CMDLINE_CONFIGZ in params:
        packed = _b64decode(params[CMDLINE_CONFIGZ], CMDLINE_CONFIGZ)
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(packed, MAX_CONFIG_BYTES + 1)
        except zlib.error as exc:
            raise ConfigError("cmdline", f"{CMDLINE_CONFIGZ} is not valid zlib ({exc})") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError("cmdline", f"{CMDLINE_CONFIGZ} inflates past {MAX_CONFIG_BYTES}")
        if not inflater.eof:
            raise ConfigError("cmdline", f"{CMDLINE_CONFIGZ} is truncated zlib data")
        return _parse_json(raw, source="cmdline", location=None)
    if CMDLINE_CONFIG in params:
        raw = _b64decode(params[CMDLINE_CONFIG], CMDLINE_CONFIG)
        return _parse_json(raw, source="cmdline", location=None)
    return None


def _read_proc_cmdline() -> str:
    try:
        return Path(DEFAULT_CMDLINE_PATH).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def resolve_config(
    *,
    config_path: StrPath | None = None,
    config_drive: StrPath | None = DEFAULT_CONFIG_DRIVE,
    cmdline: str | None = None,
    measurement_mode: bool = False,
    cmdline_limit: int = CMDLINE_LIMIT,
    default_config_path: StrPath = DEFAULT_CONFIG_PATH,
) -> ResolvedConfig:
    """Resolve the agent config through the source chain (see the module docstring).

    ``config_path`` names an explicit file (which must exist); otherwise
    ``default_config_path`` is used when it exists. ``config_drive`` is a device or ISO
    image path (skipped when absent; None disables the source). ``cmdline`` is the
    kernel command line text (None: read ``/proc/cmdline``, empty if it is absent).
    """
    text = _read_proc_cmdline() if cmdline is None else cmdline
    params = _cmdline_params(text)
    measurement = measurement_mode or _measurement_flag(params)
    size = len(text.strip().encode("utf-8"))
    cmdline_has_config = CMDLINE_CONFIGZ in params or CMDLINE_CONFIG in params
    if size > cmdline_limit and (measurement or cmdline_has_config):
        raise ConfigError(
            "cmdline",
            f"kernel cmdline is {size} bytes, over the limit of {cmdline_limit} bytes"
            + (" (measurement mode)" if measurement else "; move the config to a config drive"),
        )

    resolved = _first_hit(
        config_path, default_config_path, config_drive, params, measurement=measurement
    )
    if measurement and not resolved.config.measurement_mode:
        resolved = ResolvedConfig(
            resolved.source, attrs.evolve(resolved.config, measurement_mode=True)
        )
    if resolved.source == "config-drive" and resolved.config.measurement_mode:
        raise ConfigError(
            "config-drive",
            "a config drive cannot enable measurement mode (it is not measured)",
            field="measurement_mode",
            location=os.fspath(config_drive) if config_drive is not None else None,
        )
    return resolved


def _first_hit(
    config_path: StrPath | None,
    default_config_path: StrPath,
    config_drive: StrPath | None,
    params: Mapping[str, str],
    *,
    measurement: bool,
) -> ResolvedConfig:
    if config_path is not None or os.path.exists(default_config_path):
        path = config_path if config_path is not None else default_config_path
        raw = _read_file(path, source="file")
        return ResolvedConfig("file", _parse_json(raw, source="file", location=os.fspath(path)))

    drive_present = config_drive is not None and os.path.exists(config_drive)
    if drive_present and not measurement:
        assert config_drive is not None
        raw_drive = read_config_drive(config_drive)
        if raw_drive is not None:
            location = f"{os.fspath(config_drive)}:/{CONFIG_DRIVE_FILE}"
            config = _parse_json(raw_drive, source="config-drive", location=location)
            return ResolvedConfig("config-drive", config)

    from_cmdline = _config_from_cmdline(params)
    if from_cmdline is not None:
        return ResolvedConfig("cmdline", from_cmdline)

    if drive_present and measurement:
        raise ConfigError(
            "config-drive",
            "refused in measurement mode (a config drive is not measured); "
            "put the config on the kernel cmdline or in the image",
            location=os.fspath(config_drive) if config_drive is not None else None,
        )
    return ResolvedConfig("defaults", AgentConfig())


# --- print-config -------------------------------------------------------------------


def _redacted(config: AgentConfig) -> dict[str, Any]:
    data = config_to_dict(config)
    if data.get("bootstrap_token"):
        data["bootstrap_token"] = "<redacted>"
    return data


def print_config_main(argv: Sequence[str] | None = None) -> int:
    """``ee-agent --print-config``: print the resolved config as JSON; 0 on success.

    A bad source prints one line naming the source and the field on stderr and
    returns 1 (usage errors: 2). The bootstrap token is shown as ``<redacted>``.
    """
    parser = argparse.ArgumentParser(
        prog="ee-agent",
        description="Resolve the agent config chain and print it as JSON.",
    )
    parser.add_argument("--print-config", action="store_true", help="print and exit")
    parser.add_argument("--config", metavar="FILE", help="config file (must exist)")
    parser.add_argument("--config-drive", metavar="FILE", help="config drive ISO or device")
    parser.add_argument("--cmdline", metavar="FILE", help="read the kernel cmdline from FILE")
    parser.add_argument("--measurement", action="store_true", help="resolve as in measurement mode")
    args = parser.parse_args(argv)
    if not args.print_config:
        parser.error("--print-config is required")
    try:
        cmdline = None
        if args.cmdline is not None:
            cmdline = _read_file(args.cmdline, source="cmdline").decode("utf-8", "replace")
        if args.config_drive is not None and not os.path.exists(args.config_drive):
            raise ConfigError("config-drive", "not found", location=args.config_drive)
        resolved = resolve_config(
            config_path=args.config,
            config_drive=(
                args.config_drive if args.config_drive is not None else DEFAULT_CONFIG_DRIVE
            ),
            cmdline=cmdline,
            measurement_mode=args.measurement,
        )
    except ConfigError as exc:
        print(f"ee-agent: {exc}", file=sys.stderr)
        return 1
    output = {"source": resolved.source, "config": _redacted(resolved.config)}
    print(json.dumps(output, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(print_config_main())
