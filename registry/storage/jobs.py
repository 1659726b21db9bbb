"""Retraining jobs and their schedules: the registry's jobs table.

A job moves queued -> running -> succeeded | failed, each step one transaction with its
event in the history (`job.queued`, `job.started`, `job.succeeded`, `job.failed`), so the
audit chain of an adapter reads alert -> job -> version -> canary -> promote / rollback.
A running job names its worker (`host:pid`) and refreshes a heartbeat; a job whose worker
died (killed midway) is marked failed by the next claim, and since a job changes aliases
only after it has registered its version, such a job never moved an alias. The records
(`JobRecord`, `ScheduleRecord`) are in registry/loop_records.py; `Registry.jobs`
(registry/jobs_api.py) calls the functions here.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from registry.errors import InvalidSchedule, JobStateError, NotFound
from registry.loop_records import JobRecord, ScheduleRecord, worker_id
from registry.names import CANARY_ALIAS
from registry.storage.aliases import set_in
from registry.storage.backend import Database, Row, Transaction
from registry.storage.history import insert_event, utc_now

# A running job on another host is presumed dead after this long without a heartbeat.
STALE_AFTER_S = 600.0


def job_from_row(row: Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        adapter=row["adapter"],
        state=row["state"],
        trigger=row["trigger"],
        created_at=row["created_at"],
        actor=row["actor"],
        reason=row["reason"],
        details=json.loads(row["details"]),
        started_at=row["started_at"],
        heartbeat_at=row["heartbeat_at"],
        finished_at=row["finished_at"],
        worker=row["worker"],
        parent_version=row["parent_version"],
        version=row["version"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
    )


def get_in(txn: Transaction, job_id: int) -> JobRecord:
    """One job read inside an open transaction; NotFound naming where to look."""
    row = txn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise NotFound(f"no job {job_id}; `lorafleet jobs list` shows the jobs")
    return job_from_row(row)


def _require_adapter(txn: Transaction, adapter: str, action: str) -> None:
    if txn.execute("SELECT 1 FROM versions WHERE adapter = ? LIMIT 1", (adapter,)).fetchone():
        return
    names = [r[0] for r in txn.execute("SELECT DISTINCT adapter FROM versions ORDER BY adapter")]
    raise NotFound(
        f"no adapter named {adapter!r}, so cannot {action}; registered adapters: "
        f"{', '.join(names) or 'none'}"
    )


def queue_in(
    txn: Transaction,
    adapter: str,
    trigger: str,
    *,
    actor: str,
    reason: str,
    details: dict[str, Any] | None = None,
) -> tuple[JobRecord, bool]:
    """Queue a job inside an open transaction. An adapter has at most one queued job: if
    one exists it is returned with False (nothing queued)."""
    _require_adapter(txn, adapter, "queue a retraining job")
    row = txn.execute(
        "SELECT * FROM jobs WHERE adapter = ? AND state = 'queued' ORDER BY id LIMIT 1",
        (adapter,),
    ).fetchone()
    if row is not None:
        return job_from_row(row), False
    cur = txn.execute(
        "INSERT INTO jobs (adapter, state, trigger, created_at, actor, reason, details)"
        " VALUES (?, 'queued', ?, ?, ?, ?, ?) RETURNING id",
        (adapter, trigger, utc_now(), actor, reason, json.dumps(details or {})),
    )
    job_id = int(cur.fetchone()[0])
    insert_event(
        txn,
        actor=actor,
        reason=f"trigger {trigger}" + (f": {reason}" if reason else ""),
        action="job.queued",
        adapter=adapter,
        job=job_id,
    )
    return get_in(txn, job_id), True


def queue_job(
    db: Database,
    adapter: str,
    trigger: str = "manual",
    *,
    actor: str,
    reason: str = "",
    details: dict[str, Any] | None = None,
) -> tuple[JobRecord, bool]:
    with db.write("queue job") as txn:
        return queue_in(txn, adapter, trigger, actor=actor, reason=reason, details=details)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _seconds_since(stamp: str | None) -> float:
    if stamp is None:
        return float("inf")
    return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()


def reap_stale(txn: Transaction, *, actor: str, stale_after_s: float = STALE_AFTER_S) -> list[int]:
    """Mark running jobs whose worker is gone as failed; return their ids."""
    host = socket.gethostname()
    reaped = []
    for row in txn.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY id").fetchall():
        job = job_from_row(row)
        worker_host, _, pid = (job.worker or ":").rpartition(":")
        if worker_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            why = f"worker {job.worker} ended without finishing the job (killed midway)"
        elif _seconds_since(job.heartbeat_at) > stale_after_s:
            why = f"no heartbeat from worker {job.worker} for more than {stale_after_s:g} s"
        else:
            continue
        error = f"{why}; no alias was changed by it"
        txn.execute(
            "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ?",
            (utc_now(), error, job.id),
        )
        insert_event(
            txn, actor=actor, reason=error, action="job.failed", adapter=job.adapter, job=job.id
        )
        reaped.append(job.id)
    return reaped


def claim_job(
    db: Database, *, actor: str, job_id: int | None = None, worker: str | None = None
) -> JobRecord | None:
    """Reap dead workers' jobs, then take the oldest queued job (or `job_id`) and mark it
    running for this process; None when nothing is queued."""
    worker = worker or worker_id()
    with db.write("claim job") as txn:
        reap_stale(txn, actor=actor)
        if job_id is not None:
            job = get_in(txn, job_id)
            if job.state != "queued":
                raise JobStateError(
                    f"job {job_id} is {job.state}, not queued; only queued jobs run "
                    f"(queue a new one: lorafleet jobs queue {job.adapter})"
                )
            running = txn.execute(
                "SELECT id FROM jobs WHERE adapter = ? AND state = 'running'", (job.adapter,)
            ).fetchone()
            if running is not None:
                raise JobStateError(
                    f"job {running[0]} of {job.adapter!r} is running; job {job_id} runs after "
                    "it (one job per adapter at a time)"
                )
        else:
            # Never two jobs of one adapter at once: each would move its canary.
            row = txn.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND adapter NOT IN"
                " (SELECT adapter FROM jobs WHERE state = 'running') ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            job = job_from_row(row)
        now = utc_now()
        txn.execute(
            "UPDATE jobs SET state = 'running', started_at = ?, heartbeat_at = ?, worker = ?"
            " WHERE id = ?",
            (now, now, worker, job.id),
        )
        insert_event(
            txn,
            actor=actor,
            reason=f"worker {worker}",
            action="job.started",
            adapter=job.adapter,
            job=job.id,
        )
        return get_in(txn, job.id)


def _running(txn: Transaction, job_id: int, worker: str) -> JobRecord:
    job = get_in(txn, job_id)
    if job.state != "running" or job.worker != worker:
        raise JobStateError(
            f"job {job_id} is {job.state} (worker {job.worker}), no longer running on {worker}; "
            f"{job.error or 'another process took it over'}"
        )
    return job


def heartbeat(db: Database, job_id: int, *, worker: str | None = None, **fields: Any) -> None:
    """Refresh a running job's heartbeat; `parent_version` may be recorded with it."""
    worker = worker or worker_id()
    with db.write("job heartbeat") as txn:
        _running(txn, job_id, worker)
        txn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (utc_now(), job_id))
        if "parent_version" in fields:
            txn.execute(
                "UPDATE jobs SET parent_version = ? WHERE id = ?",
                (fields["parent_version"], job_id),
            )


