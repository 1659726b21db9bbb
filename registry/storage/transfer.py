"""Copying a registry's records to another database (`lorafleet registry migrate`): every
table, ids and history included, in one transaction of the target, then compared row by
row with the source.

Tables go in the order their keys need (versions before the aliases that point at them,
events in id order since `below` refers to earlier ones, jobs before the alerts that
started them). PostgreSQL's id sequences are moved past the copied ids.
"""

from __future__ import annotations

import math
from typing import Any

from registry.errors import LorafleetError
from registry.faults import pause_point
from registry.storage.backend import Database

# table -> the columns that order it (its key)
TABLES: dict[str, str] = {
    "registry": "id",
    "versions": "adapter, version",
    "aliases": "adapter, alias",
    "events": "id",
    "feedback": "id",
    "settings": "adapter",
    "jobs": "id",
    "schedules": "adapter",
    "alerts": "fingerprint, starts_at",
}
SERIAL_TABLES = ("events", "feedback", "jobs")


def rows_of(db: Database, table: str) -> list[dict[str, Any]]:
    return [dict(r) for r in db.query(f"SELECT * FROM {table} ORDER BY {TABLES[table]}")]


def copy_records(source: Database, target: Database) -> dict[str, int]:
    """Copy every row of `source` into `target`, which must hold no registry yet; the
    rows copied per table. One transaction: a failure or a kill leaves `target` empty."""
    counts: dict[str, int] = {}
    with source.snapshot() as reader, target.write("migrate") as txn:
        if txn.execute("SELECT COUNT(*) FROM registry").fetchone()[0]:
            raise LorafleetError(
                f"{target.location} already holds a registry; migrate into an empty database"
            )
        for table, order in TABLES.items():
            rows = [dict(r) for r in reader.execute(f"SELECT * FROM {table} ORDER BY {order}")]
            for row in rows:
                columns = ", ".join(row)
                marks = ", ".join("?" * len(row))
                sql = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
                txn.execute(sql, tuple(row.values()))
            counts[table] = len(rows)
        pause_point("migrate.committing")
        if target.dialect == "postgresql":
            for table in SERIAL_TABLES:
                txn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
    return counts


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b))
    return bool(a == b)


def differences(source: Database, target: Database) -> list[str]:
    """Where `target`'s rows differ from `source`'s (empty: a faithful copy)."""
    found: list[str] = []
    for table in TABLES:
        ours, theirs = rows_of(source, table), rows_of(target, table)
        if len(ours) != len(theirs):
            found.append(f"{table}: {len(ours)} rows in the source, {len(theirs)} in the copy")
            continue
        for mine, copied in zip(ours, theirs, strict=True):
            bad = [c for c in mine if not _same(mine[c], copied.get(c))]
            if bad:
                key = {c: mine[c] for c in TABLES[table].split(", ")}
                found.append(f"{table} {key}: {', '.join(bad)} differ")
    return found
