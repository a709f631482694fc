"""The workload boundary: which Compose features and tenant env a workload may use (pure).

Theory of operation
-------------------
A tenant's compose document is hostile until checked. The checks here are an
**allowlist**: every top-level key, service key, volume, network and nested option that
is not named in the tables below is refused, so a Compose feature added tomorrow is
refused until someone reviews it and adds a row. Each refusal raises
:class:`WorkloadPolicyError` with ``path`` (``services.web.volumes[0]``), a stable
``code`` (the API reason code) and a human message.

The same function runs twice, on two views of the same document:

``stage="upload"``
    The CP (at version upload, a 400 naming the path) and the agent (before it writes
    or runs anything) check the tenant's YAML as ``yaml.safe_load`` parsed it: anchors
    and merge keys are already expanded. Paths (build contexts, Dockerfiles,
    ``env_file``) must be relative and stay inside the build context. ``extends`` and
    ``include`` are refused: they read other files that only Compose would resolve.

``stage="resolved"``
    The agent runs the Compose CLI's own ``config`` on the upload (it expands what
    the CLI expands: interpolation, ``env_file``, profiles, defaults) and checks *that*
    model, then runs exactly that resolved file (:func:`harden` only adds the agent's
    security options). Paths are absolute there and must lie inside ``context_root``.
    So there is no parser differential between what is checked and what is run.
    ``up`` interpolates that file once more (with the CLI's own environment), and
    Compose v1's ``config`` does not re-escape ``$`` in volume specs, so the resolved
    check refuses any unescaped ``$`` left anywhere in it (reason ``interpolation``).

What a workload may use: images or build contexts, command/entrypoint, environment,
``expose`` (never host ``ports``), named volumes without driver options, anonymous
volumes and tmpfs, healthchecks, restart policies, ``depends_on``/``links``/
``volumes_from`` within the project, resource limits, ``user``, ``read_only``,
``working_dir``, labels outside reserved prefixes, and the project's own bridge
networks. Refused with a specific code: privileged mode, host or foreign namespaces,
added capabilities, devices, ``security_opt``, sysctls, bind mounts and the Docker
socket, host ports, ``external`` or named (``name:``) networks and volumes, volume and
network drivers, foreign logging drivers (they run in the host's network namespace),
``secrets``/``configs`` (bind mounts of host files in Compose v1), and every other key.

Images are shared by every deployment on the VM's dockerd, so a service that builds may
not name its image (``image_with_build``: Compose would tag the build with that name,
``down --rmi local`` would keep it, and the next deployment naming it would run it); the
agent also refuses names of its own projects' builds. ``pull_policy`` stays open: with
no way to create a tag but the project's own (removed at undeploy), which local image a
name resolves to is no longer the tenant's to choose, and ``always`` would break
offline VMs.

Why ``user: root`` is allowed: with dockerd's user-namespace remapping (see
``ee/agent/dockerd.json``) root in a container is an unprivileged uid on the VM, the
agent drops every capability but :data:`DEFAULT_CAP_ADD`, and ``no-new-privileges``
stops setuid escalation; many stock images need root at start to chown their data.

Tenant environment (:func:`check_env`): names ``[A-Za-z_][A-Za-z0-9_]*``, no NUL or CR, count
and size caps, and names that steer the Compose CLI, the dynamic loader, interpreters
or TLS trust (``DOCKER_*``, ``COMPOSE_*``, ``LD_*``, ``PYTHON*``, ``PATH``, …) refused.
The agent never puts tenant env in any process environment; the check is the second
wall (Compose v1 reads ``DOCKER_HOST`` and ``COMPOSE_*`` from its ``--env-file``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import attrs

__all__ = [
    "ALLOWED_ULIMITS",
    "DEFAULT_CAP_ADD",
    "MAX_ENV_TOTAL_BYTES",
    "MAX_ENV_VALUE_BYTES",
    "MAX_ENV_VARS",
    "MAX_SCALE",
    "RESERVED_ENV_NAMES",
    "RESERVED_ENV_PREFIXES",
    "RESERVED_LABEL_PREFIXES",
    "SERVICE_KEYS",
    "Stage",
    "WorkloadPolicyError",
    "check_compose",
    "check_env",
    "check_health_path",
    "harden",
]

Stage = Literal["upload", "resolved"]

#: Capabilities every container gets back after ``cap_drop: [ALL]``. Docker's default set
#: minus MKNOD, NET_RAW (raw sockets: ARP/ICMP spoofing on the bridge), SETFCAP, SETPCAP,
#: SYS_CHROOT, AUDIT_WRITE and FSETID. Kept: CHOWN, DAC_OVERRIDE and FOWNER (entrypoints
#: that prepare data dirs as root, e.g. postgres, nginx), SETUID/SETGID (images that drop
#: to a service user: gosu, su-exec, nginx workers), NET_BIND_SERVICE (ports below
#: 1024, e.g. nginx on 80) and KILL (an init or supervisor signalling other uids).
DEFAULT_CAP_ADD: tuple[str, ...] = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
)
NO_NEW_PRIVILEGES = "no-new-privileges:true"

RESERVED_LABEL_PREFIXES: tuple[str, ...] = ("com.docker.", "ee.", "io.easyenclave")
MAX_SCALE = 10
MAX_ENV_VARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_TOTAL_BYTES = 256 * 1024

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Compared upper-cased. Proxies are read in lower case by many tools, hence upper() too.
RESERVED_ENV_NAMES: frozenset[str] = frozenset(
    {
        "PATH", "HOME", "SHELL", "ENV", "BASH_ENV", "IFS", "CDPATH", "PS4", "TMPDIR",
        "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH", "NLSPATH", "HOSTALIASES",
        "RESOLV_HOST_CONF", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_OPTIONS",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "FTP_PROXY",
    }
)  # fmt: skip
RESERVED_ENV_PREFIXES: tuple[str, ...] = (
    "DOCKER_", "COMPOSE_", "LD_", "PYTHON", "BASH_FUNC_", "EE_", "BUILDKIT_", "MALLOC_",
    "SSL_", "OPENSSL_", "XDG_", "PERL5", "RUBY",
)  # fmt: skip


class WorkloadPolicyError(ValueError):
    """A workload feature the policy refuses: where (``path``), why (``code``), text."""

    def __init__(self, path: str, code: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.code = code
        self.message = message


@attrs.frozen
class _Ctx:
    stage: Stage
    root: str | None
    project: str | None
    services: frozenset[str]
    volumes: frozenset[str]
    networks: frozenset[str]


def _refuse(path: str, code: str, message: str) -> WorkloadPolicyError:
    return WorkloadPolicyError(path, code, message)


# ---------------------------------------------------------------------------
# Value shapes


def _typed(*kinds: type) -> Callable[[str, object, _Ctx], None]:
    names = " or ".join(k.__name__ for k in kinds)

    def check(path: str, value: object, _: _Ctx) -> None:
        if isinstance(value, bool) and bool not in kinds:
            raise _refuse(path, "bad_type", f"must be {names}")
        if not isinstance(value, kinds):
            raise _refuse(path, "bad_type", f"must be {names}")

    return check


_str = _typed(str)
_bool = _typed(bool)
_scalar = _typed(str, int, float)
_any_scalar = _typed(str, int, float, bool)


def _str_list(path: str, value: object, ctx: _Ctx) -> None:
    if isinstance(value, str):
        return
    _list_of(_str)(path, value, ctx)


def _list_of(item: Callable[[str, object, _Ctx], None]) -> Callable[[str, object, _Ctx], None]:
    def check(path: str, value: object, ctx: _Ctx) -> None:
        if not isinstance(value, list):
            raise _refuse(path, "bad_type", "must be a list")
        for index, element in enumerate(value):
            item(f"{path}[{index}]", element, ctx)

    return check


def _mapping(path: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _refuse(path, "bad_type", "must be a mapping")
    return value


def _keys(
    table: Mapping[str, Callable[[str, object, _Ctx], None]],
) -> Callable[[str, object, _Ctx], None]:
    """A mapping whose keys must be in ``table``; each value checked by its row."""

    def check(path: str, value: object, ctx: _Ctx) -> None:
        for key, item in _mapping(path, value).items():
            row = table.get(key)
            if row is None:
                raise _refuse(f"{path}.{key}", "unknown_key", f"{key!r} is not allowed here")
            row(f"{path}.{key}", item, ctx)

    return check


def _one_of(*allowed: object) -> Callable[[str, object, _Ctx], None]:
    def check(path: str, value: object, _: _Ctx) -> None:
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise _refuse(path, "bad_value", f"must be one of {', '.join(map(repr, allowed))}")

    return check


def _scalar_map(path: str, value: object, ctx: _Ctx) -> None:
    """``environment``-style: a mapping of scalars (or null) or a list of strings."""
    if isinstance(value, list):
        _list_of(_str)(path, value, ctx)
        return
    for key, item in _mapping(path, value).items():
        if item is not None:
            _any_scalar(f"{path}.{key}", item, ctx)


# ---------------------------------------------------------------------------
# Paths


def _context_path(path: str, value: object, ctx: _Ctx, *, base: str | None = None) -> None:
    """A host path Compose reads (build context, Dockerfile, env_file): inside the context."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _refuse(path, "bad_type", "must be a non-empty path")
    if ctx.stage == "upload":
        if value.startswith(("/", "~")) or ":" in value or "\\" in value or "$" in value:
            raise _refuse(path, "path_outside_context",
                          f"{value!r} must be a relative path inside the build context")
        if value.startswith(("github.com/", "git@")):
            raise _refuse(path, "path_outside_context", f"{value!r} is a remote context")
        joined = posixpath.normpath(posixpath.join(base or ".", value))
        if joined == ".." or joined.startswith("../"):
            raise _refuse(path, "path_outside_context",
                          f"{value!r} leaves the build context")
        return
    assert ctx.root is not None
    if "$" in value:
        raise _refuse(path, "path_outside_context", f"{value!r} must not contain '$'")
    full = posixpath.normpath(
        value if value.startswith("/") else posixpath.join(base or ctx.root, value)
    )
    if not full.startswith("/") or not (full == ctx.root or full.startswith(ctx.root + "/")):
        raise _refuse(path, "path_outside_context", f"{value!r} is outside the build context")


