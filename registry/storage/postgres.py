"""The registry's PostgreSQL database: the backend many hosts share (psycopg 3).

The same seam as sqlite.py (registry/storage/backend.py), with the same guarantees:

- every write is one transaction that first takes a transaction-level advisory lock (one
  key for the whole registry), so the read-modify-write sequences of every process on
  every host serialize as SQLite's ``BEGIN IMMEDIATE`` makes them; READ COMMITTED lets
  each statement after the lock see what the writer before committed. A lock still taken
  after `busy_timeout_s` (``lock_timeout``) raises RegistryBusy with nothing written;
- the revision bump also sends ``NOTIFY lorafleet_registry`` with the new revision, which
  PostgreSQL delivers at commit only (`wait_for_change` listens for it);
- reads of a snapshot run in one REPEATABLE READ, READ ONLY transaction;
- the schema is versioned: `MIGRATIONS` are applied in order, each once, under the same
  lock, and `schema_migrations` records which ran;
- artifacts_lock is a session-level advisory lock (shared or exclusive) on a connection of
  its own, released by PostgreSQL when the process dies.

The storage modules' statements are written in the dialect both backends accept; here
``?`` placeholders become ``%s`` (and a literal ``%`` becomes ``%%``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from registry.errors import LorafleetError, RegistryBusy
from registry.storage.backend import (
    BUSY_TIMEOUT_ENV,
    Database,
    Transaction,
    default_busy_timeout_s,
    redact,
)
from registry.storage.sqlite import MIGRATIONS as SQLITE_COLUMNS
from registry.storage.sqlite import SCHEMA as SQLITE_SCHEMA

CHANNEL = "lorafleet_registry"
WRITE_LOCK_KEY = 0x6C6F7261  # pg_advisory_xact_lock: the registry's one write lock
ARTIFACTS_LOCK_KEY = 0x6C6F7262  # pg_advisory_lock(_shared): artifacts in use / removed
CONNECT_TIMEOUT_S = 10


def _schema_v2() -> list[str]:
    """SQLite's schema (sqlite.py) in PostgreSQL's types: ids are BIGSERIAL, integers
    BIGINT, reals DOUBLE PRECISION; the columns SQLite added after version 1 are included."""
    text = (
        SQLITE_SCHEMA.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT")
        .replace(" REAL", " DOUBLE PRECISION")
    )
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))
    statements = [s.strip() for s in body.split(";") if s.strip()]
    for table, column, definition in SQLITE_COLUMNS:
        pg_definition = definition.replace("INTEGER", "BIGINT")
        statements.append(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {pg_definition}")
    return statements


# What the servers of a shared registry keep together: the request log (requestlog.py),
# so feedback finds a response from any replica, and the canary's samples
# (canary_events.py), so a verdict counts the canary's requests on every replica.
SHARED_LOOP_STATE = [
    """CREATE TABLE IF NOT EXISTS requests (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        response_id TEXT NOT NULL,
        adapter TEXT NOT NULL,
        version BIGINT NOT NULL,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        output TEXT NOT NULL,
        finish_reason TEXT,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS requests_by_version ON requests (adapter, version, id)",
    "CREATE INDEX IF NOT EXISTS requests_by_response ON requests (response_id)",
    """CREATE TABLE IF NOT EXISTS canary_events (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        adapter TEXT NOT NULL,
        version BIGINT NOT NULL,
        error BIGINT,
        seconds_per_token DOUBLE PRECISION,
        score DOUBLE PRECISION,
        replica TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS canary_events_by_version ON canary_events (adapter, version, at)",
]
# Version -> statements; a new version appends here.
MIGRATIONS: dict[int, list[str]] = {2: _schema_v2(), 3: SHARED_LOOP_STATE}
PG_SCHEMA_VERSION = max(MIGRATIONS)


@lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """The storage modules' SQL with psycopg's placeholders: ``?`` outside quotes -> ``%s``,
    ``%`` -> ``%%``."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


class PgRow(tuple[Any, ...]):
    """A row read by column name and by position, as sqlite3.Row is."""

    _names: dict[str, int]

    def __new__(cls, values: Sequence[Any], names: dict[str, int]) -> PgRow:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, names)


class _Cursor:
    """psycopg's cursor with the storage modules' statement syntax."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(translate(sql), tuple(params))


class PostgresTransaction(Transaction):
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._cursor = _Cursor(conn)
        self._revision: int | None = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._cursor.execute(sql, params)

    @property
    def revision(self) -> int:
        if self._revision is None:
            row = self.execute(
                "UPDATE registry SET revision = revision + 1 WHERE id = 1 RETURNING revision"
            ).fetchone()
            assert row is not None, "registry row missing"
            self._revision = int(row[0])
            self.execute("SELECT pg_notify(?, ?)", (CHANNEL, str(self._revision)))
        return self._revision


def _rollback(conn: psycopg.Connection[Any]) -> None:
    """End `conn`'s open transaction, if any (nothing to do on a lost connection)."""
    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            conn.close()


