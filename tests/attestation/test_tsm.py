"""tsm provider against a directory tree, with a thread standing in for the kernel."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ee.attestation import ProviderError, Verifier, parse_quote
from ee.attestation.providers.sim import SimTD
from ee.attestation.providers.tsm import TsmProvider


class FakeKernel:
    """Emulates configfs-tsm on a plain directory: populates new report directories,
    and on a 64-byte inblob writes outblob (a sim quote) and bumps generation.
    `interfere(n)` makes it bump generation once more (a concurrent writer) for the
    first n reports."""

    def __init__(self, root: Path, td: SimTD, interfere: int = 0) -> None:
        self.root = root
        self.td = td
        self.interfere = interfere
        self.reports = 0
        self.inblobs: list[bytes] = []
        self._stop = threading.Event()
        self._seen: set[str] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            for report in self.root.iterdir():
                if report.name.startswith(".") or not report.is_dir():
                    continue
                if report.name not in self._seen:
                    self._seen.add(report.name)
                    self._write(report / "provider", b"tdx_guest\n")
                    self._write(report / "generation", b"0\n")
                    continue
                inblob = report / "inblob"
                if (
                    inblob.exists()
                    and inblob.stat().st_size == 64
                    and not (report / "outblob").exists()
                ):
                    data = inblob.read_bytes()
                    self.inblobs.append(data)
                    self._write(report / "outblob", self.td.quote(data))
                    self.reports += 1
                    bump = 2 if self.reports <= self.interfere else 1
                    self._write(report / "generation", f"{bump}\n".encode())

    def __enter__(self) -> FakeKernel:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def kernel(tmp_path: Path, sim: SimTD) -> Iterator[Callable[[int], FakeKernel]]:
    kernels: list[FakeKernel] = []

    def make(interfere: int = 0) -> FakeKernel:
        k = FakeKernel(tmp_path, sim, interfere).__enter__()
        kernels.append(k)
        return k

    yield make
    for k in kernels:
        k.__exit__()


def test_quote_through_configfs_tree(
    tmp_path: Path, sim: SimTD, kernel: Callable[[int], FakeKernel]
) -> None:
    k = kernel(0)
    report_data = bytes(range(64))
    raw = TsmProvider(tmp_path).get_quote(report_data)
    assert k.inblobs == [report_data]
    assert parse_quote(raw).report.report_data == report_data
    assert Verifier([sim.root_cert]).verify(raw, now=1_760_000_000).ok
    assert list(tmp_path.iterdir()) == []  # the report directory is removed


def test_concurrent_writer_is_detected_and_retried(
    tmp_path: Path, kernel: Callable[[int], FakeKernel]
) -> None:
    k = kernel(1)
    raw = TsmProvider(tmp_path).get_quote(bytes(64))
    assert k.reports == 2  # the first, raced report was thrown away
    assert parse_quote(raw).report.report_data == bytes(64)
    assert list(tmp_path.iterdir()) == []


def test_persistent_interference_fails(tmp_path: Path, kernel: Callable[[int], FakeKernel]) -> None:
    kernel(99)
    with pytest.raises(ProviderError, match="concurrent writer"):
        TsmProvider(tmp_path, attempts=2).get_quote(bytes(64))
    assert list(tmp_path.iterdir()) == []


def test_inblob_must_be_64_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64"):
        TsmProvider(tmp_path).get_quote(b"short")


def test_missing_configfs(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="does not exist"):
        TsmProvider(tmp_path / "nope").get_quote(bytes(64))


def test_no_kernel_times_out(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="did not appear"):
        TsmProvider(tmp_path, attr_timeout_s=0.05).get_quote(bytes(64))
    assert list(tmp_path.iterdir()) == []
