"""The registry row and the versions table, as `Registry` (registry/registry.py) reads and
writes them: the binding to one base model and the rank limit, the revision, registered
versions with the aliases that hold them, and the statements of register and archive.

`Registry` keeps the order of the steps and the error messages; the functions here run the
statements, through the database or inside a transaction `Registry` opened.
"""

from __future__ import annotations

import json
from typing import Any

from registry.basemodel import BaseModelInfo
from registry.records import AliasRecord, VersionMetadata, VersionRecord
from registry.storage.backend import SCHEMA_VERSION, Database, Row, Transaction
from registry.storage.history import utc_now
from registry.validation import AdapterReport


def version_from_row(row: Row, aliases: list[str]) -> VersionRecord:
    return VersionRecord(
        adapter=row["adapter"],
        version=row["version"],
        digest=row["digest"],
        state=row["state"],
        created_at=row["created_at"],
        actor=row["actor"],
        rank=row["rank"],
        alpha=row["alpha"],
        size_bytes=row["size_bytes"],
        base_fingerprint=row["base_fingerprint"],
        target_modules=json.loads(row["target_modules"]),
        features=json.loads(row["features"]),
        unservable=json.loads(row["unservable"]),
        metadata=json.loads(row["metadata"]),
        aliases=aliases,
        archived_at=row["archived_at"],
        purged=bool(row["purged"]),
    )


def alias_from_row(row: Row) -> AliasRecord:
    return AliasRecord(
        adapter=row["adapter"],
        alias=row["alias"],
        version=row["version"],
        weight=row["weight"],
        updated_at=row["updated_at"],
        revision=row["revision"],
    )


# ---- the registry row ----------------------------------------------------------------------


def read_base(db: Database) -> BaseModelInfo | None:
    """The base model the registry is bound to; None before `init`."""
    rows = db.query("SELECT base FROM registry WHERE id = 1")
    return BaseModelInfo.from_dict(json.loads(rows[0]["base"])) if rows else None


def bound_base_in(txn: Transaction) -> tuple[str, int] | None:
    """(base fingerprint, max rank) inside an open transaction; None before `init`."""
    row = txn.execute("SELECT base_fingerprint, max_rank FROM registry WHERE id = 1").fetchone()
    return None if row is None else (row["base_fingerprint"], row["max_rank"])


def insert_registry(txn: Transaction, info: BaseModelInfo, max_rank: int) -> None:
    """The registry row of a new registry, at revision 0."""
    txn.execute(
        "INSERT INTO registry VALUES (1, ?, 0, ?, ?, ?, ?)",
        (SCHEMA_VERSION, utc_now(), max_rank, info.fingerprint, json.dumps(info.to_dict())),
    )


def set_max_rank(txn: Transaction, max_rank: int) -> None:
    txn.execute("UPDATE registry SET max_rank = ? WHERE id = 1", (max_rank,))


def max_rank(db: Database) -> int:
    return int(db.query("SELECT max_rank FROM registry WHERE id = 1")[0][0])


def revision(db: Database) -> int:
    """The change feed: increases with every write; cheap enough to poll."""
    return int(db.query("SELECT revision FROM registry WHERE id = 1")[0][0])


def registry_state(db: Database) -> dict[str, Any]:
    """Revision, creation time, max rank and the counts of adapters, versions and archived
    versions."""
    row = db.query("SELECT * FROM registry WHERE id = 1")[0]
    counts = db.query(
        "SELECT COUNT(DISTINCT adapter), COUNT(*),"
        " COALESCE(SUM(CASE WHEN state = 'archived' THEN 1 ELSE 0 END), 0) FROM versions"
    )[0]
    return {
        "revision": row["revision"],
        "created_at": row["created_at"],
        "max_rank": row["max_rank"],
        "adapters": counts[0],
        "versions": counts[1],
        "archived_versions": counts[2],
    }


# ---- reading versions and aliases ----------------------------------------------------------


def adapter_names(db: Database) -> list[str]:
    rows = db.query("SELECT DISTINCT adapter FROM versions ORDER BY adapter")
    return [r[0] for r in rows]


def stored_digests(db: Database) -> list[str]:
    """The digests whose files the registry keeps (every version not purged by gc)."""
    rows = db.query("SELECT DISTINCT digest FROM versions WHERE purged = 0 ORDER BY digest")
    return [str(r[0]) for r in rows]


