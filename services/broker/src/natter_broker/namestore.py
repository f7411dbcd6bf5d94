"""A lone broker's name bindings on disk: one SQLite file in its state directory.

Every change is one transaction (atomic: a crash leaves the old binding or the new one),
and the file is read once at start, so a restarted broker still knows which key owns
which name and an impostor cannot take a name while its agent reconnects.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

from natter_proto.names import Binding

log = structlog.get_logger("natter.broker.names")

FILE_NAME = "broker-names.sqlite"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS names"
    " (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, registered REAL NOT NULL)"
)


class NameStore:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: one write, one transaction
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def load(self) -> list[Binding]:
        rows = self._db.execute("SELECT name, fingerprint, registered FROM names").fetchall()
        return [Binding(str(name), str(print_), float(when)) for name, print_, when in rows]

    def save(self, binding: Binding) -> None:
        try:
            self._db.execute(
                "INSERT INTO names (name, fingerprint, registered) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET fingerprint = excluded.fingerprint, "
                "registered = excluded.registered",
                (binding.name, binding.fingerprint, binding.last_registered),
            )
        except sqlite3.Error as exc:  # a full disk must not stop registrations
            log.error("cannot save a name binding", name=binding.name, path=str(self.path), error=str(exc))

    def forget(self, names: list[str]) -> None:
        if names:
            with self._db:
                self._db.executemany("DELETE FROM names WHERE name = ?", [(n,) for n in names])

    def close(self) -> None:
        self._db.close()
