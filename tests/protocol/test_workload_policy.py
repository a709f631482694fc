"""The workload policy, line by line: every refused compose feature, the allowed ones, env."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from ee.protocol.compose import validate_compose
from ee.protocol.workload_policy import (
    DEFAULT_CAP_ADD,
    MAX_ENV_VALUE_BYTES,
    MAX_ENV_VARS,
    WorkloadPolicyError,
    check_compose,
    check_env,
    check_health_path,
    harden,
)


def svc(extra: str) -> str:
    """A one-service compose document with ``extra`` (YAML, 4-space indent) on ``web``."""
    return "services:\n  web:\n    image: ee-busybox:local\n" + extra


#: (name, compose text, refused path, reason code). Shared with the CP and agent tests.
REFUSED: list[tuple[str, str, str, str]] = [
    ("privileged", svc("    privileged: true\n"), "services.web.privileged", "privileged"),
    ("bind_root", svc("    volumes: ['/:/host']\n"), "services.web.volumes[0]", "bind_mount"),
    ("bind_relative", svc("    volumes: ['./data:/d']\n"), "services.web.volumes[0]",
     "bind_mount"),
    ("bind_home", svc("    volumes: ['~/x:/d']\n"), "services.web.volumes[0]", "bind_mount"),
    ("docker_sock", svc("    volumes: ['/var/run/docker.sock:/var/run/docker.sock']\n"),
     "services.web.volumes[0]", "docker_socket"),
    ("docker_sock_long", svc("    volumes:\n      - type: bind\n"
                             "        source: /var/run/docker.sock\n        target: /s\n"),
     "services.web.volumes[0].source", "docker_socket"),
    ("bind_long", svc("    volumes:\n      - {type: bind, source: /etc, target: /e}\n"),
     "services.web.volumes[0].source", "bind_mount"),
    ("npipe", svc("    volumes:\n      - {type: npipe, source: x, target: /e}\n"),
     "services.web.volumes[0].source", "bind_mount"),
    ("undeclared_volume", svc("    volumes: ['data:/d']\n"), "services.web.volumes[0]",
     "undeclared_volume"),
    # '/${V}' with V=':/host' is '/:/host' once interpolated: refused as uploaded.
    ("volume_variable", svc("    volumes: ['/${V}']\n"), "services.web.volumes[0]",
     "interpolation"),
    ("volume_variable_long", svc("    volumes:\n      - {type: '${T}', source: x, target: /e}\n"),
     "services.web.volumes[0].type", "interpolation"),
    ("tmpfs_variable", svc("    tmpfs: ['/run${T}']\n"), "services.web.tmpfs[0]",
     "interpolation"),
    ("volume_driver_opts", svc("    volumes: ['data:/d']\n") + "volumes:\n  data:\n"
     "    driver_opts: {type: none, o: bind, device: /}\n", "volumes.data.driver_opts",
     "driver"),
    ("volume_driver", svc("") + "volumes:\n  data: {driver: local}\n", "volumes.data.driver",
     "driver"),
    ("volume_external", svc("") + "volumes:\n  data: {external: true}\n",
     "volumes.data.external", "external"),
    ("volume_name", svc("") + "volumes:\n  data: {name: other_project_data}\n",
     "volumes.data.name", "external"),
    ("pid_host", svc("    pid: host\n"), "services.web.pid", "host_namespace"),
    ("ipc_host", svc("    ipc: host\n"), "services.web.ipc", "host_namespace"),
    ("uts_host", svc("    uts: host\n"), "services.web.uts", "host_namespace"),
    ("userns_host", svc("    userns_mode: host\n"), "services.web.userns_mode",
     "host_namespace"),
    ("net_host", svc("    network_mode: host\n"), "services.web.network_mode",
     "host_namespace"),
    ("net_bridge", svc("    network_mode: bridge\n"), "services.web.network_mode",
     "host_namespace"),
    ("net_container", svc("    network_mode: 'container:abc'\n"), "services.web.network_mode",
     "host_namespace"),
    ("net_foreign_service", svc("    network_mode: 'service:other'\n"),
     "services.web.network_mode", "host_namespace"),
    ("cap_add", svc("    cap_add: [SYS_ADMIN]\n"), "services.web.cap_add", "capabilities"),
    ("devices", svc("    devices: ['/dev/kvm:/dev/kvm']\n"), "services.web.devices",
     "devices"),
    ("security_opt", svc("    security_opt: ['seccomp=unconfined']\n"),
     "services.web.security_opt", "security_opt"),
    ("sysctls", svc("    sysctls: {net.ipv4.ip_forward: 1}\n"), "services.web.sysctls",
     "sysctls"),
    ("ports", svc("    ports: ['8080:80']\n"), "services.web.ports", "host_port"),
    ("cgroup_parent", svc("    cgroup_parent: /\n"), "services.web.cgroup_parent",
     "cgroup_parent"),
    ("runtime", svc("    runtime: runc\n"), "services.web.runtime", "runtime"),
    ("isolation", svc("    isolation: process\n"), "services.web.isolation", "runtime"),
    ("volumes_from_container", svc("    volumes_from: ['container:agent']\n"),
     "services.web.volumes_from[0]", "outside_project"),
    ("volumes_from_foreign", svc("    volumes_from: ['other']\n"),
     "services.web.volumes_from[0]", "outside_project"),
    ("external_links", svc("    external_links: ['db']\n"), "services.web.external_links",
     "outside_project"),
    ("env_file_abs", svc("    env_file: /etc/passwd\n"), "services.web.env_file",
     "path_outside_context"),
    ("env_file_up", svc("    env_file: ['ok.env', '../deployment.json']\n"),
     "services.web.env_file[1]", "path_outside_context"),
    ("extends", svc("    extends: {file: /etc/x.yml, service: a}\n"), "services.web.extends",
     "extends"),
    ("include", "include: [/etc/x.yml]\n" + svc(""), "include", "include"),
    ("build_abs", "services:\n  web:\n    build: /\n", "services.web.build",
     "path_outside_context"),
    ("build_up", "services:\n  web:\n    build: {context: ../..}\n",
     "services.web.build.context", "path_outside_context"),
    ("build_url", "services:\n  web:\n    build: https://github.com/x/y.git\n",
     "services.web.build", "path_outside_context"),
    ("build_git", "services:\n  web:\n    build: github.com/x/y\n",
     "services.web.build", "path_outside_context"),
    ("dockerfile_out", "services:\n  web:\n    build: {context: sub, dockerfile: ../../x}\n",
     "services.web.build.dockerfile", "path_outside_context"),
    ("build_net_host", "services:\n  web:\n    build: {context: ., network: host}\n",
     "services.web.build.network", "bad_value"),
    ("build_extra_hosts", "services:\n  web:\n    build: {context: ., extra_hosts: [a:1.2.3.4]}\n",
     "services.web.build.extra_hosts", "unknown_key"),
    ("network_external", svc("") + "networks:\n  n: {external: true}\n",
     "networks.n.external", "external"),
    ("network_name", svc("") + "networks:\n  n: {name: ee123-other_default}\n",
     "networks.n.name", "external"),
    ("network_macvlan", svc("") + "networks:\n  n: {driver: macvlan}\n", "networks.n.driver",
     "bad_value"),
    ("network_ipam", svc("") + "networks:\n  n: {ipam: {config: [{subnet: 10.0.0.0/8}]}}\n",
     "networks.n.ipam", "driver"),
    ("undeclared_network", svc("    networks: [other]\n"), "services.web.networks[0]",
     "undeclared_network"),
    ("label_compose", svc("    labels: {com.docker.compose.project: victim}\n"),
     "services.web.labels.com.docker.compose.project", "reserved_label"),
    ("label_ee_list", svc("    labels: ['ee.deployment=x']\n"), "services.web.labels[0]",
     "reserved_label"),
    ("label_build", "services:\n  web:\n    build: {context: ., labels: {io.easyenclave.x: y}}\n",
     "services.web.build.labels.io.easyenclave.x", "reserved_label"),
    ("logging_syslog", svc("    logging: {driver: syslog, options: {syslog-address: "
                           "'tcp://10.0.0.1:514'}}\n"), "services.web.logging.driver",
     "bad_value"),
    ("oom_negative", svc("    oom_score_adj: -1000\n"), "services.web.oom_score_adj",
     "bad_value"),
    ("secrets", svc("    secrets: [s]\n") + "secrets:\n  s: {file: /etc/shadow}\n",
     "secrets", "secrets"),
    ("configs", svc("    configs: [c]\n"), "services.web.configs", "secrets"),
    ("container_name", svc("    container_name: agent\n"), "services.web.container_name",
     "container_name"),
    ("project_name", "name: other\n" + svc(""), "name", "project_name"),
    ("extra_hosts", svc("    extra_hosts: ['h:host-gateway']\n"), "services.web.extra_hosts",
     "unknown_key"),
    ("dns", svc("    dns: [1.1.1.1]\n"), "services.web.dns", "unknown_key"),
    ("mac_address", svc("    mac_address: 02:42:ac:11:00:02\n"), "services.web.mac_address",
     "unknown_key"),
    ("unknown_service_key", svc("    gpus: all\n"), "services.web.gpus", "unknown_key"),
    ("unknown_top_key", "services:\n  web: {image: x}\nfuture_feature: {}\n", "future_feature",
     "unknown_key"),
    ("gpu_devices", svc("    deploy: {resources: {reservations: {devices: "
                        "[{capabilities: [gpu]}]}}}\n"),
     "services.web.deploy.resources.reservations.devices", "unknown_key"),
    ("image_with_build", "services:\n  web:\n    build: .\n    image: nginx:latest\n",
     "services.web.image", "image_with_build"),
    ("ulimit_rtprio", svc("    ulimits: {rtprio: 99}\n"), "services.web.ulimits.rtprio",
     "bad_value"),
    ("ulimit_memlock", svc("    ulimits: {memlock: {soft: -1, hard: -1}}\n"),
     "services.web.ulimits.memlock", "bad_value"),
    ("merge_key_smuggle", "x-bad: &bad\n  privileged: true\n"
     "services:\n  web:\n    <<: *bad\n    image: x\n", "services.web.privileged", "privileged"),
]

ALLOWED = [
    svc("    command: [sh, -c, 'exec httpd -f']\n    entrypoint: /bin/sh\n"
        "    environment: {A: '1', B: 2, C: null}\n    expose: [8080, '9000']\n"
        "    healthcheck: {test: [CMD, 'true'], interval: 5s, retries: 3}\n"
        "    restart: unless-stopped\n    user: root\n    read_only: true\n"
        "    working_dir: /srv\n    labels: {app.tier: web}\n    init: true\n"
        "    tmpfs: [/tmp]\n    mem_limit: 256m\n    cpus: 0.5\n    pids_limit: 100\n"
        "    ulimits: {nofile: {soft: 1024, hard: 2048}}\n    shm_size: 64m\n"
        "    oom_score_adj: 100\n    stop_signal: SIGTERM\n    cap_drop: [NET_RAW]\n"
        "    privileged: false\n    logging: {driver: json-file, options: {max-size: 1m}}\n"
        "    volumes: ['data:/data:ro', '/anonymous', {type: tmpfs, target: /run}]\n"
        "    networks: [back]\n    depends_on: {db: {condition: service_healthy}}\n"
        "    deploy: {resources: {limits: {cpus: '1', memory: 512M}}}\n"
        "  db:\n    build: {context: db, dockerfile: Dockerfile.db, args: {V: '1'}}\n"
        "    env_file: db/.env\n    networks: {back: {aliases: [database]}}\n"
        "    volumes_from: [web]\n  side:\n    image: x\n    network_mode: 'service:web'\n"
        "    ipc: 'service:web'\n"
        "volumes:\n  data: {}\nnetworks:\n  back: {internal: true}\nx-note: anything\n"),
    "version: '3.9'\nservices:\n  web:\n    build: .\n    network_mode: none\n",
]


@pytest.mark.parametrize(("name", "text", "path", "code"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_features_name_their_path(name: str, text: str, path: str, code: str) -> None:
    doc = validate_compose(text)
    with pytest.raises(WorkloadPolicyError) as info:
        check_compose(doc)
    assert (info.value.path, info.value.code) == (path, code), str(info.value)
    assert path in str(info.value)


@pytest.mark.parametrize("text", ALLOWED)
def test_allowed_features(text: str) -> None:
    check_compose(validate_compose(text))


def test_resolved_stage_paths_must_be_inside_the_context_root() -> None:
    root = "/data/workloads/d/context"
    resolved: dict[str, Any] = yaml.safe_load(
        "services:\n  web:\n    build: {context: /data/workloads/d/context/sub}\n"
        "    volumes: ['data:/d:rw']\nversion: '3.9'\nvolumes:\n  data: {}\n")
    check_compose(resolved, stage="resolved", context_root=root)
    for context, code in [("/data/workloads/d", "path_outside_context"),
                          ("/data/workloads/d/context/../deployment.json",
                           "path_outside_context"),
                          ("/data/workloads/d/context/$x", "path_outside_context"),
                          ("relative/../../..", "path_outside_context")]:
        resolved["services"]["web"]["build"]["context"] = context
        with pytest.raises(WorkloadPolicyError) as info:
            check_compose(resolved, stage="resolved", context_root=root)
        assert info.value.code == code and info.value.path == "services.web.build.context"
    resolved["services"]["web"]["build"]["context"] = root
    resolved["services"]["web"]["volumes"] = ["/:/host:rw"]  # what `config` prints for a bind
    with pytest.raises(WorkloadPolicyError) as info:
        check_compose(resolved, stage="resolved", context_root=root)
    assert info.value.code == "bind_mount"
    with pytest.raises(ValueError):
        check_compose(resolved, stage="resolved")  # a resolved check needs its root


def test_harden_adds_the_agent_security_options_only() -> None:
    doc = validate_compose(ALLOWED[1])
    hardened = harden(doc)
    web = hardened["services"]["web"]
    assert web["security_opt"] == ["no-new-privileges:true"]
    assert web["cap_drop"] == ["ALL"] and web["cap_add"] == list(DEFAULT_CAP_ADD)
    assert web["privileged"] is False and web["build"] == "."
    assert "security_opt" not in doc["services"]["web"]  # the input is not modified
    assert not any("seccomp" in opt or "apparmor" in opt for opt in web["security_opt"])


@pytest.mark.parametrize(
    ("env", "path", "code"),
    [
        ({"PYTHONPATH": "context"}, "env.PYTHONPATH", "reserved_env_name"),
        ({"PYTHONSTARTUP": "x"}, "env.PYTHONSTARTUP", "reserved_env_name"),
        ({"LD_PRELOAD": "/x.so"}, "env.LD_PRELOAD", "reserved_env_name"),
        ({"DOCKER_HOST": "tcp://evil:2375"}, "env.DOCKER_HOST", "reserved_env_name"),
        ({"docker_host": "tcp://evil:2375"}, "env.docker_host", "reserved_env_name"),
        ({"COMPOSE_FILE": "/etc/x"}, "env.COMPOSE_FILE", "reserved_env_name"),
        ({"PATH": "/tmp"}, "env.PATH", "reserved_env_name"),
        ({"HOME": "/tmp"}, "env.HOME", "reserved_env_name"),
        ({"https_proxy": "http://evil"}, "env.https_proxy", "reserved_env_name"),
        ({"EE_NO_SUCH_VARIABLE": "x"}, "env.EE_NO_SUCH_VARIABLE", "reserved_env_name"),
        ({"BAD NAME": "x"}, "env.BAD NAME", "bad_env_name"),
        ({"1X": "x"}, "env.1X", "bad_env_name"),
        ({"A": "x\x00y"}, "env.A", "bad_env_value"),
        ({"A": "x\ry"}, "env.A", "bad_env_value"),
        ({"A": 1}, "env.A", "bad_type"),
        ({"A": "x" * (MAX_ENV_VALUE_BYTES + 1)}, "env.A", "env_too_large"),
        ({f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}, "env", "env_too_large"),
        ({f"V{i}": "x" * 30000 for i in range(10)}, "env", "env_too_large"),
        (["A=1"], "env", "bad_type"),
    ],
)
def test_env_refusals(env: Any, path: str, code: str) -> None:
    with pytest.raises(WorkloadPolicyError) as info:
        check_env(env)
    assert (info.value.path, info.value.code) == (path, code)


def test_env_allowed() -> None:
    check_env({"GREETING": "hi", "_x": "multi\nline ${NOT_EXPANDED} 'q' \\", "TZ": "UTC"})


def test_resolved_stage_accepts_only_the_names_compose_v2_derives_from_the_project() -> None:
    root, project = "/w/ctx", "ee1234-dep"
    v2: dict[str, Any] = yaml.safe_load(
        f"name: {project}\nservices:\n  web:\n    image: x\n    networks: {{default: null}}\n"
        f"    volumes: ['data:/d:rw']\nnetworks:\n  default: {{name: {project}_default}}\n"
        f"volumes:\n  data: {{name: {project}_data}}\n")
    check_compose(v2, stage="resolved", context_root=root, project=project)
    for where, other in (("name", "victim"), ("networks.default.name", "victim_default"),
                         ("volumes.data.name", "victim_data")):
        doc = yaml.safe_load(yaml.safe_dump(v2))
        section, *rest = where.split(".")
        if rest:
            doc[section][rest[0]]["name"] = other
        else:
            doc["name"] = other
        with pytest.raises(WorkloadPolicyError) as info:
            check_compose(doc, stage="resolved", context_root=root, project=project)
        assert info.value.path == where
    with pytest.raises(WorkloadPolicyError):  # at upload, no name is the project's own
        check_compose(v2, stage="upload")


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("volumes", ["/tmp/r1/hostdir${PATH}"]),  # Compose v1 `config` of '$${PATH}'
        ("volumes", ["/x$HOME"]),
        ("environment", {"P": "${HOME}"}),
        ("command", ["sh", "-c", "echo $$$X"]),  # "$$" then "$X": "$" then interpolated
        ("labels", {"a${X}": "1"}),
    ],
)
def test_resolved_stage_refuses_anything_left_to_interpolate(where: str, value: Any) -> None:
    """`up` interpolates the resolved file again with the CLI's environment, so after
    `config` no unescaped '$' may be left anywhere (keys included)."""
    root = "/data/workloads/d/context"
    doc: dict[str, Any] = {"services": {"web": {"image": "x", where: value}}}
    with pytest.raises(WorkloadPolicyError) as info:
        check_compose(doc, stage="resolved", context_root=root)
    assert info.value.code == "interpolation", str(info.value)
    assert info.value.path.startswith(f"services.web.{where}")
    # Escaped dollars ("$$", what `config` prints for a literal '$') stay allowed, and
    # the upload stage does not apply this check (the CLI has not interpolated yet).
    ok: dict[str, Any] = {"services": {"web": {"image": "x", "command": "echo $$HOME $$$$"}}}
    check_compose(ok, stage="resolved", context_root=root)
    if where != "volumes":
        check_compose(doc, stage="upload")


@pytest.mark.parametrize("value", ["/", "/health?x=1", "/a/b%20c"])
def test_health_path_allowed(value: str) -> None:
    check_health_path(value)


@pytest.mark.parametrize(
    "value", ["", "health", "/a b", "/a#b", "/a\r\nHost: x", "/a\tb", "/\x00", 5, None,
              "/" + "a" * 1024])
def test_health_path_refused(value: object) -> None:
    with pytest.raises(WorkloadPolicyError) as info:
        check_health_path(value)
    assert info.value.code == "bad_health_path"
