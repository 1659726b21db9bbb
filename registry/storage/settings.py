"""Per-adapter settings of the watch-and-retrain loop: request logging, what retraining
jobs add to the data, the evaluation gate, the canary and the alert cooldown.

One JSON document per adapter in the `settings` table; an adapter without a row has the
defaults. A change is one transaction that also appends a `settings` event and bumps the
revision, so servers pick it up (e.g. a request-log opt-out) within a poll interval.
`AdapterSettings`, the document's schema, is in registry/loop_records.py.
"""

from __future__ import annotations

import json
from typing import Any

from registry.loop_records import AdapterSettings, validate_settings
from registry.storage.backend import Database, Transaction
from registry.storage.history import insert_event, utc_now


def get_settings(db: Database | Transaction, adapter: str) -> AdapterSettings:
    """The settings of `adapter` (the defaults without a row), read through a database or
    inside an open transaction."""
    sql, params = "SELECT settings FROM settings WHERE adapter = ?", (adapter,)
    rows = db.query(sql, params) if isinstance(db, Database) else db.execute(sql, params).fetchall()
    return AdapterSettings.model_validate(json.loads(rows[0][0])) if rows else AdapterSettings()


def all_settings(db: Database) -> dict[str, AdapterSettings]:
    """Settings of every adapter that has a row (others have the defaults)."""
    return {
        r["adapter"]: AdapterSettings.model_validate(json.loads(r["settings"]))
        for r in db.query("SELECT adapter, settings FROM settings")
    }


def update_settings(
    db: Database,
    adapter: str,
    changes: dict[str, Any],
    *,
    actor: str,
    reason: str,
    reset: bool = False,
    action: str = "settings",
) -> AdapterSettings:
    """Apply `changes` over the current settings (over the defaults with `reset`); the
    history event is `action` (`adapter.pin` and `adapter.unpin` for the pin)."""
    with db.write("settings") as txn:
        row = txn.execute("SELECT settings FROM settings WHERE adapter = ?", (adapter,)).fetchone()
        current = {} if reset or row is None else json.loads(row[0])
        updated = validate_settings({**current, **changes}, adapter)
        document = updated.model_dump_json(exclude_defaults=True)
        txn.execute(
            "INSERT INTO settings (adapter, settings, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (adapter) DO UPDATE SET settings = excluded.settings,"
            " updated_at = excluded.updated_at",
            (adapter, document, utc_now()),
        )
        insert_event(
            txn,
            actor=actor,
            reason=reason or document,
            action=action,
            adapter=adapter,
        )
    return updated
