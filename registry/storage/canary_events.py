"""The canary's samples that the servers of a shared (PostgreSQL) registry pool, so a
verdict counts the canary's and production's requests on every replica: one row per
request that ended (`error`, `seconds_per_token`) or rating (`score`), with its wall time
and the replica that saw it. Appends skip the registry's write lock and bump no revision.
"""

from __future__ import annotations

from collections.abc import Sequence

from registry.storage.backend import Database

Sample = tuple[float, str, int, bool | None, float | None, float | None, str]
"""(at, adapter, version, error, seconds_per_token, score, replica)"""


def append(db: Database, samples: Sequence[Sample]) -> None:
    if not samples:
        return
    with db.write("the canary's samples", locked=False) as txn:
        for at, adapter, version, error, per_token, score, replica in samples:
            txn.execute(
                "INSERT INTO canary_events (at, adapter, version, error, seconds_per_token,"
                " score, replica) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    at,
                    adapter,
                    version,
                    None if error is None else int(error),
                    per_token,
                    score,
                    replica,
                ),
            )


def since(
    db: Database, adapter: str, version: int, start: float, limit: int
) -> tuple[list[tuple[float, bool, float | None]], list[tuple[float, float]]]:
    """The newest `limit` requests (at, error, seconds per token) and ratings (at, score)
    of `adapter@version` at or after `start`, each oldest first."""
    requests = db.query(
        "SELECT at, error, seconds_per_token FROM canary_events WHERE adapter = ? AND"
        " version = ? AND at >= ? AND error IS NOT NULL ORDER BY at DESC LIMIT ?",
        (adapter, version, start, limit),
    )
    ratings = db.query(
        "SELECT at, score FROM canary_events WHERE adapter = ? AND version = ? AND at >= ?"
        " AND score IS NOT NULL ORDER BY at DESC LIMIT ?",
        (adapter, version, start, limit),
    )
    return (
        [(float(r[0]), bool(r[1]), r[2]) for r in reversed(requests)],
        [(float(r[0]), float(r[1])) for r in reversed(ratings)],
    )


def prune(db: Database, before: float) -> int:
    """Delete the samples older than `before` (unix s); how many went."""
    with db.write("the canary's samples", locked=False) as txn:
        return int(txn.execute("DELETE FROM canary_events WHERE at < ?", (before,)).rowcount)