def _env_file(path: str, value: object, ctx: _Ctx) -> None:
    if isinstance(value, str):
        _context_path(path, value, ctx)
        return
    _list_of(_context_path)(path, value, ctx)


def _build(path: str, value: object, ctx: _Ctx) -> None:
    if isinstance(value, str):
        _context_path(path, value, ctx)
        return
    build = _mapping(path, value)
    _keys(BUILD_KEYS)(path, build, ctx)
    context = build.get("context", ".")
    _context_path(f"{path}.context", context, ctx)
    if "dockerfile" in build:
        if ctx.stage == "upload":
            base = str(context)
        else:
            assert ctx.root is not None
            base = posixpath.join(ctx.root, str(context))
        _context_path(f"{path}.dockerfile", build["dockerfile"], ctx, base=base)


# ---------------------------------------------------------------------------
# Volumes, networks, namespaces


_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _mount_source_refusal(path: str, source: str) -> WorkloadPolicyError:
    if "docker.sock" in source or "docker_engine" in source:
        return _refuse(path, "docker_socket", "the Docker socket is never mounted")
    return _refuse(path, "bind_mount",
                   f"bind mount of host path {source!r}: use a named volume or tmpfs")


def _no_interpolation_in_mount(path: str, value: object) -> None:
    """Mount specs must be checkable as uploaded: a ``${VAR}`` in one (``'/${V}'`` with
    ``V=':/host'``) only shows what it mounts after interpolation, so the CP could not
    refuse it at upload (the agent's resolved-stage check would, late)."""
    if isinstance(value, str) and "$" in value.replace("$$", ""):
        raise _refuse(path, "interpolation",
                      f"{value!r}: variables are not allowed in volume or tmpfs specs")