def finish_job(
    db: Database,
    job_id: int,
    *,
    succeeded: bool,
    actor: str,
    summary: str,
    version: int | None = None,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    worker: str | None = None,
    canary: tuple[float, str] | None = None,
) -> JobRecord:
    """End a running job of this worker; `summary` is the history event's reason.

    `canary` = (weight, reason) points the `canary` alias at the job's `version` in the same
    transaction, so a job is either finished with its canary set or still running with no
    alias moved (a worker killed before this commit is reaped as "no alias was changed")."""
    worker = worker or worker_id()
    with db.write("finish job") as txn:
        job = _running(txn, job_id, worker)
        state = "succeeded" if succeeded else "failed"
        txn.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, version = ?, result = ?, error = ?"
            " WHERE id = ?",
            (state, utc_now(), version, json.dumps(result) if result else None, error, job_id),
        )
        insert_event(
            txn,
            actor=actor,
            reason=summary,
            action=f"job.{state}",
            adapter=job.adapter,
            version=version,
            job=job_id,
        )
        if canary is not None and succeeded and version is not None:
            weight, reason = canary
            set_in(
                txn, job.adapter, CANARY_ALIAS, version, weight=weight, actor=actor, reason=reason
            )
        return get_in(txn, job_id)


def get_job(db: Database, job_id: int) -> JobRecord:
    rows = db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
    if not rows:
        raise NotFound(f"no job {job_id}; `lorafleet jobs list` shows the jobs")
    return job_from_row(rows[0])


