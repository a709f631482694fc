"""Agent config chain: file → config drive → kernel cmdline → defaults."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import attrs
import pycdlib
import pytest

from ee.agent.bootconfig import (
    BootConfig,
    BootConfigError,
    encode_cmdline,
    plan_boot_config,
    write_config_drive,
)
from ee.agent.config import (
    DEFAULT_CONFIG_PATH,
    AgentConfig,
    ConfigError,
    TunnelConfig,
    config_from_dict,
    config_to_dict,
    parse_host_port,
    resolve_config,
)

NOWHERE = "/nonexistent/easyenclave/config.json"
CP = "ws://10.0.0.1:7070/api/v2/agents/connect"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def configz(doc: object) -> str:
    return "easyenclave.configz=" + b64(zlib.compress(json.dumps(doc).encode()))


def config_param(doc: object) -> str:
    return "easyenclave.config=" + b64(json.dumps(doc).encode())


def resolve(**kwargs: Any) -> Any:
    kwargs.setdefault("default_config_path", NOWHERE)
    kwargs.setdefault("config_drive", None)
    kwargs.setdefault("cmdline", "")
    return resolve_config(**kwargs)


def error_of(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def file_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vm_name": "from-file", "cp_url": CP}))
    return path


@pytest.fixture
def drive(tmp_path: Path) -> Path:
    path = tmp_path / "cidata.iso"
    write_config_drive(AgentConfig(vm_name="from-drive"), path)
    return path


CMDLINE = "console=ttyS0 " + configz({"vm_name": "from-cmdline"}) + " quiet"


# --- the chain ----------------------------------------------------------------------


def test_defaults_when_nothing_is_configured() -> None:
    resolved = resolve()
    assert resolved.source == "defaults"
    assert resolved.config == AgentConfig()
    assert resolved.config.listen == "0.0.0.0:8080"
    assert resolved.config.node_size == "standard"


def test_file_wins_over_everything(file_cfg: Path, drive: Path) -> None:
    resolved = resolve(config_path=file_cfg, config_drive=drive, cmdline=CMDLINE)
    assert (resolved.source, resolved.config.vm_name) == ("file", "from-file")
    assert resolved.config.cp_url == CP


def test_default_file_path_is_used_when_present(file_cfg: Path, drive: Path) -> None:
    resolved = resolve(default_config_path=file_cfg, config_drive=drive, cmdline=CMDLINE)
    assert resolved.source == "file"


def test_config_drive_wins_over_cmdline(drive: Path) -> None:
    resolved = resolve(config_drive=drive, cmdline=CMDLINE)
    assert (resolved.source, resolved.config.vm_name) == ("config-drive", "from-drive")


def test_cmdline_wins_over_defaults(tmp_path: Path) -> None:
    resolved = resolve(config_drive=tmp_path / "absent.iso", cmdline=CMDLINE)
    assert (resolved.source, resolved.config.vm_name) == ("cmdline", "from-cmdline")


def test_cmdline_config_and_configz_preference() -> None:
    plain = resolve(cmdline=config_param({"vm_name": "plain"}))
    assert (plain.source, plain.config.vm_name) == ("cmdline", "plain")
    both = resolve(cmdline=f"{config_param({'vm_name': 'plain'})} {configz({'vm_name': 'z'})}")
    assert both.config.vm_name == "z"


def test_explicit_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    assert error_of(config_path=missing, cmdline=CMDLINE) == f"file ({missing}): not found"


def test_drive_without_config_json_is_skipped(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="CIDATA", rock_ridge="1.09")
    iso.add_fp(io.BytesIO(b"x"), 1, iso_path="/META_DAT.;1", rr_name="meta-data")
    iso.write(str(seed))
    iso.close()
    assert resolve(config_drive=seed, cmdline=CMDLINE).source == "cmdline"


def test_plain_iso9660_name_is_read(tmp_path: Path) -> None:
    path = tmp_path / "plain.iso"
    data = json.dumps({"vm_name": "plain-iso"}).encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="CIDATA")
    iso.add_fp(io.BytesIO(data), len(data), iso_path="/CONFIG.JSON;1")
    iso.write(str(path))
    iso.close()
    resolved = resolve(config_drive=path)
    assert (resolved.source, resolved.config.vm_name) == ("config-drive", "plain-iso")


def test_written_drive_has_label_and_exact_names(drive: Path) -> None:
    iso = pycdlib.PyCdlib()
    iso.open(str(drive))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "CIDATA"
        names = [
            iso.full_path_from_dirrecord(child, rockridge=True)
            for child in iso.list_children(rr_path="/")
            if not (child.is_dot() or child.is_dotdot())
        ]
        assert names == ["/config.json"]
        joliet = [
            c.file_identifier().decode("utf-16_be") for c in iso.list_children(joliet_path="/")
        ]
        assert "config.json" in joliet
    finally:
        iso.close()


# --- errors name source and field ---------------------------------------------------


def test_bad_json_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"vm_name": ')
    assert error_of(config_path=path).startswith(f"file ({path}): invalid JSON")
    path.write_text('["vm_name"]')
    assert error_of(config_path=path) == f"file ({path}): expected a JSON object, got list"
    path.write_text('{"vm_name": "a", "vm_name": "b"}')
    assert "duplicate key 'vm_name'" in error_of(config_path=path)


def test_bad_base64_zlib_and_json_on_cmdline() -> None:
    assert error_of(cmdline="easyenclave.configz=!!!") == (
        "cmdline: easyenclave.configz is not valid base64"
    )
    assert error_of(cmdline="easyenclave.config=!!!") == (
        "cmdline: easyenclave.config is not valid base64"
    )
    not_zlib = "easyenclave.configz=" + b64(b"plain text, not zlib")
    assert error_of(cmdline=not_zlib).startswith("cmdline: easyenclave.configz is not valid zlib")
    truncated = "easyenclave.configz=" + b64(zlib.compress(b'{"vm_name": "x"}')[:-4])
    assert error_of(cmdline=truncated) == "cmdline: easyenclave.configz is truncated zlib data"
    bad_json = "easyenclave.config=" + b64(b"{nope")
    assert error_of(cmdline=bad_json).startswith("cmdline: invalid JSON")


def test_wrong_type_names_the_field() -> None:
    message = error_of(cmdline=configz({"reconnect_max_attempts": "x"}))
    assert message == "cmdline: field reconnect_max_attempts: expected int, got 'x'"
    message = error_of(cmdline=config_param({"tunnel": {"enabled": "yes"}}))
    assert message == "cmdline: field tunnel.enabled: expected boolean, got 'yes'"
    message = error_of(cmdline=config_param({"trusted_cp_mrtds": ["ab", "cd"]}))
    assert message.startswith("cmdline: field trusted_cp_mrtds[0]: must be 96 lowercase hex")
    message = error_of(cmdline=config_param({"trusted_release_keys": ["AB" * 32]}))
    assert message.startswith("cmdline: field trusted_release_keys[0]: must be an Ed25519")


def test_unknown_fields_are_named(tmp_path: Path, file_cfg: Path) -> None:
    assert error_of(cmdline=configz({"reconect_max_attempts": 3})) == (
        "cmdline: field reconect_max_attempts: unknown field"
    )
    path = tmp_path / "typo.iso"
    iso = pycdlib.PyCdlib()
    data = json.dumps({"tunnel": {"enabeld": True}}).encode()
    iso.new(vol_ident="CIDATA", rock_ridge="1.09")
    iso.add_fp(io.BytesIO(data), len(data), iso_path="/CONFIG.JSO;1", rr_name="config.json")
    iso.write(str(path))
    iso.close()
    assert error_of(config_drive=path) == (
        f"config-drive ({path}:/config.json): field tunnel.enabeld: unknown field"
    )


def test_bad_config_drive_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"\0" * 40000)
    assert error_of(config_drive=junk).startswith(
        f"config-drive ({junk}): not a readable ISO9660 image"
    )


def test_duplicate_and_malformed_cmdline_params() -> None:
    twice = f"{config_param({})} {config_param({})}"
    assert error_of(cmdline=twice) == "cmdline: easyenclave.config given more than once"
    assert error_of(cmdline="easyenclave.measurement=maybe").startswith(
        "cmdline: easyenclave.measurement must be 1 or 0"
    )


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        ({"listen": "8080"}, "listen", "must be host:port"),
        ({"listen": "host:99999"}, "listen", "must be host:port"),
        ({"cp_url": "http://x"}, "cp_url", "must be a ws:// or wss:// URL"),
        ({"attestation_provider": "sgx"}, "attestation_provider", "expected one of"),
        ({"cp_envelope": "maybe"}, "cp_envelope", "expected one of"),
        ({"reconnect_max_attempts": 0}, "reconnect_max_attempts", "must be >= 1"),
        ({"reconnect_backoff_max_s": 0.5}, "reconnect_backoff_max_s", "must be >= reconnect"),
        ({"poweroff_command": "poweroff"}, "poweroff_command", "expected array"),
        ({"poweroff_command": []}, "poweroff_command", "must not be empty"),
        ({"unreachable_terminate_after_s": 0}, "unreachable_terminate_after_s", "must be > 0"),
        (
            {"tunnel": {"restart_backoff_base_s": 5, "restart_backoff_max_s": 1}},
            "tunnel.restart_backoff_max_s",
            "must be >= restart_backoff_base_s",
        ),
    ],
)
def test_value_validation(doc: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(doc, source="file", location="x.json")
    assert info.value.field == field
    assert info.value.reason.startswith(reason), info.value.reason
    assert str(info.value).startswith(f"file (x.json): field {field}: {reason}")


def test_config_json_round_trip() -> None:
    config = AgentConfig(
        cp_url=CP,
        listen="[::1]:0",
        reconnect_max_attempts=5,
        terminal_action="poweroff",
        tunnel=TunnelConfig(enabled=True),
        trusted_cp_mrtds=("ab" * 48,),
        unreachable_terminate_after_s=600,
    )
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config))), source="t") == config
    assert parse_host_port("[::1]:0") == ("::1", 0)
    assert parse_host_port(config.listen) == ("::1", 0)


# --- measurement mode ---------------------------------------------------------------


def test_measurement_mode_refuses_a_lone_config_drive(drive: Path) -> None:
    message = error_of(config_drive=drive, cmdline="easyenclave.measurement=1")
    assert message.startswith(f"config-drive ({drive}): refused in measurement mode")
    message = error_of(config_drive=drive, measurement_mode=True)
    assert message.startswith(f"config-drive ({drive}): refused in measurement mode")


def test_measurement_mode_never_reads_the_drive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.iso"  # reading it would fail
    junk.write_bytes(b"not an iso")
    resolved = resolve(
        config_drive=junk, cmdline=f"easyenclave.measurement=1 {configz({'vm_name': 'm'})}"
    )
    assert (resolved.source, resolved.config.vm_name) == ("cmdline", "m")
    assert resolved.config.measurement_mode is True
    # a measured image file is still a valid source
    path = tmp_path / "c.json"
    path.write_text("{}")
    resolved = resolve(config_path=path, config_drive=junk, measurement_mode=True)
    assert resolved.source == "file" and resolved.config.measurement_mode


def test_measurement_mode_without_any_config_uses_defaults() -> None:
    resolved = resolve(measurement_mode=True)
    assert resolved.source == "defaults" and resolved.config.measurement_mode


def test_config_drive_cannot_enable_measurement_mode(tmp_path: Path) -> None:
    path = tmp_path / "m.iso"
    write_config_drive(AgentConfig(measurement_mode=True), path)
    message = error_of(config_drive=path)
    assert message.startswith(f"config-drive ({path}): field measurement_mode:")


def test_oversized_cmdline_fails_fast() -> None:
    padding = "x" * 2100
    message = error_of(cmdline=f"easyenclave.measurement=1 pad={padding}")
    assert message.startswith("cmdline: kernel cmdline is 2130 bytes, over the limit of 2048")
    assert "measurement mode" in message
    # carrying config, an oversized cmdline fails even outside measurement mode
    message = error_of(cmdline=f"{configz({})} pad={padding}")
    assert "over the limit of 2048 bytes" in message
    # a long cmdline that carries no config and is not measured is not ours to judge
    assert resolve(cmdline=f"pad={padding}").source == "defaults"
    # exactly at the limit is fine
    at_limit = "easyenclave.measurement=1 pad="
    at_limit += "x" * (2048 - len(at_limit))
    assert resolve(cmdline=at_limit).config.measurement_mode


# --- host side ----------------------------------------------------------------------


def test_plan_uses_the_cmdline_when_it_fits(tmp_path: Path) -> None:
    config = AgentConfig(cp_url=CP, vm_name="vm-7")
    plan = plan_boot_config(config, config_drive_path=tmp_path / "d.iso", base_cmdline="quiet")
    assert plan == BootConfig(cmdline=f"quiet {encode_cmdline(config)}")
    assert not (tmp_path / "d.iso").exists()
    resolved = resolve(cmdline=plan.cmdline)
    assert (resolved.source, resolved.config) == ("cmdline", config)


def test_plan_falls_back_to_a_config_drive_read_back_by_the_chain(tmp_path: Path) -> None:
    config = AgentConfig(cp_url=CP, vm_name="vm-8", bootstrap_token=os.urandom(1500).hex())
    drive_path = tmp_path / "cidata.iso"
    plan = plan_boot_config(config, config_drive_path=drive_path, base_cmdline="quiet")
    assert plan == BootConfig(cmdline="quiet", config_drive=str(drive_path))
    resolved = resolve(config_drive=plan.config_drive, cmdline=plan.cmdline)
    assert (resolved.source, resolved.config) == ("config-drive", config)
    assert [p.name for p in tmp_path.iterdir()] == ["cidata.iso"]  # no temp files left


def test_plan_in_measurement_mode(tmp_path: Path) -> None:
    config = AgentConfig(measurement_mode=True)
    plan = plan_boot_config(config, config_drive_path=tmp_path / "d.iso")
    assert plan.cmdline.startswith("easyenclave.measurement=1 easyenclave.configz=")
    assert resolve(cmdline=plan.cmdline).config == config
    big = attrs.evolve(config, bootstrap_token=os.urandom(1500).hex())
    with pytest.raises(BootConfigError, match="measurement mode refuses config drives"):
        plan_boot_config(big, config_drive_path=tmp_path / "d.iso")
    assert not (tmp_path / "d.iso").exists()


# --- print-config -------------------------------------------------------------------

needs_clean_host = pytest.mark.skipif(
    os.path.exists(DEFAULT_CONFIG_PATH), reason=f"{DEFAULT_CONFIG_PATH} exists on this host"
)


def print_config(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ee.agent.config", "--print-config", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_clean_host
def test_print_config_reports_source_and_config(tmp_path: Path, drive: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(CMDLINE + "\n")
    result = print_config("--cmdline", cmdline, "--config-drive", tmp_path / "none.iso")
    assert result.returncode == 1  # an explicitly named drive must exist
    assert result.stderr.strip() == f"ee-agent: config-drive ({tmp_path / 'none.iso'}): not found"

    result = print_config("--cmdline", cmdline)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["source"] == "cmdline"
    assert output["config"] == config_to_dict(AgentConfig(vm_name="from-cmdline"))

    result = print_config("--cmdline", cmdline, "--config-drive", drive)
    assert json.loads(result.stdout)["source"] == "config-drive"


def test_print_config_file_redacts_the_bootstrap_token(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"bootstrap_token": "secret-token"}))
    result = print_config("--config", path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source"] == "file"
    assert json.loads(result.stdout)["config"]["bootstrap_token"] == "<redacted>"
    assert "secret-token" not in result.stdout


@needs_clean_host
def test_print_config_bad_source_exits_nonzero_naming_source_and_field(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(configz({"reconnect_max_attempts": "x"}))
    result = print_config("--cmdline", cmdline)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "ee-agent: cmdline: field reconnect_max_attempts: expected int, got 'x'"
    ]


def test_print_config_usage_errors() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ee.agent.config"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--print-config is required" in result.stderr


def test_http_limits_come_from_the_config_and_are_checked() -> None:
    config = config_from_dict({"http": {"header_timeout_s": 2, "attest_clients": 9}},
                              source="file")
    assert config.http.header_timeout_s == 2.0 and config.http.attest_clients == 9
    assert config.http.body_timeout_s == 300.0  # the rest keep their defaults
    for bad, field in (({"attest_burst": 0}, "http.attest_burst"),
                       ({"body_timeout_s": -1}, "http.body_timeout_s"),
                       ({"nope": 1}, "http.nope")):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"http": bad}, source="file")
        assert info.value.field == field
