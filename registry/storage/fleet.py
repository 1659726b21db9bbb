"""The whole fleet in one consistent read, for the operator dashboard: every adapter with its
versions, aliases, pin and last alias move, the recent history and the retraining jobs.

A few queries in one read transaction, whatever the number of adapters (a query per adapter
would cost a thousand-adapter registry a second per refresh).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from registry.records import Event
from registry.storage.backend import Database, Row
from registry.storage.history import SHOWN_ACTIONS
from registry.storage.jobs import job_from_row

MOVES = ("alias.set", "alias.rollback")
# What a version row carries to the page: lineage and the evaluation that registered it.
SHOWN_METADATA = ("parent_version", "trigger", "job_id", "metrics")
EVENT_FIELDS = [f.name for f in fields(Event)]


def fleet_snapshot(db: Database, *, events: int = 50, jobs: int = 50) -> dict[str, Any]:
    """Revision, adapters (versions, aliases, pinned, last promote/rollback), the newest
    `events` history entries and `jobs` jobs (each with its canary verdict, if any)."""
    marks = ", ".join("?" * len(SHOWN_ACTIONS))
    with db.snapshot() as conn:
        revision = int(conn.execute("SELECT revision FROM registry").fetchone()[0])
        adapters: dict[str, dict[str, Any]] = {}
        for row in conn.execute(
            "SELECT adapter, version, state, created_at, actor, rank, size_bytes, metadata"
            " FROM versions ORDER BY adapter, version"
        ):
            entry = adapters.setdefault(row["adapter"], _adapter(row["adapter"]))
            metadata = json.loads(row["metadata"] or "{}")
            entry["versions"].append(
                {
                    "version": row["version"],
                    "state": row["state"],
                    "created_at": row["created_at"],
                    "actor": row["actor"],
                    "rank": row["rank"],
                    "size_bytes": row["size_bytes"],
                    **{k: metadata[k] for k in SHOWN_METADATA if metadata.get(k) is not None},
                }
            )
        for row in conn.execute("SELECT * FROM aliases ORDER BY adapter, alias"):
            if row["adapter"] in adapters:
                adapters[row["adapter"]]["aliases"][row["alias"]] = {
                    "version": row["version"],
                    "weight": row["weight"],
                    "updated_at": row["updated_at"],
                }
        for row in conn.execute("SELECT adapter, settings FROM settings"):
            if row["adapter"] in adapters:
                adapters[row["adapter"]]["pinned"] = bool(
                    json.loads(row["settings"]).get("pinned", False)
                )
        # Per action, then per adapter: each part walks the events_by_action index.
        latest = " UNION ALL ".join(
            "SELECT adapter, MAX(id) AS id FROM events WHERE action = ? GROUP BY adapter"
            for _ in MOVES
        )
        for row in conn.execute(
            "SELECT * FROM events WHERE id IN"
            f" (SELECT MAX(id) FROM ({latest}) AS moves GROUP BY adapter)",
            MOVES,
        ):
            if row["adapter"] in adapters:
                adapters[row["adapter"]]["last_move"] = _event(row)
        recent = [
            _event(r)
            for r in conn.execute(
                f"SELECT * FROM events WHERE action IN ({marks}) ORDER BY id DESC LIMIT ?",
                (*SHOWN_ACTIONS, events),
            )
        ]
        job_rows = conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (jobs,)).fetchall()
        # the verdicts on the listed jobs' versions only (the newest wins, as in the history)
        judged = sorted({r["adapter"] for r in job_rows if r["version"] is not None})
        verdicts = {
            (r["adapter"], r["version"]): {
                "at": r["at"],
                "actor": r["actor"],
                "reason": r["reason"],
            }
            for r in (
                conn.execute(
                    "SELECT * FROM events WHERE action = 'canary.verdict' AND adapter IN"
                    f" ({', '.join('?' * len(judged))}) ORDER BY id",
                    judged,
                )
                if judged  # `IN ()` is SQLite's alone
                else ()
            )
        }
    listed = []
    for row in job_rows:
        job = job_from_row(row).to_dict()
        job["canary_verdict"] = verdicts.get((job["adapter"], job["version"]))
        listed.append(job)
    return {
        "revision": revision,
        "adapters": list(adapters.values()),
        "events": recent,
        "jobs": listed,
    }


def _event(row: Row) -> dict[str, Any]:
    """`Event.to_dict()` of a row, without the dataclass's deep copy (a thousand adapters'
    last moves on every poll)."""
    return {name: row[name] for name in EVENT_FIELDS}


def _adapter(name: str) -> dict[str, Any]:
    return {"name": name, "versions": [], "aliases": {}, "pinned": False, "last_move": None}
