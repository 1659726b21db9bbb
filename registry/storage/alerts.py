"""Alerts from Alertmanager -> retraining jobs, deduplicated and rate-limited.

One firing episode of an alert (its fingerprint and start time) queues at most one job:
Alertmanager re-sends a firing alert every repeat interval, and several servers may
receive the same notification. After an alert-triggered job an adapter is in cooldown
(its `alert_cooldown_s` setting): later alerts are recorded but queue nothing. Every alert
is recorded with its outcome and an `alert.received` event, in the same transaction as the
job it queued.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from registry.loop_records import AlertOutcome, AlertOutcomeKind
from registry.storage.backend import Database, Transaction
from registry.storage.history import insert_event, utc_now
from registry.storage.jobs import get_in, queue_in
from registry.storage.settings import get_settings


def receive_alert(
    db: Database,
    *,
    fingerprint: str,
    starts_at: str,
    labels: dict[str, str],
    actor: str,
) -> AlertOutcome:
    """Record one firing alert; queue a retraining job for its `adapter` label unless it
    is a duplicate, the adapter is in cooldown, or the alert names no known adapter."""
    adapter = labels.get("adapter")
    alertname = labels.get("alertname", "")
    with db.write("alert") as txn:
        seen = txn.execute(
            "SELECT outcome, job_id FROM alerts WHERE fingerprint = ? AND starts_at = ?",
            (fingerprint, starts_at),
        ).fetchone()
        if seen is not None:
            return AlertOutcome(
                fingerprint,
                adapter,
                "duplicate",
                f"already received (outcome {seen['outcome']}, job {seen['job_id']})",
            )
        known = adapter is not None and bool(
            txn.execute("SELECT 1 FROM versions WHERE adapter = ? LIMIT 1", (adapter,)).fetchone()
        )
        outcome, detail, job_id = _decide(txn, adapter if known else None, labels)
        # The alert's event comes first in the history, the job it queues right after.
        event = insert_event(
            txn,
            actor=actor,
            reason="",
            action="alert.received",
            adapter=adapter if known else None,
            job=job_id,
        )
        job = None
        if outcome == "queued":
            assert adapter is not None
            job, _ = queue_in(
                txn,
                adapter,
                f"alert:{fingerprint}",
                actor=actor,
                reason=f"{alertname} {_describe(labels)}",
                details={
                    "alert": {"fingerprint": fingerprint, "starts_at": starts_at, "labels": labels}
                },
            )
            job_id, detail = job.id, f"job {job.id}"
        elif job_id is not None:
            job = get_in(txn, job_id)
        txn.execute(
            "UPDATE events SET job = ?, reason = ? WHERE id = ?",
            (job_id, f"{alertname} {fingerprint} {_describe(labels)}: {outcome} ({detail})", event),
        )
        txn.execute(
            "INSERT INTO alerts (fingerprint, starts_at, received_at, alertname, adapter, labels,"
            " outcome, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                fingerprint,
                starts_at,
                utc_now(),
                alertname,
                adapter,
                json.dumps(labels, sort_keys=True),
                outcome,
                job_id,
            ),
        )
        return AlertOutcome(fingerprint, adapter, outcome, detail, job)


def _decide(
    txn: Transaction, adapter: str | None, labels: dict[str, str]
) -> tuple[AlertOutcomeKind, str, int | None]:
    """What an alert does: (outcome, detail, id of the job it concerns)."""
    if adapter is None:
        unknown = labels.get("adapter")
        return "ignored", f"label adapter={unknown!r} names no registered adapter", None
    settings = get_settings(txn, adapter)
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.alert_cooldown_s)
    recent = txn.execute(
        "SELECT id, created_at FROM jobs WHERE adapter = ? AND trigger LIKE 'alert:%'"
        " AND created_at > ? ORDER BY id DESC LIMIT 1",
        (adapter, cutoff.isoformat(timespec="milliseconds")),
    ).fetchone()
    if recent is not None:
        return (
            "cooldown",
            f"job {recent['id']} was queued by an alert at {recent['created_at']}, within the "
            f"cooldown of {settings.alert_cooldown_s:g} s",
            None,
        )
    queued = txn.execute(
        "SELECT id FROM jobs WHERE adapter = ? AND state = 'queued' ORDER BY id LIMIT 1",
        (adapter,),
    ).fetchone()
    if queued is not None:
        return "duplicate", f"job {queued['id']} was already queued", int(queued["id"])
    return "queued", "", None


def _describe(labels: dict[str, str]) -> str:
    keys = ("adapter", "version", "signal")
    return "{" + ", ".join(f"{k}={labels[k]}" for k in keys if k in labels) + "}"


def list_alerts(db: Database, adapter: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM alerts" + (" WHERE adapter = ?" if adapter else "")
    rows = db.query(sql + " ORDER BY received_at", (adapter,) if adapter else ())
    return [{**dict(r), "labels": json.loads(r["labels"])} for r in rows]
