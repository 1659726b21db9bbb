"""Feedback on served responses (score, optional correction, with the prompt and output),
kept in the registry database for retraining jobs. Not a change of aliases or versions, so
it does not bump the revision servers poll."""

from __future__ import annotations

from typing import Any

from registry.database import Database
from registry.history import utc_now


def add_feedback(
    db: Database,
    response_id: str,
    score: float,
    *,
    adapter: str | None,
    version: int | None,
    correction: str | None = None,
    prompt: str | None = None,
    output: str | None = None,
) -> int:
    """Store one piece of feedback; returns its id."""
    with db.write("feedback") as txn:
        cur = txn.execute(
            "INSERT INTO feedback (at, response_id, adapter, version, score, correction, prompt,"
            " output) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (utc_now(), response_id, adapter, version, score, correction, prompt, output),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid


def list_feedback(db: Database, adapter: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM feedback" + (" WHERE adapter = ?" if adapter else "") + " ORDER BY id"
    return [dict(r) for r in db.query(sql, (adapter,) if adapter else ())]