def _service_volume(path: str, value: object, ctx: _Ctx) -> None:
    if isinstance(value, str):
        _no_interpolation_in_mount(path, value)
        parts = value.split(":")
        if len(parts) == 1:
            if not value.startswith("/"):
                raise _mount_source_refusal(path, value)
            return  # an anonymous volume at a container path
        source, *rest = parts
        if "docker.sock" in value:
            raise _mount_source_refusal(path, value)
        if not _VOLUME_NAME.fullmatch(source):
            raise _mount_source_refusal(path, source)
        if source not in ctx.volumes:
            raise _refuse(path, "undeclared_volume",
                          f"volume {source!r} is not declared under top-level 'volumes'")
        if len(rest) > 2 or not rest[0].startswith("/"):
            raise _refuse(path, "bad_value", f"{value!r} is not 'volume:/path[:ro|rw]'")
        if len(rest) == 2 and not set(rest[1].split(",")) <= {"ro", "rw", "nocopy"}:
            raise _refuse(path, "bad_value", f"volume mode {rest[1]!r} is not allowed")
        return
    mount = _mapping(path, value)
    for key in ("type", "source", "target"):
        _no_interpolation_in_mount(f"{path}.{key}", mount.get(key))
    kind = mount.get("type")
    mount_source = mount.get("source")
    if kind in ("bind", "npipe"):
        raise _mount_source_refusal(f"{path}.source", str(mount_source))
    _keys(MOUNT_KEYS)(path, mount, ctx)
    if kind == "volume":
        if mount_source is not None and mount_source not in ctx.volumes:
            raise _refuse(f"{path}.source", "undeclared_volume",
                          f"volume {mount_source!r} is not declared under top-level 'volumes'")
    elif kind == "tmpfs":
        if mount_source is not None:
            raise _refuse(f"{path}.source", "bad_value", "a tmpfs mount has no source")
    else:
        raise _refuse(f"{path}.type", "bad_value", "mount type must be 'volume' or 'tmpfs'")


