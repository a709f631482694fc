"""docs/tenant-guide.md, run top to bottom against a live dev CP and agent: every ```sh
block in order in one bash (``set -euo pipefail``), each block's output checked against
the ```text block that follows it. A guide that drifts from the API fails here."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .guidekit import LiveCluster, blocks, script, split_output, unmatched

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "tenant-guide.md"
TOOLS = ("curl", "jq", "tar", "base64", "xxd", "sha512sum", "openssl", "eectl", "docker")
RUN_TIMEOUT_S = 600

missing = [t for t in TOOLS if subprocess.run(["sh", "-c", f"command -v {t}"],
                                              capture_output=True).returncode != 0]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"the guide needs {', '.join(missing)}"),
    pytest.mark.skipif(
        subprocess.run(["docker", "info"], capture_output=True).returncode != 0,
        reason="needs a running dockerd (tools/test starts one)"),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LiveCluster]:
    live = LiveCluster(tmp_path)
    try:
        live.start()
        yield live
    finally:
        live.stop()


def test_guide_blocks_are_read_with_their_expected_output() -> None:
    guide = blocks(GUIDE.read_text())
    assert len(guide) >= 12
    assert guide[0].expected == ("ok",)
    assert any("verify-quote" in b.command for b in guide)
    assert all("ports:" not in b.command for b in guide)


def test_tenant_guide_runs_top_to_bottom(cluster: LiveCluster, tmp_path: Path) -> None:
    guide = blocks(GUIDE.read_text())
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in cluster.env.items() if not k.startswith("EE_") or k == "EE_SIM_DIR"}
    env.update(EE_CP=cluster.cp_url, EE_ADMIN_TOKEN=cluster.admin_token)
    proc = subprocess.Popen(["bash", "-c", script(guide)], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the guide did not finish in {RUN_TIMEOUT_S} s\n{stderr}\n"
                    f"{cluster.logs()}")
    outputs = split_output(stdout)
    last = max(outputs, default=-1)
    where = f"block {last} (line {guide[last].line})" if last >= 0 else "the start"
    assert proc.returncode == 0, (
        f"the guide failed in {where}, exit {proc.returncode}:\n{stderr}\n"
        f"{outputs.get(last)}\n{cluster.logs()}")
    assert last == guide[-1].index, f"stopped after {where}"
    for block in guide:
        miss = unmatched(block.expected, outputs[block.index])
        assert miss is None, (f"block {block.index} (line {block.line}) printed "
                              f"{outputs[block.index]}, expected a line like {miss!r}")
