"""`tsm`: quotes from the Linux configfs-tsm interface (`/sys/kernel/config/tsm/report`).

Protocol (Documentation/ABI/testing/configfs-tsm): create a report directory, write the
64-byte REPORTDATA to `inblob`, read the quote from `outblob`, remove the directory.
The kernel bumps `generation` on every write to the report's attributes, so a reader
records the generation its own write produced and re-checks it after reading
`outblob`: a different value means another writer raced us on the same directory and
the blob may not be ours -- the provider then retries with a fresh directory.
Blocking file I/O: callers on the event loop use a worker thread.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from ee.attestation.errors import ProviderError

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")


class TsmProvider:
    """The `tsm` attestation provider (real TDX guests)."""

    name = "tsm"

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_TSM_ROOT,
        *,
        attempts: int = 3,
        attr_timeout_s: float = 5.0,
    ) -> None:
        self.root = Path(root)
        self.attempts = attempts
        self.attr_timeout_s = attr_timeout_s

    def _read(self, path: Path, deadline: float) -> bytes:
        # configfs creates attributes together with the directory; the bounded wait
        # only matters for slower emulations of the interface.
        while True:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise ProviderError(f"tsm: {path} did not appear") from None
                time.sleep(0.001)

    def _generation(self, report: Path, deadline: float) -> int:
        raw = self._read(report / "generation", deadline).strip()
        try:
            return int(raw)
        except ValueError:
            raise ProviderError(f"tsm: unreadable generation {raw!r}") from None

    def get_quote(self, report_data: bytes) -> bytes:
        """A TDX quote whose REPORTDATA is *report_data* (exactly 64 bytes)."""
        if len(report_data) != 64:
            raise ValueError("REPORTDATA is exactly 64 bytes")
        if not self.root.is_dir():
            raise ProviderError(f"tsm: {self.root} does not exist (no configfs-tsm?)")
        last = "no attempt made"
        for _ in range(max(1, self.attempts)):
            report = self.root / f"ee-{uuid.uuid4().hex}"
            try:
                report.mkdir()
            except OSError as exc:
                raise ProviderError(f"tsm: cannot create {report}: {exc}") from exc
            try:
                deadline = time.monotonic() + self.attr_timeout_s
                before = self._generation(report, deadline)
                with open(report / "inblob", "wb", buffering=0) as f:
                    written = f.write(report_data)
                if written != 64:
                    raise ProviderError(f"tsm: short write to inblob ({written} bytes)")
                expected = before + 1
                while (gen := self._generation(report, deadline)) < expected:
                    if time.monotonic() > deadline:
                        raise ProviderError("tsm: generation did not advance after inblob")
                    time.sleep(0.001)
                if gen != expected:
                    last = f"generation {gen}, expected {expected}: concurrent writer"
                    continue
                quote = self._read(report / "outblob", deadline)
                after = self._generation(report, deadline)
                if after != expected:
                    last = f"generation changed to {after} while reading: concurrent writer"
                    continue
                if not quote:
                    raise ProviderError("tsm: empty outblob")
                return quote
            finally:
                try:
                    report.rmdir()
                except OSError:
                    _remove_tree(report)
        raise ProviderError(f"tsm: no consistent quote after {self.attempts} attempts ({last})")


def _remove_tree(path: Path) -> None:
    """Remove a report directory that is a plain directory (emulations, tests)."""
    if not path.exists():
        return
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()
