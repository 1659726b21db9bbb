"""The request log: prompts and outputs of served requests with the version that served
them, kept for retraining and drift analysis.

A SQLite file of its own (`$LORAFLEET_HOME/requests.db`, WAL), so a busy server's writes
never hold the registry database's lock that alias moves and registrations take. Servers
append in batches from a background thread; retention is bounded by rows per adapter and
by age, enforced on every batch. An adapter opts out with its `request_log` setting.
Feedback and corrections live in the registry database (registry/storage/feedback.py) and
are joined by response id when the log is read (`Registry.logged_requests`). A row is a
`LoggedRequest` (registry/loop_records.py).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry.errors import LorafleetError, RegistryBusy
from registry.loop_records import LoggedRequest
from registry.storage.backend import Database
from registry.storage.sqlite import DEFAULT_BUSY_TIMEOUT_S, SQLITE_BUSY_CODES

LOG_FILE = "requests.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    response_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    version INTEGER NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    output TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_version ON requests (adapter, version, id);
CREATE INDEX IF NOT EXISTS requests_by_response ON requests (response_id);
"""


class RequestLog:
    """The request log of a registry home; safe to share between the threads of a process.

    With `shared` (a PostgreSQL registry's database), the rows go to its `requests` table
    instead, so every replica's requests are in one place (feedback finds a response from
    any of them); those appends skip the registry's write lock."""

    def __init__(
        self,
        home: Path,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        *,
        shared: Database | None = None,
    ) -> None:
        self.shared = shared
        self.path = Path(home) / LOG_FILE
        self.location = shared.location if shared is not None else str(self.path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if shared is not None:
            return
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # a lost last batch is acceptable
            self._conn.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise LorafleetError(
                f"cannot open the request log {self.path}: {err}; check that its directory "
                "is writable and has free space"
            ) from err

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self.shared is not None:
            return self.shared.query(sql, params)
        assert self._conn is not None
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def _write(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
        if self.shared is not None:
            changed = 0
            with self.shared.write("the request log", locked=False) as txn:
                for row in rows:
                    changed += max(0, txn.execute(sql, row).rowcount)
            return changed
        assert self._conn is not None
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    changed = self._conn.executemany(sql, rows).rowcount
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as err:
                if getattr(err, "sqlite_errorcode", None) in SQLITE_BUSY_CODES:
                    raise RegistryBusy(
                        f"request log {self.path} stayed locked by another process for more "
                        f"than {self.busy_timeout_s:g} s; nothing was written. Retry, find the "
                        f"process holding it (fuser {self.path}), or wait longer with "
                        "LORAFLEET_BUSY_TIMEOUT_S=SECONDS"
                    ) from err
                raise LorafleetError(f"request log {self.path}: {err}") from err
            return int(changed)

    def append(self, rows: Sequence[LoggedRequest]) -> None:
        if rows:
            self._write(
                "INSERT INTO requests (at, response_id, adapter, version, model, prompt, output,"
                " finish_reason, prompt_tokens, completion_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.at,
                        r.response_id,
                        r.adapter,
                        r.version,
                        r.model,
                        r.prompt,
                        r.output,
                        r.finish_reason,
                        r.prompt_tokens,
                        r.completion_tokens,
                    )
                    for r in rows
                ],
            )

    def prune(self, *, max_rows_per_adapter: int, max_age_s: float) -> int:
        """Delete rows older than `max_age_s` and all but each adapter's newest
        `max_rows_per_adapter`; returns the number deleted."""
        deleted = self._write("DELETE FROM requests WHERE at < ?", [(time.time() - max_age_s,)])
        over = self._read(
            "SELECT adapter FROM requests GROUP BY adapter HAVING COUNT(*) > ?",
            (max_rows_per_adapter,),
        )
        for row in over:
            deleted += self._write(
                "DELETE FROM requests WHERE adapter = ? AND id <= (SELECT id FROM requests"
                " WHERE adapter = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                [(row["adapter"], row["adapter"], max_rows_per_adapter)],
            )
        return deleted

    def delete(self, adapter: str) -> int:
        """Remove every logged request of `adapter` (after an opt-out, or on request)."""
        return self._write("DELETE FROM requests WHERE adapter = ?", [(adapter,)])

    def read(
        self, adapter: str, version: int | None = None, limit: int | None = None
    ) -> list[LoggedRequest]:
        """Logged requests of `adapter` (one version with `version`), oldest first; with
        `limit`, the newest `limit` of them."""
        sql = "SELECT * FROM requests WHERE adapter = ?"
        params: list[Any] = [adapter]
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [_logged(r) for r in reversed(self._read(sql, params))]

    def find(self, response_id: str) -> LoggedRequest | None:
        """The logged request with this response id (the newest, should ids repeat)."""
        rows = self._read(
            "SELECT * FROM requests WHERE response_id = ? ORDER BY id DESC LIMIT 1",
            (response_id,),
        )
        return _logged(rows[0]) if rows else None

    def counts(self) -> dict[str, int]:
        """Logged requests per adapter."""
        rows = self._read(
            "SELECT adapter, COUNT(*) FROM requests GROUP BY adapter ORDER BY adapter"
        )
        return {r[0]: int(r[1]) for r in rows}


def _logged(r: Any) -> LoggedRequest:
    return LoggedRequest(
        response_id=r["response_id"],
        adapter=r["adapter"],
        version=r["version"],
        model=r["model"],
        prompt=r["prompt"],
        output=r["output"],
        finish_reason=r["finish_reason"],
        prompt_tokens=r["prompt_tokens"],
        completion_tokens=r["completion_tokens"],
        at=r["at"],
    )
