"""Alias moves: promote (set), rollback and remove, each one transaction with its event.

One version per alias per adapter; an alias never points at an archived version; only
`canary` carries a traffic weight in [0, 1]. A move to the state an alias already has is a
no-op that writes nothing.
"""

from __future__ import annotations

import math

from registry.errors import AliasConflict, NotFound
from registry.faults import pause_point
from registry.names import CANARY_ALIAS, check_name
from registry.records import AliasMove
from registry.storage.backend import Database, Transaction
from registry.storage.history import alias_head, insert_event, utc_now

DEFAULT_CANARY_WEIGHT = 0.1


def require_active(txn: Transaction, adapter: str, version: int, action: str) -> None:
    """Raise NotFound / AliasConflict unless `adapter@version` exists and is active."""
    row = txn.execute(
        "SELECT state FROM versions WHERE adapter = ? AND version = ?", (adapter, version)
    ).fetchone()
    if row is None:
        have = [
            str(r[0])
            for r in txn.execute(
                "SELECT version FROM versions WHERE adapter = ? ORDER BY version", (adapter,)
            )
        ]
        if not have:
            raise NotFound(f"no adapter named {adapter!r}; cannot {action}")
        raise NotFound(
            f"adapter {adapter!r} has no version {version}; its versions: {', '.join(have)}"
        )
    if row["state"] == "archived":
        raise AliasConflict(
            f"{adapter}@{version} is archived, so no alias may point at it; cannot {action}"
        )


def _write_alias(
    txn: Transaction, adapter: str, alias: str, version: int, weight: float | None
) -> None:
    txn.execute(
        "INSERT INTO aliases (adapter, alias, version, weight, updated_at, revision)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (adapter, alias) DO UPDATE SET"
        " version = excluded.version, weight = excluded.weight,"
        " updated_at = excluded.updated_at, revision = excluded.revision",
        (adapter, alias, version, weight, utc_now(), txn.revision),
    )


def current_in(txn: Transaction, adapter: str, alias: str) -> tuple[int | None, float | None]:
    """(version, weight) of an alias inside an open transaction; (None, None) if unset."""
    row = txn.execute(
        "SELECT version, weight FROM aliases WHERE adapter = ? AND alias = ?", (adapter, alias)
    ).fetchone()
    return (row["version"], row["weight"]) if row else (None, None)


def set_alias(
    db: Database,
    adapter: str,
    alias: str,
    version: int,
    *,
    weight: float | None,
    actor: str,
    reason: str,
) -> AliasMove:
    """Point `alias` at `version`. A canary without a weight keeps its weight (or 0.1)."""
    check_name(adapter)
    check_name(alias, "alias")
    if weight is not None and alias != CANARY_ALIAS:
        raise AliasConflict(
            f"alias {alias!r} takes no weight (got {weight}); only {CANARY_ALIAS!r} "
            "splits traffic by weight"
        )
    if weight is not None and not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise AliasConflict(f"canary weight {weight} is outside [0, 1]; use e.g. 0.1")
    with db.write("alias set") as txn:
        move = set_in(txn, adapter, alias, version, weight=weight, actor=actor, reason=reason)
        if move.changed:
            pause_point("alias.committing")
        return move


def set_in(
    txn: Transaction,
    adapter: str,
    alias: str,
    version: int,
    *,
    weight: float | None,
    actor: str,
    reason: str,
) -> AliasMove:
    """`set_alias` inside an open transaction (names and weight already checked)."""
    require_active(txn, adapter, version, f"point {adapter}:{alias} at it")
    previous, previous_weight = current_in(txn, adapter, alias)
    if alias == CANARY_ALIAS and weight is None:
        weight = DEFAULT_CANARY_WEIGHT if previous is None else previous_weight
    if previous == version and previous_weight == weight:
        revision = int(txn.execute("SELECT revision FROM registry").fetchone()[0])
        return AliasMove(adapter, alias, version, previous, weight, False, revision)
    head = alias_head(txn, adapter, alias)
    insert_event(
        txn,
        actor=actor,
        reason=reason,
        action="alias.set",
        adapter=adapter,
        version=version,
        alias=alias,
        previous=previous,
        weight=weight,
        below=head["id"] if head else None,
    )
    _write_alias(txn, adapter, alias, version, weight)
    return AliasMove(adapter, alias, version, previous, weight, True, txn.revision)


def rollback_alias(db: Database, adapter: str, alias: str, *, actor: str, reason: str) -> AliasMove:
    """Move `alias` back to the holder before its last move; repeat to walk further back."""
    check_name(adapter)
    check_name(alias, "alias")
    with db.write("rollback") as txn:
        head = alias_head(txn, adapter, alias)
        if head is None:
            raise NotFound(f"adapter {adapter!r} has no alias {alias!r} and no history for it")
        if head["below"] is None:
            raise AliasConflict(
                f"{adapter}:{alias} has no previous holder to roll back to (it was first set "
                f"to version {head['version']}); move it with promote instead"
            )
        target = txn.execute("SELECT * FROM events WHERE id = ?", (head["below"],)).fetchone()
        version, weight = target["version"], target["weight"]
        if version is not None:
            require_active(txn, adapter, version, f"roll {adapter}:{alias} back to it")
        previous, _ = current_in(txn, adapter, alias)
        insert_event(
            txn,
            actor=actor,
            reason=reason,
            action="alias.rollback",
            adapter=adapter,
            version=version,
            alias=alias,
            previous=previous,
            weight=weight,
            below=target["below"],
        )
        if version is None:  # the alias did not exist before the move being undone
            txn.execute("DELETE FROM aliases WHERE adapter = ? AND alias = ?", (adapter, alias))
        else:
            _write_alias(txn, adapter, alias, version, weight)
        pause_point("alias.committing")
        return AliasMove(adapter, alias, version, previous, weight, True, txn.revision)


def remove_alias(db: Database, adapter: str, alias: str, *, actor: str, reason: str) -> AliasMove:
    """Delete an alias; recorded, so `rollback` restores it."""
    check_name(adapter)
    check_name(alias, "alias")
    with db.write("alias remove") as txn:
        return remove_in(txn, adapter, alias, actor=actor, reason=reason)


def remove_in(txn: Transaction, adapter: str, alias: str, *, actor: str, reason: str) -> AliasMove:
    """`remove_alias` inside an open transaction."""
    previous, _ = current_in(txn, adapter, alias)
    if previous is None:
        raise NotFound(f"adapter {adapter!r} has no alias {alias!r}")
    head = alias_head(txn, adapter, alias)
    insert_event(
        txn,
        actor=actor,
        reason=reason,
        action="alias.remove",
        adapter=adapter,
        alias=alias,
        previous=previous,
        below=head["id"] if head else None,
    )
    txn.execute("DELETE FROM aliases WHERE adapter = ? AND alias = ?", (adapter, alias))
    return AliasMove(adapter, alias, None, previous, None, True, txn.revision)
