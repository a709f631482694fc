"""The workload boundary on the agent, against the real Compose CLI and Docker daemon.

The agent refuses what the CP refuses even when told directly (nothing written, nothing
run), checks the model the Compose CLI resolved (not only the YAML it was sent), runs
containers hardened, and never lets tenant env into the CLI's process environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import docker  # type: ignore[import-untyped]
import pytest
import trio
import yaml

from ee.agent.workload import ComposeRunner, DeploySpec, env_file_text
from ee.protocol.messages import Deploy, DeployStatus, Message
from ee.protocol.workload_policy import DEFAULT_CAP_ADD

from .agentkit import StandInCp, agent_config, running_agent
from .test_workload import (
    DOCKER_TIMEOUT,
    IMAGE_ONLY_COMPOSE,
    busybox_image,  # noqa: F401  (fixture)
    make_context,
    namespace,  # noqa: F401  (fixture)
    needs_docker,
    project_containers,
    runner,  # noqa: F401  (fixture)
    settings_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))
from test_workload_policy import REFUSED


def spec(deployment_id: str, compose: str, **changes: Any) -> DeploySpec:
    return DeploySpec(deployment_id=deployment_id, app="x", version="1", compose=compose,
                      expose_port=8080, health_path="/health", **changes)


def nothing_of(of: ComposeRunner, deployment_id: str) -> None:
    assert project_containers(of.project_name(deployment_id)) == []
    assert not of.workload_dir(deployment_id).exists()


@needs_docker
async def test_every_refused_feature_is_refused_with_nothing_run(
    runner: ComposeRunner,  # noqa: F811
) -> None:
    with trio.fail_after(DOCKER_TIMEOUT):
        for index, (name, text, path, code) in enumerate(REFUSED):
            deployment_id = f"refused-{index}"
            status = await runner.deploy(spec(deployment_id, text))
            assert status.state == "failed", name
            assert status.error is not None
            assert f"workload policy ({code})" in status.error and path in status.error, (
                name, status.error)
            nothing_of(runner, deployment_id)
            assert (await runner.undeploy(deployment_id)).state == "stopped"


@needs_docker
async def test_the_resolved_model_is_checked_not_only_the_yaml(
    runner: ComposeRunner,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/${V}`` is an anonymous volume in the YAML; interpolated by the CLI it is ``/:/host``,
    a bind mount of the VM's root. The upload-stage check refuses variables in mounts
    today; this test stands for the next parser differential it misses (its upload stage
    is switched off), which the check of the resolved model must still catch."""
    import ee.agent.workload as workload_module

    real_check = workload_module.check_compose

    def resolved_stage_only(doc: Any, **kwargs: Any) -> None:
        if kwargs.get("stage", "upload") != "upload":
            real_check(doc, **kwargs)

    monkeypatch.setattr(workload_module, "check_compose", resolved_stage_only)
    compose = ("services:\n  web:\n    image: ee-busybox:local\n"
               "    command: [sleep, '60']\n    volumes: ['/${V}']\n")
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await runner.deploy(spec("interp", compose, env={"V": ":/host"}))
        assert status.state == "failed"
        assert status.error is not None
        assert "workload policy (bind_mount)" in status.error, status.error
        assert "services.web.volumes[0]" in status.error
        assert project_containers(runner.project_name("interp")) == []
        workdir = runner.workload_dir("interp")
        assert not (workdir / "resolved-compose.yml").exists()
        assert not (workdir / "tenant.env").exists()  # the env file never outlives `config`
        assert (await runner.undeploy("interp")).state == "stopped"