def has_versions(db: Database, adapter: str) -> bool:
    return bool(db.query("SELECT 1 FROM versions WHERE adapter = ? LIMIT 1", (adapter,)))


def _aliases_by_version(db: Database, adapter: str) -> dict[int, list[str]]:
    held: dict[int, list[str]] = {}
    for row in db.query(
        "SELECT alias, version FROM aliases WHERE adapter = ? ORDER BY alias", (adapter,)
    ):
        held.setdefault(row["version"], []).append(row["alias"])
    return held


def list_versions(db: Database, adapter: str) -> list[VersionRecord]:
    """All versions of `adapter` with the aliases that hold them, oldest first; [] if none."""
    rows = db.query("SELECT * FROM versions WHERE adapter = ? ORDER BY version", (adapter,))
    if not rows:
        return []
    held = _aliases_by_version(db, adapter)
    return [version_from_row(r, held.get(r["version"], [])) for r in rows]


def list_aliases(db: Database, adapter: str | None = None) -> list[AliasRecord]:
    sql = "SELECT * FROM aliases"
    params: tuple[Any, ...] = ()
    if adapter is not None:
        sql, params = sql + " WHERE adapter = ?", (adapter,)
    rows = db.query(sql + " ORDER BY adapter, alias", params)
    return [alias_from_row(r) for r in rows]


def serving_snapshot(db: Database) -> tuple[int, list[AliasRecord], dict[str, dict[int, str]]]:
    """Revision, aliases and version states read in one consistent snapshot."""
    with db.snapshot() as conn:
        revision = int(conn.execute("SELECT revision FROM registry").fetchone()[0])
        aliases = [
            alias_from_row(r)
            for r in conn.execute("SELECT * FROM aliases ORDER BY adapter, alias")
        ]
        states: dict[str, dict[int, str]] = {}
        for r in conn.execute("SELECT adapter, version, state FROM versions"):
            states.setdefault(r["adapter"], {})[r["version"]] = r["state"]
    return revision, aliases, states


# ---- register and archive ------------------------------------------------------------------


def version_with_digest(
    db: Database | Transaction, adapter: str, digest: str
) -> tuple[int, str] | None:
    """(version, state) of the version of `adapter` with this content, read through the
    database or inside an open transaction; None if there is none."""
    sql = "SELECT version, state FROM versions WHERE adapter = ? AND digest = ?"
    rows = (
        db.query(sql, (adapter, digest))
        if isinstance(db, Database)
        else db.execute(sql, (adapter, digest)).fetchall()
    )
    return (rows[0]["version"], rows[0]["state"]) if rows else None


def next_version_in(txn: Transaction, adapter: str) -> int:
    row = txn.execute(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE adapter = ?", (adapter,)
    ).fetchone()
    return int(row[0])


def insert_version(
    txn: Transaction,
    adapter: str,
    version: int,
    *,
    digest: str,
    actor: str,
    report: AdapterReport,
    size_bytes: int,
    base_fingerprint: str,
    metadata: VersionMetadata,
) -> None:
    """The row of a new, active version."""
    txn.execute(
        "INSERT INTO versions (adapter, version, digest, state, created_at, actor,"
        " rank, alpha, size_bytes, base_fingerprint, target_modules, features,"
        " unservable, metadata)"
        " VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            adapter,
            version,
            digest,
            utc_now(),
            actor,
            report.rank,
            report.alpha,
            size_bytes,
            base_fingerprint,
            json.dumps(report.target_modules),
            json.dumps(report.features),
            json.dumps(report.unservable),
            metadata.model_dump_json(),
        ),
    )


def holders_in(txn: Transaction, adapter: str, version: int) -> list[str]:
    """The aliases pointing at `adapter@version`, inside an open transaction."""
    return [
        r[0]
        for r in txn.execute(
            "SELECT alias FROM aliases WHERE adapter = ? AND version = ? ORDER BY alias",
            (adapter, version),
        )
    ]


def mark_archived(txn: Transaction, adapter: str, version: int) -> None:
    txn.execute(
        "UPDATE versions SET state = 'archived', archived_at = ? WHERE adapter = ?"
        " AND version = ?",
        (utc_now(), adapter, version),
    )
