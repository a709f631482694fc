"""Retained logs (``ee.agent.logstore``) and failure reports (``ee.agent.failures``):
pure parts, no Docker."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from ee.agent.failures import (
    build_exit_code,
    container_exited,
    health_failed,
    step_failed,
    step_timed_out,
    tail_lines,
)
from ee.agent.logstore import (
    MAX_LINES_PER_SERVICE,
    RetainedLogs,
    filter_lines,
    rfc3339_ns,
    split_timestamp,
)
from ee.protocol.messages import DeployStatus, LogLine


class Wall:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


def _lines(service: str, n: int, start: int = 0) -> list[LogLine]:
    return [LogLine(service=service, text=f"{service}-{i}",
                    at=f"2026-12-01T08:00:{i % 60:02d}.{i:09d}Z") for i in range(start, n)]


def test_timestamps() -> None:
    assert rfc3339_ns("1970-01-01T00:00:01Z") == 1_000_000_000
    assert rfc3339_ns("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert rfc3339_ns("1970-01-01T00:00:01.000000001Z") == 1_000_000_001
    for bad in ("1970-01-01 00:00:01Z", "1970-01-01T00:00:01+00:00", "1970-13-01T00:00:01Z",
                "x", ""):
        assert rfc3339_ns(bad) is None, bad
    assert split_timestamp("2026-12-01T08:00:00.123Z hello world") == (
        "2026-12-01T08:00:00.123Z", "hello world")
    assert split_timestamp("no time here") == (None, "no time here")
    lines = [LogLine("a", "1", "2026-12-01T08:00:00.9Z"), LogLine("a", "2", None),
             LogLine("a", "3", "2026-12-01T08:00:01.000000001Z")]
    assert [ln.text for ln in filter_lines(lines, tail=10, since="2026-12-01T08:00:01Z")] == ["3"]
    assert [ln.text for ln in filter_lines(lines, tail=2, since=None)] == ["2", "3"]
    with pytest.raises(ValueError):
        filter_lines(lines, tail=1, since="yesterday")


def test_keep_read_bounds_and_expiry(tmp_path: Path) -> None:
    wall = Wall()
    store = RetainedLogs(tmp_path / "kept", retention_s=100, wall=wall)
    store.keep("dep-1", {"web": _lines("web", 1500), "db": _lines("db", 3)})
    [path] = list((tmp_path / "kept").iterdir())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "kept").stat().st_mode) == 0o700
    kept = store.read("dep-1")
    assert kept is not None and set(kept) == {"web", "db"}
    assert len(kept["web"]) == MAX_LINES_PER_SERVICE == 1000
    assert kept["web"][0].text == "web-500" and kept["web"][-1].text == "web-1499"
    assert kept["db"] == _lines("db", 3)
    assert store.read("dep-2") is None
    wall.now += 99
    assert store.read("dep-1") is not None
    wall.now += 1
    assert store.read("dep-1") is None and list((tmp_path / "kept").iterdir()) == []


def test_total_size_is_bounded_oldest_first(tmp_path: Path) -> None:
    wall = Wall()
    store = RetainedLogs(tmp_path / "kept", retention_s=10_000, wall=wall,
                         max_total_bytes=150_000)
    for n in range(4):
        wall.now += 1
        store.keep(f"dep-{n}", {"web": [LogLine("web", "x" * 1000)] * 60})  # ~60 KB each
    assert store.read("dep-0") is None and store.read("dep-1") is None
    assert store.read("dep-2") is not None and store.read("dep-3") is not None
    total = sum(p.stat().st_size for p in (tmp_path / "kept").iterdir())
    assert total <= 150_000


def test_a_file_answers_only_for_the_deployment_inside_it(tmp_path: Path) -> None:
    """Another deployment's retained logs are never answered for this one, whatever the
    file is called (a planted or renamed file, a name collision)."""
    store = RetainedLogs(tmp_path / "kept", retention_s=100, wall=Wall())
    store.keep("tenant-a-dep", {"web": [LogLine("web", "a's secret line")]})
    [a_file] = list((tmp_path / "kept").iterdir())
    b_file = store._path("tenant-b-dep")
    a_file.rename(b_file)
    assert store.read("tenant-b-dep") is None
    assert store.read("tenant-a-dep") is None  # and it is not a's file any more either
    b_file.write_text(json.dumps({"format": 1, "deployment_id": "tenant-b-dep",
                                  "stopped_at": 5_000.0, "services": {"web": [[None, "b"]]}}))
    assert store.read("tenant-b-dep") == {"web": [LogLine("web", "b")]}


def test_retention_zero_keeps_nothing(tmp_path: Path) -> None:
    store = RetainedLogs(tmp_path / "kept", retention_s=0, wall=Wall())
    store.keep("d", {"web": [LogLine("web", "x")]})
    assert store.read("d") is None and not (tmp_path / "kept").exists()


def test_failure_reports() -> None:
    build_output = ("Step 2/2 : RUN make\n ---> Running in 1234\nmake: *** [all] Error 2\n"
                    "The command '/bin/sh -c make' returned a non-zero code: 2\n"
                    "ERROR: Service 'web' failed to build : Build failed\n")
    report = step_failed("build", 1, build_output)
    assert (report.phase, report.exit_code) == ("build", 2)
    assert report.error == ("build failed (exit code 2): "
                            "ERROR: Service 'web' failed to build : Build failed")
    assert report.log_tail[-2].startswith("The command")
    assert build_exit_code("#5 ERROR: process \"/bin/sh -c exit 3\" did not complete "
                           "successfully: exit code: 3") == 3
    assert step_failed("pull", 1, "").error == "pull failed (exit code 1): no output"
    timed = step_timed_out("pull", 600, "Pulling web ...\r50%\r75%\n")
    assert (timed.phase, timed.error) == (
        "timeout", "pull did not finish within 600 s (timeout); last output: 75%")
    exited = container_exited("web", 7, "a\nb\n")
    assert (exited.phase, exited.exit_code, exited.log_tail) == ("start", 7, ("a", "b"))
    assert health_failed("GET /x", 5, "HTTP 404", True, "").phase == "health"
    assert health_failed("GET /x", 5, "ConnectError", False, "").phase == "timeout"
    # bounded as the message wants it, control characters gone
    tail = tail_lines("\n".join(f"\x1b[31mline {i}\x1b[0m\x07" + "y" * 900
                                for i in range(50)))
    assert len(tail) == 20 and all(len(x) <= 500 for x in tail)
    assert tail[0].startswith("line 30") and "\x1b" not in "".join(tail)
    DeployStatus(deployment_id="d", state="failed", phase=report.phase,
                 exit_code=report.exit_code, log_tail=report.log_tail)  # valid on the wire
    with pytest.raises(ValueError):
        DeployStatus(deployment_id="d", state="failed", phase="nope")


def test_a_read_parses_one_file_not_the_whole_directory(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads (a tenant can ask for an undeployed deployment's logs again and again) and
    purges judge files by their mtime, which keep sets to stopped_at: one parse a read."""
    wall = Wall()
    store = RetainedLogs(tmp_path / "kept", retention_s=100, wall=wall)
    for n in range(5):
        store.keep(f"dep-{n}", {"web": _lines("web", 10)})
    parsed: list[Path] = []
    load = RetainedLogs._load

    def counting(self: RetainedLogs, path: Path) -> dict[str, object] | None:
        parsed.append(path)
        return load(self, path)

    monkeypatch.setattr(RetainedLogs, "_load", counting)
    assert store.read("dep-3") is not None
    assert parsed == [store._path("dep-3")]
    wall.now += 100  # expiry still holds, by mtime
    assert store.purge() == 5 and list((tmp_path / "kept").iterdir()) == []