@needs_docker
async def test_symlink_chain_out_of_the_context_is_refused(
    runner: ComposeRunner,  # noqa: F811
) -> None:
    """``c -> .`` and ``a -> c/d/../..``: each fine lexically, together they climb out of
    the context (to the workload dir holding deployment.json), which Compose would follow
    for ``env_file: a/deployment.json``."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, kind, target in (("d", tarfile.DIRTYPE, ""), ("c", tarfile.SYMTYPE, "."),
                                   ("a", tarfile.SYMTYPE, "c/d/../..")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    context = gzip.compress(raw.getvalue())
    compose = IMAGE_ONLY_COMPOSE.replace("    init: true\n",
                                         "    init: true\n    env_file: a/deployment.json\n")
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await runner.deploy(spec("chain", compose, build_context=context))
        assert status.state == "failed"
        assert status.error is not None
        assert "symlink resolves outside the context root: 'a'" in status.error, status.error
        nothing_of(runner, "chain")
        assert (await runner.undeploy("chain")).state == "stopped"


SITECUSTOMIZE = b"""\
import os
import subprocess
open(os.environ.get("EE_TEST_MARKER", "/nonexistent/marker"), "w").write("ran")
"""


@needs_docker
async def test_tenant_env_never_reaches_the_compose_process(
    tmp_path: Path, namespace: str  # noqa: F811
) -> None:
    """The PYTHONPATH + sitecustomize.py attack: refused by name, and even smuggled past
    the name check (a CP that does not check), the tenant's code does not run in the CLI."""
    marker = tmp_path / "marker"
    context = make_context({"sitecustomize.py": (0o644, SITECUSTOMIZE)})
    with pytest.raises(ValueError, match="PYTHONPATH"):
        spec("env", IMAGE_ONLY_COMPOSE, env={"PYTHONPATH": "context"})

    # Positive control: this context *does* run code in a Compose process given the env.
    control = tmp_path / "control"
    control.mkdir()
    (control / "sitecustomize.py").write_bytes(SITECUSTOMIZE)
    await trio.run_process(["docker-compose", "version"], capture_stdout=True,
                           env={"PATH": os.environ["PATH"], "PYTHONPATH": str(control),
                                "EE_TEST_MARKER": str(marker)})
    assert marker.read_text() == "ran"
    marker.unlink()

    own = ComposeRunner(tmp_path / "data", settings_for(namespace))
    smuggled = spec("env", IMAGE_ONLY_COMPOSE.replace("init: true", "init: true\n"
                    "    environment: {P: '${PYTHONPATH}', M: '${EE_TEST_MARKER}'}"),
                    build_context=context, env={"GREETING": "x"})
    context_dir = own.workload_dir("env") / "context"
    object.__setattr__(smuggled, "env", MappingProxyType(
        {"PYTHONPATH": str(context_dir), "EE_TEST_MARKER": str(marker)}))
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await own.deploy(smuggled)
        assert status.state == "running", status.error
        assert not marker.exists()  # sitecustomize.py never ran in config/up
        (container,) = project_containers(own.project_name("env"))
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
        assert env["P"] == str(context_dir)  # the value reached the container only
        assert (await own.undeploy("env")).state == "stopped"


@needs_docker
async def test_containers_run_hardened_from_the_resolved_file(
    runner: ComposeRunner,  # noqa: F811
) -> None:
    compose = IMAGE_ONLY_COMPOSE.replace(
        "init: true", "init: true\n    environment: {FROM_DOTENV: '${FROM_DOTENV:-unset}', "
        "ODD: '${ODD}'}")
    # A tenant .env in the project directory is never read (it could set DOCKER_HOST).
    context = make_context({".env": (0o644, b"FROM_DOTENV=dotenv\nDOCKER_HOST=tcp://x:1\n")})
    odd = "a ${B} $$ 'q' \\ \nnext"
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await runner.deploy(spec("hard", compose, build_context=context,
                                          env={"ODD": odd}))
        assert status.state == "running", status.error
        (container,) = project_containers(runner.project_name("hard"))
        host = container.attrs["HostConfig"]
        assert host["SecurityOpt"] == ["no-new-privileges:true"]
        assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == sorted(DEFAULT_CAP_ADD)
        assert host["Privileged"] is False and not host.get("Binds")
        assert not [m for m in container.attrs["Mounts"] if m["Type"] == "bind"]
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
        assert env["FROM_DOTENV"] == "unset"
        assert env["ODD"] == odd  # exact, through --env-file and the resolved file
        # Inside, no-new-privileges and the capability set hold.
        status_text = container.exec_run(["cat", "/proc/self/status"]).output.decode()
        assert "NoNewPrivs:\t1" in status_text
        workdir = runner.workload_dir("hard")
        resolved = yaml.safe_load((workdir / "resolved-compose.yml").read_text())
        assert resolved["services"]["web"]["cap_drop"] == ["ALL"]
        for name in ("resolved-compose.yml", "docker-compose.yml", "deployment.json"):
            assert (workdir / name).stat().st_mode & 0o077 == 0, name
        assert not (workdir / "tenant.env").exists()
        assert runner.workloads_dir.stat().st_mode & 0o077 == 0
        assert (await runner.undeploy("hard")).state == "stopped"