def _project_ref(mode: str, *allowed: str) -> Callable[[str, object, _Ctx], None]:
    """``network_mode``/``ipc``/``pid``: only ``service:<a service of this project>``."""

    def check(path: str, value: object, ctx: _Ctx) -> None:
        if value in allowed:
            return
        target = value.removeprefix("service:") if isinstance(value, str) else None
        if target in ctx.services and target != value:
            return
        raise _refuse(path, "host_namespace",
                      f"{mode} {value!r}: only "
                      + ", ".join([*map(repr, allowed), "'service:<service of this project>'"]))

    return check


def _service_networks(path: str, value: object, ctx: _Ctx) -> None:
    names: list[tuple[str, object]]
    if isinstance(value, list):
        names = [(f"{path}[{i}]", n) for i, n in enumerate(value)]
    else:
        mapping = _mapping(path, value)
        names = [(f"{path}.{n}", n) for n in mapping]
        for name, options in mapping.items():
            if options is not None:
                _keys({"aliases": _list_of(_str)})(f"{path}.{name}", options, ctx)
    for where, net in names:
        if net != "default" and net not in ctx.networks:
            raise _refuse(where, "undeclared_network",
                          f"network {net!r} is not declared under top-level 'networks'")


def _in_project(kind: str) -> Callable[[str, object, _Ctx], None]:
    """``depends_on``, ``links``, ``volumes_from``: other services of this project only."""

    def item(path: str, value: object, ctx: _Ctx) -> None:
        _str(path, value, ctx)
        assert isinstance(value, str)
        name = value
        if kind == "volumes_from":
            if name.startswith("container:"):
                raise _refuse(path, "outside_project", "volumes_from a container is not allowed")
            name = name.removeprefix("service:").split(":")[0]
        elif kind == "links":
            name = name.split(":")[0]
        if name not in ctx.services:
            raise _refuse(path, "outside_project", f"{name!r} is not a service of this project")

    def check(path: str, value: object, ctx: _Ctx) -> None:
        if kind == "depends_on" and isinstance(value, dict):
            for name, cond in value.items():
                item(f"{path}.{name}", name, ctx)
                _keys({"condition": _one_of("service_started", "service_healthy",
                                            "service_completed_successfully")})(
                    f"{path}.{name}", cond, ctx)
            return
        _list_of(item)(path, value, ctx)

    return check


def _labels(path: str, value: object, ctx: _Ctx) -> None:
    _scalar_map(path, value, ctx)
    keys = (
        [str(v).split("=", 1)[0] for v in value]
        if isinstance(value, list)
        else list(_mapping(path, value))
    )
    for index, key in enumerate(keys):
        if key.lower().startswith(RESERVED_LABEL_PREFIXES):
            where = f"{path}[{index}]" if isinstance(value, list) else f"{path}.{key}"
            raise _refuse(where, "reserved_label",
                          f"label {key!r} uses a reserved prefix "
                          f"({', '.join(RESERVED_LABEL_PREFIXES)})")


