"""The dc's durable outbox: sequenced events kept in SQLite until the master acks them.

``append`` assigns the next sequence (``AUTOINCREMENT``: never reused, even after every
row was acked and deleted) and commits with ``synchronous=FULL`` in WAL mode, so an event
the dc has recorded survives ``kill -9`` and power loss. ``ack(upto)`` deletes what the
master has applied. The last applied desired-state snapshot is kept here too, signed as
received, so a restarted dc runs the same version without asking. Blocking: call through
``trio.to_thread.run_sync`` (one lock serialises the threads).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Spool:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, kind: str, at: float, data: dict[str, Any]) -> int:
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        with self._lock:
            cur = self._db.execute("INSERT INTO events (kind, at, data) VALUES (?, ?, ?)",
                                   (kind, at, text))
            seq = cur.lastrowid
        assert seq is not None
        return int(seq)

    def read(self, start: int, limit: int, max_bytes: int | None = None
             ) -> list[dict[str, Any]]:
        """Up to *limit* events from *start*, and (*max_bytes*) no more than fit in that
        many bytes of their data (always at least one): a frame of many large events
        must stay under the link's message cap, or the link would fail on it forever."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, at, data FROM events WHERE seq >= ? ORDER BY seq LIMIT ?",
                (start, limit)).fetchall()
        if max_bytes is not None:
            used = 0
            for i, row in enumerate(rows):
                used += len(row[3])
                if used > max_bytes and i > 0:
                    rows = rows[:i]
                    break
        return [{"seq": s, "kind": k, "at": a, "data": json.loads(d)} for s, k, a, d in rows]

    def ack(self, upto: int) -> int:
        """Forget every event up to *upto*; returns how many were deleted."""
        with self._lock:
            cur = self._db.execute("DELETE FROM events WHERE seq <= ?", (upto,))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('acked', ?)",
                             (str(max(upto, self._acked_locked())),))
            return cur.rowcount

    def _acked_locked(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'acked'").fetchone()
        return int(row[0]) if row else 0

    def bounds(self) -> tuple[int, int, int]:
        """(first unacked sequence, next sequence to assign, depth)."""
        with self._lock:
            lo, hi, n = self._db.execute(
                "SELECT MIN(seq), MAX(seq), COUNT(*) FROM events").fetchone()
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            acked = self._acked_locked()
        last = int(row[0]) if row else 0
        first = int(lo) if lo is not None else last + 1
        first = max(first, acked + 1) if lo is None else first
        del hi
        return first, last + 1, int(n)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
