"""Time to running: ComposeRunner.deploy vs the raw Compose CLI plus a health wait.

Both sides deploy the same app (the same compose file and build context) under a
fresh project name per run, and stop the clock when ``GET /health`` on the exposed
container's IP answers 2xx. The raw side is the floor: ``<compose> up -d --build``,
``docker inspect`` for the IP, and a tight 50 ms health poll. Runs alternate between
the two sides after one untimed warm-up each (so both see a warm build cache);
teardown is not timed. Prints the medians and their ratio (goal: runner ≤ 1.15x raw).

    python tools/bench/deploy.py --runs 7 [--app build|image]
"""

from __future__ import annotations

import argparse
import gzip
import io
import secrets
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import docker  # type: ignore[import-untyped]
import httpx
import trio

from ee.agent.workload import ComposeRunner, DeploySpec, WorkloadSettings, detect_compose_cli

REPO = Path(__file__).resolve().parents[2]

DOCKERFILE = b"""\
FROM ee-busybox:local
COPY www /var/www
CMD ["httpd", "-f", "-p", "8080", "-h", "/var/www"]
"""

COMPOSES = {
    "build": """\
services:
  web:
    build: .
    init: true
""",
    "image": """\
services:
  web:
    image: ee-busybox:local
    init: true
    command: ["sh", "-c", "mkdir -p /w && echo ok > /w/health && exec httpd -f -p 8080 -h /w"]
""",
}


def make_context() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, payload in (("Dockerfile", DOCKERFILE), ("www/health", b"ok\n")):
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(raw.getvalue())


async def wait_healthy(url: str) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
        while True:
            try:
                if (await client.get(url)).is_success:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.05)


class Raw:
    """The floor: Compose CLI + docker inspect + health poll, nothing else."""

    def __init__(self, cli: tuple[str, ...], workdir: Path, compose: str, context: bytes | None):
        self.cli = cli
        self.workdir = workdir
        (workdir / "context").mkdir(parents=True)
        (workdir / "docker-compose.yml").write_text(compose)
        if context is not None:
            with tarfile.open(fileobj=io.BytesIO(context), mode="r:gz") as tar:
                tar.extractall(workdir / "context", filter="data")
        self.client = docker.from_env()

    def argv(self, project: str, *command: str) -> list[str]:
        compose_file = str(self.workdir / "docker-compose.yml")
        context_dir = str(self.workdir / "context")
        return [
            *self.cli,
            "-p",
            project,
            "-f",
            compose_file,
            "--project-directory",
            context_dir,
            *command,
        ]

    async def deploy(self, project: str) -> float:
        start = trio.current_time()
        await trio.run_process(
            self.argv(project, "up", "-d", "--build"), capture_stdout=True, capture_stderr=True
        )

        def address() -> str:
            (container,) = self.client.containers.list(
                filters={"label": f"com.docker.compose.project={project}"}
            )
            networks: dict[str, Any] = container.attrs["NetworkSettings"]["Networks"]
            return str(next(iter(networks.values()))["IPAddress"])

        ip = await trio.to_thread.run_sync(address)
        with trio.fail_after(60):
            await wait_healthy(f"http://{ip}:8080/health")
        return trio.current_time() - start

    async def down(self, project: str) -> None:
        await trio.run_process(
            self.argv(project, "down", "-v", "--rmi", "local"),
            capture_stdout=True,
            capture_stderr=True,
        )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--app", choices=sorted(COMPOSES), default="build")
    args = parser.parse_args()

    await trio.run_process(["sh", str(REPO / "tools/images/build_busybox.sh")])
    cli = await detect_compose_cli()
    compose = COMPOSES[args.app]
    context = make_context() if args.app == "build" else None
    tag = secrets.token_hex(3)

    with tempfile.TemporaryDirectory(prefix="ee-bench-") as tmp:
        raw = Raw(cli.argv, Path(tmp) / "raw", compose, context)
        runner = ComposeRunner(
            Path(tmp) / "agent", WorkloadSettings(namespace=f"eebench{tag}", health_timeout=60)
        )

        async def run_raw(i: int) -> float:
            project = f"eebenchraw{tag}-{i}"
            try:
                return await raw.deploy(project)
            finally:
                await raw.down(project)

        async def run_runner(i: int) -> float:
            spec = DeploySpec(
                deployment_id=f"run-{i}",
                app="bench",
                version="1",
                compose=compose,
                build_context=context,
                expose_port=8080,
                health_path="/health",
            )
            start = trio.current_time()
            status = await runner.deploy(spec)
            elapsed = trio.current_time() - start
            await runner.undeploy(spec.deployment_id)
            if status.state != "running":
                raise RuntimeError(f"runner deploy failed: {status.error}")
            return elapsed

        await run_raw(-1)  # warm-up (build cache, page cache), untimed
        await run_runner(-1)
        raw_times: list[float] = []
        runner_times: list[float] = []
        for i in range(args.runs):
            raw_times.append(await run_raw(i))
            runner_times.append(await run_runner(i))

    raw_median = statistics.median(raw_times)
    runner_median = statistics.median(runner_times)
    ratio = runner_median / raw_median
    print(f"compose CLI: {' '.join(cli.argv)} ({cli.version}); app: {args.app}; runs: {args.runs}")
    print(
        f"raw    up -d + health: median {raw_median:.3f} s  "
        f"[{', '.join(f'{t:.2f}' for t in raw_times)}]"
    )
    print(
        f"runner deploy        : median {runner_median:.3f} s  "
        f"[{', '.join(f'{t:.2f}' for t in runner_times)}]"
    )
    print(f"ratio runner/raw     : {ratio:.3f}x (goal <= 1.15x)")
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