def _privileged(path: str, value: object, _: _Ctx) -> None:
    if value is not False:
        raise _refuse(path, "privileged", "privileged containers are not allowed")


def _oom_score_adj(path: str, value: object, ctx: _Ctx) -> None:
    _typed(int)(path, value, ctx)
    assert isinstance(value, int)
    if not 0 <= value <= 1000:
        raise _refuse(path, "bad_value", "oom_score_adj must be 0..1000 (never below others)")


def _scale(path: str, value: object, ctx: _Ctx) -> None:
    _typed(int)(path, value, ctx)
    assert isinstance(value, int)
    if not 0 <= value <= MAX_SCALE:
        raise _refuse(path, "bad_value", f"scale must be 0..{MAX_SCALE}")


def _restart(path: str, value: object, _: _Ctx) -> None:
    if not isinstance(value, str) or not re.fullmatch(
        r"no|always|unless-stopped|on-failure(:[0-9]{1,4})?", value
    ):
        raise _refuse(path, "bad_value", "restart must be no, always, unless-stopped or "
                      "on-failure[:N]")


#: ``nofile`` and ``nproc`` only: ``rtprio``/``nice`` buy real-time or raised scheduling
#: priority over other tenants, ``memlock`` pins memory outside reclaim, and the rest
#: (``core``, ``stack``, ``fsize``, ...) no workload needs to raise.
ALLOWED_ULIMITS: frozenset[str] = frozenset({"nofile", "nproc"})


def _ulimits(path: str, value: object, ctx: _Ctx) -> None:
    for name, limit in _mapping(path, value).items():
        if name not in ALLOWED_ULIMITS:
            raise _refuse(f"{path}.{name}", "bad_value",
                          f"ulimit {name!r} is not allowed (only "
                          f"{', '.join(sorted(ALLOWED_ULIMITS))})")
        if isinstance(limit, dict):
            _keys({"soft": _typed(int), "hard": _typed(int)})(f"{path}.{name}", limit, ctx)
        else:
            _typed(int)(f"{path}.{name}", limit, ctx)


def _logging(path: str, value: object, ctx: _Ctx) -> None:
    _keys({"driver": _one_of("json-file", "local"),
           "options": _keys({"max-size": _str, "max-file": _str, "compress": _str})})(
        path, value, ctx)


def _tmpfs(path: str, value: object, ctx: _Ctx) -> None:
    _str_list(path, value, ctx)
    for index, item in enumerate(value if isinstance(value, list) else [value]):
        _no_interpolation_in_mount(f"{path}[{index}]" if isinstance(value, list) else path,
                                   item)


def _refused(code: str, message: str) -> Callable[[str, object, _Ctx], None]:
    def check(path: str, _: object, __: _Ctx) -> None:
        raise _refuse(path, code, message)

    return check


# ---------------------------------------------------------------------------
# The tables

_Check = Callable[[str, object, _Ctx], None]

BUILD_KEYS: Mapping[str, _Check] = MappingProxyType(
    {
        "context": lambda *_: None,  # checked by _build (needs the dockerfile too)
        "dockerfile": lambda *_: None,
        "args": _scalar_map,
        "target": _str,
        "labels": _labels,
        "cache_from": _list_of(_str),
        "network": _one_of("default", "none"),
        "shm_size": _scalar,
    }
)

MOUNT_KEYS: Mapping[str, _Check] = MappingProxyType(
    {
        "type": _str,
        "source": _str,
        "target": _str,
        "read_only": _bool,
        "consistency": _str,
        "volume": _keys({"nocopy": _bool}),
        "tmpfs": _keys({"size": _scalar}),
    }
)

_RESOURCES = _keys(
    {
        "limits": _keys({"cpus": _scalar, "memory": _scalar, "pids": _typed(int)}),
        "reservations": _keys({"cpus": _scalar, "memory": _scalar}),
    }
)

