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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from registry.database import Database
from registry.history import insert_event, utc_now
from registry.jobs import JobRecord, queue_in
from registry.settings import AdapterSettings

Outcome = Literal["queued", "duplicate", "cooldown", "ignored"]


@dataclass(frozen=True)
class AlertOutcome:
    fingerprint: str
    adapter: str | None
    outcome: Outcome
    detail: str
    job: JobRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "adapter": self.adapter,
            "outcome": self.outcome,
            "detail": self.detail,
            "job": self.job.id if self.job else None,
        }


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
        outcome: Outcome
        job = None
        known = adapter is not None and txn.execute(
            "SELECT 1 FROM versions WHERE adapter = ? LIMIT 1", (adapter,)
        ).fetchone()
        if not known:
            outcome, detail = "ignored", f"label adapter={adapter!r} names no registered adapter"
        else:
            assert adapter is not None
            row = txn.execute("SELECT settings FROM settings WHERE adapter = ?", (adapter,))
            found = row.fetchone()
            settings = (
                AdapterSettings.model_validate(json.loads(found[0])) if found else AdapterSettings()
            )
            cutoff = datetime.now(UTC) - timedelta(seconds=settings.alert_cooldown_s)
            recent = txn.execute(
                "SELECT id, created_at FROM jobs WHERE adapter = ? AND trigger LIKE 'alert:%'"
                " AND created_at > ? ORDER BY id DESC LIMIT 1",
                (adapter, cutoff.isoformat(timespec="milliseconds")),
            ).fetchone()
            if recent is not None:
                outcome = "cooldown"
                detail = (
                    f"job {recent['id']} was queued by an alert at {recent['created_at']}, within "
                    f"the cooldown of {settings.alert_cooldown_s:g} s"
                )
            else:
                job, new = queue_in(
                    txn,
                    adapter,
                    f"alert:{fingerprint}",
                    actor=actor,
                    reason=f"{alertname} {_describe(labels)}",
                    details={"alert": {"fingerprint": fingerprint, "starts_at": starts_at,
                                       "labels": labels}},
                )
                outcome = "queued" if new else "duplicate"
                detail = f"job {job.id}" + ("" if new else " was already queued")
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
                job.id if job else None,
            ),
        )
        insert_event(
            txn,
            actor=actor,
            reason=f"{alertname} {fingerprint} {_describe(labels)}: {outcome} ({detail})",
            action="alert.received",
            adapter=adapter if known else None,
            job=job.id if job else None,
        )
        return AlertOutcome(fingerprint, adapter, outcome, detail, job)


def _describe(labels: dict[str, str]) -> str:
    keys = ("adapter", "version", "signal")
    return "{" + ", ".join(f"{k}={labels[k]}" for k in keys if k in labels) + "}"


def list_alerts(db: Database, adapter: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM alerts" + (" WHERE adapter = ?" if adapter else "")
    rows = db.query(sql + " ORDER BY received_at", (adapter,) if adapter else ())
    return [{**dict(r), "labels": json.loads(r["labels"])} for r in rows]