def list_jobs(
    db: Database, adapter: str | None = None, state: str | None = None, limit: int | None = None
) -> list[JobRecord]:
    """Jobs, newest first."""
    where, params = [], []
    if adapter:
        where.append("adapter = ?")
        params.append(adapter)
    if state:
        where.append("state = ?")
        params.append(state)
    sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    return [job_from_row(r) for r in db.query(sql, tuple(params))]


# ---- schedules -----------------------------------------------------------------------------


def next_run(every_s: float | None, cron: str | None, after: datetime) -> datetime:
    if cron is not None:
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise InvalidSchedule(
                f"cron expression {cron!r} is invalid; use five fields, e.g. '0 3 * * *' "
                "(daily at 03:00 UTC)"
            )
        following: datetime = croniter(cron, after).get_next(datetime)
        return following
    assert every_s is not None
    return after + timedelta(seconds=every_s)


def set_schedule(
    db: Database, adapter: str, *, every_s: float | None, cron: str | None, actor: str
) -> ScheduleRecord:
    if (every_s is None) == (cron is None):
        raise InvalidSchedule("give exactly one of --every INTERVAL or --cron EXPR")
    now = datetime.now(UTC)
    first = next_run(every_s, cron, now).isoformat(timespec="milliseconds")
    what = f"every {every_s:g} s" if every_s is not None else f"cron {cron!r}"
    with db.write("schedule") as txn:
        _require_adapter(txn, adapter, "schedule retraining")
        txn.execute(
            "INSERT INTO schedules (adapter, every_s, cron, next_at, created_at, actor)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (adapter) DO UPDATE SET"
            " every_s = excluded.every_s, cron = excluded.cron, next_at = excluded.next_at,"
            " created_at = excluded.created_at, actor = excluded.actor",
            (adapter, every_s, cron, first, utc_now(), actor),
        )
        insert_event(
            txn, actor=actor, reason=f"{what}, next {first}", action="schedule.set", adapter=adapter
        )
    return next(s for s in list_schedules(db) if s.adapter == adapter)


def remove_schedule(db: Database, adapter: str, *, actor: str) -> None:
    with db.write("schedule remove") as txn:
        if txn.execute("DELETE FROM schedules WHERE adapter = ?", (adapter,)).rowcount == 0:
            raise NotFound(f"adapter {adapter!r} has no retraining schedule")
        insert_event(txn, actor=actor, reason="", action="schedule.remove", adapter=adapter)


def list_schedules(db: Database) -> list[ScheduleRecord]:
    return [
        ScheduleRecord(
            r["adapter"], r["every_s"], r["cron"], r["next_at"], r["created_at"], r["actor"]
        )
        for r in db.query("SELECT * FROM schedules ORDER BY adapter")
    ]


def queue_due(db: Database, *, actor: str, now: datetime | None = None) -> list[JobRecord]:
    """Queue a job for every schedule that is due and move it to its next time after now
    (runs missed while nothing ran collapse into one job)."""
    now = now or datetime.now(UTC)
    queued = []
    with db.write("queue scheduled jobs") as txn:
        due = txn.execute(
            "SELECT * FROM schedules WHERE next_at <= ? ORDER BY adapter",
            (now.isoformat(timespec="milliseconds"),),
        ).fetchall()
        for row in due:
            job, new = queue_in(
                txn,
                row["adapter"],
                "schedule",
                actor=actor,
                reason=f"scheduled for {row['next_at']}",
            )
            if new:
                queued.append(job)
            following = next_run(row["every_s"], row["cron"], now)
            txn.execute(
                "UPDATE schedules SET next_at = ? WHERE adapter = ?",
                (following.isoformat(timespec="milliseconds"), row["adapter"]),
            )
    return queued

