"""The storage seam: what the storage modules call, implemented by SQLite (sqlite.py, the
embedded default) and PostgreSQL (postgres.py, a registry many hosts share).

`open_database(location)` picks the backend: a path opens a SQLite file, a
``postgresql://`` URL a PostgreSQL database. The statements the storage modules pass are
written once, in a dialect both accept (``?`` placeholders, ``ON CONFLICT ... DO UPDATE``,
``RETURNING``, ``LIMIT ... OFFSET``); the PostgreSQL backend rewrites the placeholders.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from registry.errors import LorafleetError

SCHEMA_VERSION = 2
BUSY_TIMEOUT_ENV = "LORAFLEET_BUSY_TIMEOUT_S"
DEFAULT_BUSY_TIMEOUT_S = 30.0
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Row(Protocol):
    """A row read by column name and by position (`row["version"]`, `row[0]`, `dict(row)`)."""

    def __getitem__(self, key: str | int) -> Any: ...
    def keys(self) -> Sequence[str]: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Reader(Protocol):
    """What `Database.snapshot()` yields: reads that see one consistent state."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...


def default_busy_timeout_s() -> float:
    """$LORAFLEET_BUSY_TIMEOUT_S, else 30: how long a write waits for another process's lock."""
    raw = os.environ.get(BUSY_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_BUSY_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise LorafleetError(
            f"{BUSY_TIMEOUT_ENV}={raw!r} is not a number of seconds in [0, 3600]; "
            f"unset it for the default {DEFAULT_BUSY_TIMEOUT_S:g}"
        )
    return value


class Transaction(ABC):
    """An open write transaction; `revision` bumps the counter once, on first use."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """A cursor with `fetchone()`, `fetchall()`, iteration and `rowcount`."""

    @property
    @abstractmethod
    def revision(self) -> int:
        """The registry's revision after this transaction (bumped once, on first use)."""


class Database(ABC):
    """The registry's records; shared by the threads of a process."""

    busy_timeout_s: float
    location: str  # what names this database in messages (a path, or a URL without password)
    dialect: str  # "sqlite" or "postgresql", for the few statements that differ

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a read-only statement and return all rows."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[Reader]:
        """Several reads that see one consistent state."""

    @abstractmethod
    def write(
        self, what: str = "a write", *, locked: bool = True
    ) -> AbstractContextManager[Transaction]:
        """A transaction that holds the registry's write lock from its start, so the
        read-modify-write sequences of many processes serialize; committed on success,
        rolled back on any error; RegistryBusy naming `what` when the lock stays taken
        longer than `busy_timeout_s`, with nothing written. `locked=False`: appends that
        read nothing back (the servers' shared samples) skip the lock where the backend
        can (PostgreSQL); they must not bump the revision."""

    @abstractmethod
    def artifacts_lock(self, exclusive: bool) -> AbstractContextManager[None]:
        """Shared while a registration copies files and commits, exclusive while fsck or
        gc remove them; held by every process that shares this database, released if the
        process dies."""

    @abstractmethod
    def integrity_problems(self) -> list[str]:
        """The store's own consistency check; empty when sound (`fsck`)."""

    @abstractmethod
    def wait_for_change(self, timeout_s: float) -> bool:
        """Block up to `timeout_s`, returning early (True) when another process may have
        changed the revision; False when the time ran out. Polling backends just wait."""

    @abstractmethod
    def close(self) -> None: ...


def redact(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def is_postgres_url(location: str | Path) -> bool:
    return str(location).startswith(POSTGRES_SCHEMES)


def open_database(location: str | Path, busy_timeout_s: float | None = None) -> Database:
    """The registry database at `location`: a SQLite file path, or a PostgreSQL URL."""
    if is_postgres_url(location):
        from registry.storage.postgres import PostgresDatabase

        return PostgresDatabase(str(location), busy_timeout_s)
    from registry.storage.sqlite import SqliteDatabase

    return SqliteDatabase(Path(location), busy_timeout_s)