#: Every service key a tenant may use, each with its check.
SERVICE_KEYS: Mapping[str, _Check] = MappingProxyType(
    {
        "image": _str,
        "build": _build,
        "command": _str_list,
        "entrypoint": _str_list,
        "environment": _scalar_map,
        "env_file": _env_file,
        "expose": _list_of(_scalar),
        "volumes": _list_of(_service_volume),
        "tmpfs": _tmpfs,
        "healthcheck": _keys(
            {
                "test": _str_list,
                "interval": _str,
                "timeout": _str,
                "retries": _typed(int),
                "start_period": _str,
                "disable": _bool,
            }
        ),
        "restart": _restart,
        "depends_on": _in_project("depends_on"),
        "links": _in_project("links"),
        "volumes_from": _in_project("volumes_from"),
        "networks": _service_networks,
        "network_mode": _project_ref("network_mode", "none"),
        "ipc": _project_ref("ipc", "private", "shareable"),
        "pid": _project_ref("pid"),
        "deploy": _keys({"resources": _RESOURCES}),
        "cpus": _scalar,
        "cpu_shares": _typed(int),
        "cpu_quota": _scalar,
        "cpu_period": _scalar,
        "cpuset": _str,
        "mem_limit": _scalar,
        "mem_reservation": _scalar,
        "memswap_limit": _scalar,
        "mem_swappiness": _typed(int),
        "pids_limit": _typed(int),
        # /dev/shm is a tmpfs charged to the container's memory cgroup: the memory
        # limit caps it, so it needs no cap of its own.
        "shm_size": _scalar,
        "ulimits": _ulimits,
        "oom_score_adj": _oom_score_adj,
        "scale": _scale,
        "user": _scalar,
        "working_dir": _str,
        "read_only": _bool,
        "init": _bool,
        "tty": _bool,
        "stdin_open": _bool,
        "stop_signal": _str,
        "stop_grace_period": _str,
        "hostname": _str,
        "domainname": _str,
        "labels": _labels,
        "logging": _logging,
        "profiles": _list_of(_str),
        "platform": _str,
        "pull_policy": _one_of("always", "never", "missing", "if_not_present", "build"),
        "privileged": _privileged,
        # Refused with a specific reason (everything not listed is refused as unknown).
        "ports": _refused("host_port", "publishing ports on the host is not allowed; the "
                          "agent reaches expose_port on the project network"),
        "cap_add": _refused("capabilities", "adding capabilities is not allowed (the agent "
                            "grants a fixed minimal set: " + ", ".join(DEFAULT_CAP_ADD) + ")"),
        "cap_drop": _list_of(_str),
        "devices": _refused("devices", "host devices are not allowed"),
        "device_cgroup_rules": _refused("devices", "device cgroup rules are not allowed"),
        "security_opt": _refused("security_opt", "security options are set by the agent"),
        "sysctls": _refused("sysctls", "sysctls are not allowed"),
        "userns_mode": _refused("host_namespace", "userns_mode is not allowed"),
        "uts": _refused("host_namespace", "uts is not allowed"),
        "cgroup": _refused("host_namespace", "cgroup namespace mode is not allowed"),
        "cgroup_parent": _refused("cgroup_parent", "cgroup_parent is not allowed"),
        "runtime": _refused("runtime", "choosing the container runtime is not allowed"),
        "isolation": _refused("runtime", "isolation is not allowed"),
        "extends": _refused("extends", "extends is not supported: inline the service"),
        "container_name": _refused("container_name", "container_name is not allowed "
                                   "(names are per project)"),
        "external_links": _refused("outside_project", "external_links is not allowed"),
        "secrets": _refused("secrets", "secrets/configs are bind mounts of host files"),
        "configs": _refused("secrets", "secrets/configs are bind mounts of host files"),
    }
)

_VOLUME_KEYS = _keys({"labels": _labels})
_NETWORK_KEYS = _keys({"labels": _labels, "internal": _bool, "driver": _one_of("bridge")})


def _without_default_name(name: str, spec: object, ctx: _Ctx) -> object:
    """Compose v2's ``config`` names every network and volume ``<project>_<key>``: that
    name (and only that one) is the project's own, so the resolved check accepts it."""
    if (ctx.stage == "resolved" and isinstance(spec, dict) and ctx.project is not None
            and spec.get("name") == f"{ctx.project}_{name}"):
        return {k: v for k, v in spec.items() if k != "name"}
    return spec


