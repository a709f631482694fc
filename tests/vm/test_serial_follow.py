"""The serial-log follower `eectl vm create --wait` and `eectl cp bootstrap` read."""

from __future__ import annotations

from pathlib import Path

from ee.vm.manage import _SerialFollower


def test_lines_arrive_once_whole_and_without_ansi(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    follow = _SerialFollower(log)
    assert follow.new_lines() == []  # no log yet
    log.write_bytes(b"\x1b[0;32mboot\x1b[0m ok\nee-agent: star")
    assert follow.new_lines() == ["boot ok"]  # the half line waits for its newline
    with log.open("ab") as f:
        f.write(b"ted\n\xffbad byte\n")
    assert follow.new_lines() == ["ee-agent: started", "\ufffdbad byte"]
    assert follow.new_lines() == []


def test_an_offset_skips_what_was_written_before(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"old run\n")
    follow = _SerialFollower(log, log.stat().st_size)
    with log.open("ab") as f:
        f.write(b"new run\n")
    assert follow.new_lines() == ["new run"]
