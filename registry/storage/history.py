"""The registry's history: one append-only sequence of events, written inside the same
transaction as the change it records.

Alias events keep a `below` pointer to the event whose holder a rollback returns to, so
repeated rollbacks walk back through earlier holders instead of toggling between two.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from registry.records import Event
from registry.storage.backend import Database, Row, Transaction

ALIAS_ACTIONS = ("alias.set", "alias.rollback", "alias.remove")
# The drift-to-retrain loop's steps; with the alias moves they make an adapter's audit chain
# alert -> job -> version -> canary -> promote / rollback.
LOOP_ACTIONS = (
    "alert.received",
    "job.queued",
    "job.started",
    "job.succeeded",
    "job.failed",
    "canary.verdict",
    "canary.held",
)
# An operator keeping an adapter resident (or letting it go), shown with the alias moves.
PIN_ACTIONS = ("adapter.pin", "adapter.unpin")
# What `history` shows unless asked for every write.
SHOWN_ACTIONS = (*ALIAS_ACTIONS, *LOOP_ACTIONS, *PIN_ACTIONS)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def insert_event(
    txn: Transaction,
    *,
    actor: str,
    reason: str,
    action: str,
    adapter: str | None = None,
    version: int | None = None,
    alias: str | None = None,
    previous: int | None = None,
    weight: float | None = None,
    below: int | None = None,
    job: int | None = None,
) -> int:
    """Append an event at the transaction's revision; return its id."""
    cur = txn.execute(
        "INSERT INTO events (revision, at, actor, reason, action, adapter, version, alias,"
        " previous, weight, below, job) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            txn.revision,
            utc_now(),
            actor,
            reason,
            action,
            adapter,
            version,
            alias,
            previous,
            weight,
            below,
            job,
        ),
    )
    return int(cur.fetchone()[0])


def event_from_row(row: Row) -> Event:
    return Event(
        id=row["id"],
        revision=row["revision"],
        at=row["at"],
        actor=row["actor"],
        reason=row["reason"],
        action=row["action"],
        adapter=row["adapter"],
        version=row["version"],
        alias=row["alias"],
        previous=row["previous"],
        weight=row["weight"],
        job=row["job"],
    )


def alias_head(txn: Transaction, adapter: str, alias: str) -> Row | None:
    """The latest event of one alias (its current state), or None if it never existed."""
    row: Row | None = txn.execute(
        f"SELECT * FROM events WHERE adapter = ? AND alias = ? AND action IN "
        f"({', '.join('?' * len(ALIAS_ACTIONS))}) ORDER BY id DESC LIMIT 1",
        (adapter, alias, *ALIAS_ACTIONS),
    ).fetchone()
    return row


def list_events(
    db: Database,
    adapter: str | None = None,
    alias: str | None = None,
    *,
    all_events: bool = False,
    limit: int | None = None,
) -> list[Event]:
    """Events oldest first: alias moves, pins and the loop's steps, or every write with
    `all_events`; `limit` keeps the newest."""
    where: list[str] = []
    params: list[Any] = []
    if not all_events:
        where.append(f"action IN ({', '.join('?' * len(SHOWN_ACTIONS))})")
        params += SHOWN_ACTIONS
    if adapter is not None:
        where.append("adapter = ?")
        params.append(adapter)
    if alias is not None:
        where.append("alias = ?")
        params.append(alias)
    sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    return [event_from_row(r) for r in reversed(db.query(sql, tuple(params)))]