def _top_volumes(path: str, value: object, ctx: _Ctx) -> None:
    for name, spec in _mapping(path, value).items():
        if not _VOLUME_NAME.fullmatch(name):
            raise _refuse(f"{path}.{name}", "bad_value", "bad volume name")
        spec = _without_default_name(name, spec, ctx)
        if spec is not None:
            _refusals(f"{path}.{name}", spec, ("external", "name", "driver", "driver_opts"))
            _VOLUME_KEYS(f"{path}.{name}", spec, ctx)


def _top_networks(path: str, value: object, ctx: _Ctx) -> None:
    for name, spec in _mapping(path, value).items():
        spec = _without_default_name(name, spec, ctx)
        if spec is not None:
            _refusals(f"{path}.{name}", spec, ("external", "name", "ipam", "driver_opts"))
            _NETWORK_KEYS(f"{path}.{name}", spec, ctx)


def _refusals(path: str, spec: object, keys: tuple[str, ...]) -> None:
    for key in keys:
        if isinstance(spec, dict) and key in spec:
            code = "external" if key in ("external", "name") else "driver"
            raise _refuse(f"{path}.{key}", code,
                          f"{key!r} is not allowed: volumes and networks belong to the project")


TOP_LEVEL_KEYS: Mapping[str, _Check] = MappingProxyType(
    {
        "version": _scalar,
        "services": lambda *_: None,  # checked service by service
        "volumes": _top_volumes,
        "networks": _top_networks,
        "include": _refused("include", "include is not supported: inline the services"),
        "secrets": _refused("secrets", "secrets/configs are bind mounts of host files"),
        "configs": _refused("secrets", "secrets/configs are bind mounts of host files"),
        "name": _refused("project_name", "the agent names the project"),
    }
)


def check_compose(
    doc: Mapping[str, Any],
    *,
    stage: Stage = "upload",
    context_root: str | None = None,
    project: str | None = None,
) -> None:
    """Raise :class:`WorkloadPolicyError` for the first refused feature of ``doc``.

    ``doc`` is a compose document that :func:`ee.protocol.compose.validate_compose`
    accepted (``stage="upload"``) or the Compose CLI's ``config`` output
    (``stage="resolved"``, with ``context_root`` the absolute project directory and
    ``project`` the project name the agent gave the CLI: Compose v2 prints it as the
    top-level ``name`` and in network and volume names).
    """
    if stage == "resolved" and (context_root is None or not context_root.startswith("/")):
        raise ValueError("the resolved stage needs an absolute context_root")
    root = None if context_root is None else posixpath.normpath(context_root)
    services = _mapping("services", doc.get("services"))

    def names(key: str) -> frozenset[str]:
        section = doc.get(key)
        return frozenset(section) if isinstance(section, dict) else frozenset()

    ctx = _Ctx(stage=stage, root=root, project=project, services=frozenset(services),
               volumes=names("volumes"), networks=names("networks"))
    for key, value in doc.items():
        if key.startswith("x-"):
            continue  # extension fields: inert data (anchors live there)
        if key == "name" and stage == "resolved" and project is not None and value == project:
            continue  # Compose v2 prints the project name the agent chose
        row = TOP_LEVEL_KEYS.get(key)
        if row is None:
            raise _refuse(key, "unknown_key", f"top-level key {key!r} is not allowed")
        row(key, value, ctx)
    for name, service in services.items():
        path = f"services.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", name):
            raise _refuse(path, "bad_value", "service names are [A-Za-z0-9][A-Za-z0-9_.-]*")
        for key, value in _mapping(path, service).items():
            if key.startswith("x-"):
                continue
            row = SERVICE_KEYS.get(key)
            if row is None:
                raise _refuse(f"{path}.{key}", "unknown_key",
                              f"service key {key!r} is not allowed")
            row(f"{path}.{key}", value, ctx)
        if "image" not in service and "build" not in service:
            raise _refuse(path, "bad_value", "a service needs 'image' or 'build'")
        if "image" in service and "build" in service:
            # Compose would tag the built image with that name on the VM's shared
            # dockerd, and ``down --rmi local`` keeps named images: a later deployment
            # (any tenant) naming the same image would run this one's build.
            raise _refuse(f"{path}.image", "image_with_build",
                          "a service that builds may not name its image: the agent names "
                          "it after the project and removes it at undeploy")
    if stage == "resolved":
        _check_no_interpolation(doc)