def test_env_file_text_cannot_run_one_value_into_the_next() -> None:
    """Read back by the env-file reader the Compose CLI uses (python-dotenv, in the
    interpreter of ``docker-compose``), the file holds exactly the tenant's values: no
    extra ``DOCKER_HOST`` variable, no value running into the next."""
    import json
    import shutil

    values = {"A": "x\\", "B": "\nDOCKER_HOST=tcp://evil\n'", "C": "${HOME}$$ \"q\" #"}
    text = env_file_text(values)
    cli = shutil.which("docker-compose")
    if cli is None:
        pytest.skip("needs docker-compose (its python-dotenv reads the env file)")
    interpreter = Path(cli).read_text(errors="replace").splitlines()[0].removeprefix("#!")
    read = subprocess.run(
        [*interpreter.split(), "-c",
         "import io, json, sys, dotenv; print(json.dumps(dict(dotenv.dotenv_values("
         "stream=io.StringIO(sys.stdin.read())))))"],
        input=text, capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(read.stdout) == values


def _status(deployment_id: str) -> Any:
    def match(_frame: object, msg: Message) -> bool:
        return (isinstance(msg, DeployStatus) and msg.deployment_id == deployment_id
                and msg.state == "failed")
    return match


@needs_docker
async def test_agent_refuses_what_a_cp_sends_directly(
    tmp_path: Path, namespace: str  # noqa: F811
) -> None:
    settings = settings_for(namespace)
    bind = REFUSED[1][1]
    with trio.fail_after(DOCKER_TIMEOUT):
        async with trio.open_nursery() as nursery:
            peer: StandInCp = await nursery.start(StandInCp().run)
            config = agent_config(tmp_path / "agent", peer.url)
            async with running_agent(config, workload_settings=settings) as agent:
                await peer.send(Deploy(deployment_id="bind", app="a", version="1",
                                       compose=bind, expose_port=80, health_path="/"))
                _, msg = await peer.wait_for(_status("bind"))
                assert isinstance(msg, DeployStatus) and msg.error is not None
                assert "services.web.volumes[0]" in msg.error
                assert project_containers(agent.runner.project_name("bind")) == []
                assert not agent.runner.workload_dir("bind").exists()
                await peer.send(Deploy(deployment_id="envy", app="a", version="1",
                                       compose=IMAGE_ONLY_COMPOSE, expose_port=80,
                                       health_path="/", env={"PYTHONPATH": "context"}))
                _, msg = await peer.wait_for(_status("envy"))
                assert isinstance(msg, DeployStatus) and msg.error is not None
                assert "PYTHONPATH" in msg.error and "reserved" in msg.error
                assert project_containers(agent.runner.project_name("envy")) == []
            nursery.cancel_scope.cancel()
    client = docker.from_env()
    try:
        assert not [c for c in client.containers.list(all=True)
                    if c.labels.get("com.docker.compose.project", "").startswith(namespace)]
    finally:
        client.close()




@needs_docker
async def test_second_interpolation_bind_mount(
    tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Compose v1 `config` prints ``'hostdir$${PATH}'`` in a volume as ``hostdir${PATH}``
    (unescaped) and `up` would interpolate it again with the CLI's PATH: a RW bind mount
    of ``<hostdir>/usr/bin`` on ``/usr/local/bin``. Refused after `config`, nothing run."""
    monkeypatch.setenv("PATH", "/usr/bin:/usr/local/bin")
    hostdir = tmp_path / "hostdir"
    (hostdir / "usr" / "bin").mkdir(parents=True)
    (hostdir / "usr" / "bin" / "marker").write_text("HOST-SECRET\n")
    own = ComposeRunner(tmp_path / "d", settings_for(namespace, health_timeout=5))
    compose = ("services:\n  web:\n    image: ee-busybox:local\n"
               "    command: [sh, -c, 'cat /usr/local/bin/marker; "
               "echo pwned > /usr/local/bin/written; sleep 60']\n"
               f"    volumes: ['{hostdir}$${{PATH}}']\n")
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await own.deploy(spec("again", compose))
        assert status.state == "failed"
        assert status.error is not None
        assert "workload policy (interpolation)" in status.error, status.error
        assert "services.web.volumes[0]" in status.error
        assert project_containers(own.project_name("again")) == []
        assert not (hostdir / "usr" / "bin" / "written").exists()
        # The same through a tenant env value: V='${PATH}' used as '/x${V}'.
        tenant = compose.replace(f"{hostdir}$${{PATH}}", f"{hostdir}${{V}}")
        status = await own.deploy(spec("again2", tenant, env={"V": "${PATH}"}))
        assert status.state == "failed"
        assert status.error is not None and "(interpolation)" in status.error, status.error
        assert project_containers(own.project_name("again2")) == []
        assert not (hostdir / "usr" / "bin" / "written").exists()
        for deployment_id in ("again", "again2"):
            assert (await own.undeploy(deployment_id)).state == "stopped"


@needs_docker
async def test_interpolation_reads_nothing_of_the_agent(
    tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """``${HOME}`` and ``${DOCKER_HOST}`` in a tenant's file: `config` runs with PATH and
    a neutral HOME only, so neither the data dir nor the daemon address leaks."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///var/run/docker.sock")
    own = ComposeRunner(tmp_path / "data", settings_for(namespace))
    compose = IMAGE_ONLY_COMPOSE.replace(
        "init: true", "init: true\n    environment: {H: '${HOME}', "
        "D: '${DOCKER_HOST:-unset}'}")
    with trio.fail_after(DOCKER_TIMEOUT):
        status = await own.deploy(spec("leak", compose))
        assert status.state == "running", status.error
        (container,) = project_containers(own.project_name("leak"))
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
        assert env["H"] == "/nonexistent" and str(tmp_path) not in env["H"]
        assert env["D"] == "unset"
        assert (await own.undeploy("leak")).state == "stopped"


@needs_docker
async def test_another_projects_built_image_cannot_be_named(
    runner: ComposeRunner,  # noqa: F811
) -> None:
    """Built images are named after their project; naming one (in any spelling Docker
    resolves locally, interpolated or not) would run another deployment's build."""
    victim = runner.project_name("victim") + "_web"
    with trio.fail_after(DOCKER_TIMEOUT):
        for index, image in enumerate([victim, f"docker.io/library/{victim}",
                                       "library/${I}"]):
            compose = f"services:\n  web:\n    image: '{image}'\n    command: [sleep, '60']\n"
            deployment_id = f"thief-{index}"
            status = await runner.deploy(spec(deployment_id, compose, env={"I": victim}))
            assert status.state == "failed"
            assert status.error is not None
            assert "workload policy (foreign_image)" in status.error, status.error
            assert project_containers(runner.project_name(deployment_id)) == []
            assert (await runner.undeploy(deployment_id)).state == "stopped"


def test_check_images_normalises_docker_hub_spellings() -> None:
    from ee.agent.workload import check_images
    from ee.protocol.workload_policy import WorkloadPolicyError

    check_images({"services": {"a": {"image": "nginx:1.25"}, "b": {"build": "."}}}, "ee1")
    check_images({"services": {"a": {"image": "ee1x-y_web"}}}, "ee1")
    for image in ("ee1-y_web", "EE1-y_web:latest", "index.docker.io/library/ee1-y_web"):
        with pytest.raises(WorkloadPolicyError):
            check_images({"services": {"a": {"image": image}}}, "ee1")


@needs_docker
async def test_dockerfile_add_of_a_loopback_url_is_refused_before_building(
    runner: ComposeRunner,  # noqa: F811
) -> None:
    """``ADD http://127.0.0.1:<port>/secret`` would be fetched by dockerd from the VM's
    own loopback (the classic builder) and baked into the image: refused first."""
    import socket

    secret = b"LOOPBACK-SECRET\n"
    fetched: list[bytes] = []
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def serve() -> None:
        while True:
            conn, _ = await listener.accept()
            with conn:
                fetched.append(await conn.recv(4096))
                await conn.send(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(secret)
                                + secret)

    dockerfile = (b"FROM ee-busybox:local\n"
                  b"ADD http://127.0.0.1:%d/secret /stolen\n"
                  b'CMD ["sleep", "60"]\n' % port)
    context = make_context({"Dockerfile": (0o644, dockerfile)})
    with trio.fail_after(DOCKER_TIMEOUT), listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            status = await runner.deploy(spec("add", "services:\n  web:\n    build: .\n",
                                              build_context=context))
            nursery.cancel_scope.cancel()
        assert status.state == "failed"
        assert status.error is not None
        assert "workload policy (dockerfile_remote_source)" in status.error, status.error
        assert "Dockerfile:2" in status.error
        assert fetched == []
        nothing_of(runner, "add")
        assert (await runner.undeploy("add")).state == "stopped"
