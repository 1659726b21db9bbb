"""`Registry.jobs`: the retraining jobs and schedules of one registry, as `tuning` uses them
(the job runner and `lorafleet jobs ...`); each call is one transaction of
registry/storage/jobs.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from registry.loop_records import JobRecord, ScheduleRecord
from registry.storage import jobs
from registry.storage.backend import Database


class Jobs:
    """The retraining jobs and schedules of one registry (`Registry.jobs`); each call is one
    transaction of registry/storage/jobs.py."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, job_id: int) -> JobRecord:
        return jobs.get_job(self._db, job_id)

    def recent(
        self, adapter: str | None = None, state: str | None = None, limit: int | None = None
    ) -> list[JobRecord]:
        """Jobs, newest first."""
        return jobs.list_jobs(self._db, adapter, state, limit)

    def queue(
        self,
        adapter: str,
        trigger: str = "manual",
        *,
        actor: str,
        reason: str = "",
        details: dict[str, Any] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a job; (the adapter's queued job, False) if it already has one."""
        return jobs.queue_job(
            self._db, adapter, trigger, actor=actor, reason=reason, details=details
        )

    def reap(self, *, actor: str, stale_after_s: float = jobs.STALE_AFTER_S) -> list[JobRecord]:
        """Fail the running jobs whose worker is gone; the failed jobs."""
        with self._db.write("reap jobs") as txn:
            reaped = jobs.reap_stale(txn, actor=actor, stale_after_s=stale_after_s)
        return [self.get(job_id) for job_id in reaped]

    def claim(
        self, *, actor: str, job_id: int | None = None, worker: str | None = None
    ) -> JobRecord | None:
        return jobs.claim_job(self._db, actor=actor, job_id=job_id, worker=worker)

    def heartbeat(self, job_id: int, *, worker: str | None = None, **fields: Any) -> None:
        jobs.heartbeat(self._db, job_id, worker=worker, **fields)

    def finish(
        self,
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
        """End a running job of this worker (`finish_job`)."""
        return jobs.finish_job(
            self._db,
            job_id,
            succeeded=succeeded,
            actor=actor,
            summary=summary,
            version=version,
            result=result,
            error=error,
            worker=worker,
            canary=canary,
        )

    def set_schedule(
        self, adapter: str, *, every_s: float | None, cron: str | None, actor: str
    ) -> ScheduleRecord:
        return jobs.set_schedule(self._db, adapter, every_s=every_s, cron=cron, actor=actor)

    def remove_schedule(self, adapter: str, *, actor: str) -> None:
        jobs.remove_schedule(self._db, adapter, actor=actor)

    def schedules(self) -> list[ScheduleRecord]:
        return jobs.list_schedules(self._db)

    def queue_due(self, *, actor: str, now: datetime | None = None) -> list[JobRecord]:
        return jobs.queue_due(self._db, actor=actor, now=now)
