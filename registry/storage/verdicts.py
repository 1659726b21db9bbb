"""Canary verdicts: promote a canary to production or roll it back, in one transaction.

A verdict is decided by a server from its live comparison (serving/watch/canary.py) or by a user
(`lorafleet canary promote|rollback`, the admin routes). Several servers may reach a
verdict on the same canary at once, so the transaction first checks that the canary still
points at the version the verdict is about: the first writer wins and the others get
AliasConflict with nothing written. The `canary.verdict` event carries the reason (every
criterion with both numbers) and the job that produced the version; the alias moves it
causes follow it at the same revision, so the audit chain reads
job -> version -> canary -> verdict -> promote / rollback.
"""

from __future__ import annotations

import json

from registry.errors import AliasConflict, NotFound
from registry.faults import pause_point
from registry.loop_records import Verdict, VerdictRecord
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS, check_name
from registry.storage.aliases import current_in, remove_in, set_in
from registry.storage.backend import Database
from registry.storage.history import insert_event


def decide_canary(
    db: Database,
    adapter: str,
    verdict: Verdict,
    *,
    actor: str,
    reason: str,
    version: int | None = None,
) -> VerdictRecord:
    """Promote (production -> the canary's version, canary removed) or roll back (canary
    removed) `adapter`'s canary. With `version`, refuse (AliasConflict, nothing written)
    unless the canary still points at it."""
    check_name(adapter)
    with db.write(f"canary {verdict}") as txn:
        canary, _ = current_in(txn, adapter, CANARY_ALIAS)
        if canary is None:
            raise NotFound(
                f"adapter {adapter!r} has no canary alias, so there is nothing to "
                f"{'promote' if verdict == 'promoted' else 'roll back'}; set one with "
                f"`lorafleet registry promote {adapter} VERSION --to canary --weight 0.1`"
            )
        if version is not None and canary != version:
            raise AliasConflict(
                f"{adapter}:canary now points at version {canary}, not {version}: another "
                "verdict or alias move came first; nothing changed"
            )
        meta = txn.execute(
            "SELECT metadata FROM versions WHERE adapter = ? AND version = ?", (adapter, canary)
        ).fetchone()
        job_id = json.loads(meta["metadata"]).get("job_id") if meta else None
        job = job_id if isinstance(job_id, int) else None
        before, _ = current_in(txn, adapter, DEFAULT_ALIAS)
        insert_event(
            txn,
            actor=actor,
            reason=f"{verdict.replace('_', ' ')}: {reason}",
            action="canary.verdict",
            adapter=adapter,
            version=canary,
            alias=CANARY_ALIAS,
            job=job,
        )
        note = f"canary verdict on {adapter}@{canary}: {verdict.replace('_', ' ')}"
        after = before
        if verdict == "promoted":
            set_in(txn, adapter, DEFAULT_ALIAS, canary, weight=None, actor=actor, reason=note)
            after = canary
        remove_in(txn, adapter, CANARY_ALIAS, actor=actor, reason=note)
        pause_point("alias.committing")
        return VerdictRecord(
            adapter,
            canary,
            verdict,
            reason,
            actor,
            before,
            after,
            job,
            txn.revision,
        )


def hold_canary(db: Database, adapter: str, version: int, *, actor: str, reason: str) -> bool:
    """Record that `adapter`'s canary at `version` is held: its verdict stayed inconclusive
    until its max window, so it keeps its traffic and waits for a manual verdict. One
    `canary.held` event per alias move: False (nothing written) when one exists already or
    the canary no longer points at `version`."""
    check_name(adapter)
    with db.write("canary hold") as txn:
        row = txn.execute(
            "SELECT version, updated_at FROM aliases WHERE adapter = ? AND alias = ?",
            (adapter, CANARY_ALIAS),
        ).fetchone()
        if row is None or row["version"] != version:
            return False
        held = txn.execute(
            "SELECT 1 FROM events WHERE adapter = ? AND version = ? AND action = ? AND at >= ?",
            (adapter, version, "canary.held", row["updated_at"]),
        ).fetchone()
        if held is not None:
            return False
        insert_event(
            txn,
            actor=actor,
            reason=f"held: {reason}",
            action="canary.held",
            adapter=adapter,
            version=version,
            alias=CANARY_ALIAS,
        )
        return True