class PostgresDatabase(Database):
    """Two connections, shared by the threads of a process under locks: one for writes
    (and reads while it is free), one for reads while a write waits for another host's
    lock."""

    def __init__(self, url: str, busy_timeout_s: float | None = None) -> None:
        self.url = url
        self.location = redact(url)
        self.dialect = "postgresql"
        self.busy_timeout_s = default_busy_timeout_s() if busy_timeout_s is None else busy_timeout_s
        self._lock = threading.RLock()
        self._reader: psycopg.Connection[Any] | None = None
        self._reader_lock = threading.Lock()
        self._artifacts: psycopg.Connection[Any] | None = None
        self._artifacts_lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None
        self._conn = self._connect()
        self._migrate()

    # ---- connections -----------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                row_factory=_row_factory,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="lorafleet",
            )
        except psycopg.OperationalError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LorafleetError(
                f"cannot reach the registry database {self.location}: {first}; check the URL "
                "(LORAFLEET_REGISTRY_URL or --registry) and that PostgreSQL accepts connections"
            ) from err
        return conn

    def _fresh(self, conn: psycopg.Connection[Any] | None) -> psycopg.Connection[Any]:
        """`conn`, or a new connection where it was lost (a server restart, a network cut)."""
        if conn is None or conn.closed or conn.broken:
            return self._connect()
        return conn

    def close(self) -> None:
        with self._lock, self._reader_lock, self._artifacts_lock:
            for conn in (self._conn, self._reader, self._artifacts, self._listener):
                if conn is not None and not conn.closed:
                    conn.close()

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except pg_errors.LockNotAvailable as err:
            raise RegistryBusy(
                f"the registry database {self.location} stayed locked by another process for "
                f"more than {self.busy_timeout_s:g} s during {what}; nothing was written. "
                f"Retry, or wait longer with {BUSY_TIMEOUT_ENV}=SECONDS"
            ) from err
        except psycopg.OperationalError as err:
            raise LorafleetError(
                f"the registry database {self.location} failed during {what}: "
                f"{str(err).strip() or type(err).__name__}; nothing was written. Retry once "
                "PostgreSQL is reachable"
            ) from err

    def _lock_timeout(self) -> str:
        # 0 means "wait forever" to PostgreSQL; the seam's 0 means "do not wait".
        return f"{max(1, round(self.busy_timeout_s * 1000))}ms"

    # ---- the seam ----------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        if self._lock.acquire(blocking=False):
            try:
                self._conn = self._fresh(self._conn)
                yield self._conn
            finally:
                self._lock.release()
            return
        with self._reader_lock:
            self._reader = self._fresh(self._reader)
            yield self._reader

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reading() as conn, self._errors("a read"):
            return _Cursor(conn).execute(sql, params).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[_Cursor]:
        with self._reading() as conn:
            with self._errors("a read"):
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield _Cursor(conn)
            finally:
                _rollback(conn)

    @contextmanager
    def write(self, what: str = "a write", *, locked: bool = True) -> Iterator[PostgresTransaction]:
        with self._lock:
            self._conn = self._fresh(self._conn)
            conn = self._conn
            try:
                with self._errors(what):
                    conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                    conn.execute(f"SET LOCAL lock_timeout = '{self._lock_timeout()}'")
                    if locked:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                yield PostgresTransaction(conn)
                with self._errors(what):
                    conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    @contextmanager
    def artifacts_lock(self, exclusive: bool) -> Iterator[None]:
        take = "pg_advisory_lock" if exclusive else "pg_advisory_lock_shared"
        give = "pg_advisory_unlock" if exclusive else "pg_advisory_unlock_shared"
        with self._artifacts_lock:
            self._artifacts = self._fresh(self._artifacts)
            conn = self._artifacts
            with self._errors("the artifacts lock"):
                conn.execute(f"SET lock_timeout = '{self._lock_timeout()}'")
                conn.execute(f"SELECT {take}(%s)", (ARTIFACTS_LOCK_KEY,))
            try:
                yield
            finally:
                if not conn.broken:
                    conn.execute(f"SELECT {give}(%s)", (ARTIFACTS_LOCK_KEY,))

    def integrity_problems(self) -> list[str]:
        """PostgreSQL enforces the keys itself; this checks what it cannot: the schema
        version and the single registry row."""
        problems = []
        applied = self.query("SELECT MAX(version) FROM schema_migrations")[0][0]
        if applied != PG_SCHEMA_VERSION:
            problems.append(f"schema version {applied}, expected {PG_SCHEMA_VERSION}")
        rows = self.query("SELECT COUNT(*) FROM registry")[0][0]
        if rows > 1:
            problems.append(f"{rows} registry rows, expected 1")
        return problems

    # ---- schema --------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Apply the migrations not yet applied, in order, each in the write transaction
        (safe when many processes open the database at once)."""
        with self.write("schema migration") as txn:
            txn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {int(r[0]) for r in txn.execute("SELECT version FROM schema_migrations")}
            newer = [v for v in done if v > PG_SCHEMA_VERSION]
            if newer:
                raise LorafleetError(
                    f"the registry database {self.location} has schema version {max(newer)}, "
                    f"newer than this lorafleet's {PG_SCHEMA_VERSION}; upgrade lorafleet"
                )
            for version in sorted(v for v in MIGRATIONS if v not in done):
                for statement in MIGRATIONS[version]:
                    txn.execute(statement)
                txn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))

    # ---- the change feed -----------------------------------------------------------------

    def wait_for_change(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` for a revision notice; True if one came. Listens on a
        connection of its own, opened on first use."""
        conn = self._listener
        if conn is None or conn.closed or conn.broken:
            conn = self._connect()
            conn.execute(f"LISTEN {CHANNEL}")
            self._listener = conn
        try:
            for _ in conn.notifies(timeout=timeout_s, stop_after=1):
                return True
        except psycopg.OperationalError:
            conn.close()
        return False
