"""Feedback on served responses (score, optional correction, with the prompt and output),
kept in the registry database for retraining jobs. Not a change of aliases or versions, so
it does not bump the revision servers poll."""

from __future__ import annotations

from typing import Any

from registry.errors import NotFound
from registry.storage.backend import Database
from registry.storage.history import utc_now


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
            " output) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (utc_now(), response_id, adapter, version, score, correction, prompt, output),
        )
        return int(cur.fetchone()[0])


def list_feedback(db: Database, adapter: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM feedback" + (" WHERE adapter = ?" if adapter else "") + " ORDER BY id"
    return [dict(r) for r in db.query(sql, (adapter,) if adapter else ())]


def review_feedback(db: Database, ids: list[int], review: str) -> int:
    """Mark feedback as accepted or rejected for retraining; returns rows changed."""
    if review not in ("accepted", "rejected", "pending"):
        raise ValueError(f"review {review!r} is not accepted, rejected or pending")
    with db.write("feedback review") as txn:
        marks = ", ".join("?" * len(ids))
        rows = txn.execute(f"SELECT id FROM feedback WHERE id IN ({marks})", tuple(ids))
        found = {r[0] for r in rows}
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(
                f"no feedback with id {', '.join(map(str, missing))}; "
                "`lorafleet registry feedback list NAME` shows the ids"
            )
        cur = txn.execute(f"UPDATE feedback SET review = ? WHERE id IN ({marks})", (review, *ids))
        return int(cur.rowcount)


def corrections(db: Database, adapter: str, policy: str) -> list[dict[str, Any]]:
    """Corrections retraining may use: policy accepted (reviewed), all (not rejected), none.
    Each row has the prompt the response answered and the correction."""
    if policy == "none":
        return []
    review = "review = 'accepted'" if policy == "accepted" else "review != 'rejected'"
    return [
        dict(r)
        for r in db.query(
            "SELECT id, prompt, correction, score, version FROM feedback WHERE adapter = ? AND "
            f"correction IS NOT NULL AND prompt IS NOT NULL AND {review} ORDER BY id",
            (adapter,),
        )
    ]