def _check_no_interpolation(doc: Mapping[str, Any]) -> None:
    """Refuse any ``$`` left unescaped in the CLI's resolved document.

    ``config`` escapes ``$`` as ``$$`` in ordinary strings but (Compose v1) not in
    volume specs, and ``up`` interpolates the resolved file again with the CLI's own
    environment: ``'/x$${PATH}'`` would come back from ``config`` as ``/x${PATH}`` and
    become a bind mount at ``up``. So after ``config`` nothing may be left to
    interpolate, anywhere (keys included). One iterative walk over the whole document.
    """
    stack: list[tuple[str, object]] = [("", doc)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                at = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and "$" in key.replace("$$", ""):
                    raise _refuse(at, "interpolation",
                                  f"key {key!r} would be interpolated again by the CLI")
                stack.append((at, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and "$" in value.replace("$$", ""):
            raise _refuse(where or "<root>", "interpolation",
                          f"{value!r} would be interpolated again by the Compose CLI")


def harden(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved document with the agent's security options on every service.

    ``no-new-privileges``, every capability dropped but :data:`DEFAULT_CAP_ADD`, and no
    other ``security_opt`` (so Docker's default seccomp and AppArmor profiles apply).
    Only ever adds to a document :func:`check_compose` accepted.
    """
    out = dict(resolved)
    services = {}
    for name, service in dict(resolved["services"]).items():
        hardened = dict(service)
        hardened["security_opt"] = [NO_NEW_PRIVILEGES]
        hardened["cap_drop"] = ["ALL"]
        hardened["cap_add"] = list(DEFAULT_CAP_ADD)
        hardened["privileged"] = False
        services[name] = hardened
    out["services"] = services
    return out


# ---------------------------------------------------------------------------
# Health path


def check_health_path(value: object, *, path: str = "health_path") -> None:
    """The path the agent GETs for health: absolute, printable, no space, ``#`` or
    control character (CP at upload and the agent's DeploySpec use this one check)."""
    if (not isinstance(value, str) or not value.startswith("/") or len(value) > 1024
            or any(c in value for c in " #") or not value.isprintable()):
        raise _refuse(path, "bad_health_path",
                      "health_path must be an absolute URL path (no space, '#' or control "
                      "characters, at most 1024 characters)")


# ---------------------------------------------------------------------------
# Tenant environment


def check_env(env: object, *, path: str = "env") -> None:
    """Raise :class:`WorkloadPolicyError` unless ``env`` is an acceptable tenant env."""
    if not isinstance(env, Mapping):
        raise _refuse(path, "bad_type", "env must be an object of strings")
    if len(env) > MAX_ENV_VARS:
        raise _refuse(path, "env_too_large", f"more than {MAX_ENV_VARS} variables")
    total = 0
    for name, value in env.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise _refuse(where, "bad_env_name", f"{name!r} is not [A-Za-z_][A-Za-z0-9_]*")
        if not isinstance(value, str):
            raise _refuse(where, "bad_type", "env values must be strings")
        if "\x00" in value or "\r" in value:
            raise _refuse(where, "bad_env_value", "env values must not contain NUL or CR")
        upper = name.upper()
        if upper in RESERVED_ENV_NAMES or upper.startswith(RESERVED_ENV_PREFIXES):
            raise _refuse(where, "reserved_env_name",
                          f"{name!r} is reserved (it steers the Compose CLI, the loader, "
                          "an interpreter or TLS trust)")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ENV_VALUE_BYTES:
            raise _refuse(where, "env_too_large", f"value over {MAX_ENV_VALUE_BYTES} bytes")
        total += size + len(name)
    if total > MAX_ENV_TOTAL_BYTES:
        raise _refuse(path, "env_too_large", f"env over {MAX_ENV_TOTAL_BYTES} bytes in total")
