"""What the registry keeps for the watch-and-retrain loop: jobs (with a real worker process
killed midway), schedules, alerts with dedupe and cooldown, settings, feedback review, the
request log, and the migration of a registry made before these tables existed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from registry import Registry
from registry.errors import InvalidSchedule, InvalidSettings, JobStateError, NotFound
from registry.loop_records import LoggedRequest, parse_interval, worker_id
from registry.storage import alerts, jobs


@pytest.fixture
def reg(home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]) -> Registry:
    registry = Registry(home)
    registry.register("support", adapter_factory(tiny_base, seed=1), actor="tests")
    registry.promote("support", 1, actor="tests")
    return registry


def test_job_lifecycle_writes_the_audit_chain(reg: Registry) -> None:
    job, new = jobs.queue_job(reg.db, "support", actor="alice", reason="weekly")
    again, second = jobs.queue_job(reg.db, "support", actor="bob")
    assert (new, second, again.id) == (True, False, job.id)  # one queued job per adapter
    claimed = jobs.claim_job(reg.db, actor="runner")
    assert claimed is not None and claimed.id == job.id and claimed.state == "running"
    assert claimed.worker == worker_id()
    assert jobs.claim_job(reg.db, actor="runner") is None
    jobs.heartbeat(reg.db, job.id, parent_version=1)
    done = jobs.finish_job(
        reg.db,
        job.id,
        succeeded=True,
        actor="runner",
        summary="registered support@2",
        version=2,
        result={"gate": {"passed": True}},
    )
    assert (done.state, done.parent_version, done.version) == ("succeeded", 1, 2)
    assert done.result == {"gate": {"passed": True}}
    with pytest.raises(JobStateError, match="is succeeded"):
        jobs.finish_job(reg.db, job.id, succeeded=False, actor="x", summary="late")
    chain = [(e.action, e.job) for e in reg.history("support")]
    assert chain == [
        ("alias.set", None),
        ("job.queued", job.id),
        ("job.started", job.id),
        ("job.succeeded", job.id),
    ]
    with pytest.raises(NotFound, match="no adapter named 'nope'"):
        jobs.queue_job(reg.db, "nope", actor="alice")


CLAIM_AND_DIE = """
import os, sys
from registry import Registry
from registry.storage import jobs
reg = Registry(sys.argv[1])
job = jobs.claim_job(reg.db, actor="worker")
print(job.id, flush=True)
os._exit(0)  # ends without finishing, like a kill
"""


def test_job_of_a_dead_worker_is_failed_by_the_next_claim(reg: Registry) -> None:
    job, _ = jobs.queue_job(reg.db, "support", actor="alice")
    out = subprocess.run(
        [sys.executable, "-c", CLAIM_AND_DIE, str(reg.home)], capture_output=True, text=True
    )
    assert out.stdout.strip() == str(job.id), out.stderr
    assert jobs.get_job(reg.db, job.id).state == "running"
    assert jobs.claim_job(reg.db, actor="runner") is None
    failed = jobs.get_job(reg.db, job.id)
    assert failed.state == "failed"
    assert failed.error is not None and "killed midway" in failed.error
    assert "no alias was changed" in failed.error
    assert reg.history("support")[-1].action == "job.failed"


def test_schedules_queue_one_job_when_due(reg: Registry) -> None:
    assert parse_interval("1d") == 86400 and parse_interval("90s") == 90
    for bad in ("0s", "1y", "day", "-1h"):
        with pytest.raises(InvalidSchedule, match="--every 1d"):
            parse_interval(bad)
    with pytest.raises(InvalidSchedule, match="five fields"):
        jobs.set_schedule(reg.db, "support", every_s=None, cron="every day", actor="a")
    with pytest.raises(InvalidSchedule, match="exactly one"):
        jobs.set_schedule(reg.db, "support", every_s=60, cron="0 3 * * *", actor="a")
    schedule = jobs.set_schedule(reg.db, "support", every_s=3600, cron=None, actor="a")
    first = datetime.fromisoformat(schedule.next_at)
    assert jobs.queue_due(reg.db, actor="cron", now=first - timedelta(seconds=1)) == []
    later = first + timedelta(hours=5)  # five runs missed: one job
    queued = jobs.queue_due(reg.db, actor="cron", now=later)
    assert [(j.adapter, j.trigger) for j in queued] == [("support", "schedule")]
    assert jobs.list_schedules(reg.db)[0].next_at == (later + timedelta(hours=1)).isoformat(
        timespec="milliseconds"
    )
    cron = jobs.set_schedule(reg.db, "support", every_s=None, cron="0 3 * * *", actor="a")
    assert datetime.fromisoformat(cron.next_at).hour == 3
    jobs.remove_schedule(reg.db, "support", actor="a")
    assert jobs.list_schedules(reg.db) == []


def _alert(reg: Registry, fingerprint: str, starts: str, **labels: str) -> Any:
    return alerts.receive_alert(
        reg.db,
        fingerprint=fingerprint,
        starts_at=starts,
        labels={"alertname": "LorafleetDrift", **labels},
        actor="alertmanager",
    )


def test_alerts_dedupe_cooldown_and_unknown_adapters(reg: Registry) -> None:
    first = _alert(reg, "f1", "t1", adapter="support", version="1", signal="prompt_tokens")
    assert first.outcome == "queued" and first.job is not None
    assert first.job.trigger == "alert:f1"
    assert first.job.details["alert"]["labels"]["signal"] == "prompt_tokens"
    assert _alert(reg, "f1", "t1", adapter="support").outcome == "duplicate"
    cooled = _alert(reg, "f2", "t2", adapter="support", signal="prompt_length")
    assert cooled.outcome == "cooldown" and f"job {first.job.id}" in cooled.detail
    assert _alert(reg, "f3", "t3", adapter="ghost").outcome == "ignored"
    assert _alert(reg, "f4", "t4").outcome == "ignored"
    reg.update_settings("support", {"alert_cooldown_s": 0})
    claimed = jobs.claim_job(reg.db, actor="runner")
    assert claimed is not None
    jobs.finish_job(reg.db, claimed.id, succeeded=False, actor="runner", summary="x")
    assert _alert(reg, "f5", "t5", adapter="support").outcome == "queued"
    outcomes = [(a["fingerprint"], a["outcome"]) for a in alerts.list_alerts(reg.db)]
    assert outcomes == [
        ("f1", "queued"),
        ("f2", "cooldown"),
        ("f3", "ignored"),
        ("f4", "ignored"),
        ("f5", "queued"),
    ]
    actions = [e.action for e in reg.history("support")]
    assert actions[1:3] == ["alert.received", "job.queued"]  # the alert, then its job
    received = [e for e in reg.history("support") if e.action == "alert.received"]
    assert [e.job for e in received] == [first.job.id, None, received[-1].job]
    assert "prompt_tokens" in received[0].reason


def test_settings_validate_and_bump_the_revision(reg: Registry) -> None:
    assert reg.settings("support").request_log is True
    before = reg.revision()
    updated = reg.update_settings("support", {"request_log": False, "canary_weight": 0.25})
    assert (updated.request_log, updated.canary_weight) == (False, 0.25)
    assert reg.revision() == before + 1
    with pytest.raises(InvalidSettings, match=r"canary_weight.*got 3"):
        reg.update_settings("support", {"canary_weight": 3})
    with pytest.raises(InvalidSettings, match="colour"):
        reg.update_settings("support", {"colour": "red"})
    assert reg.settings("support").canary_weight == 0.25  # nothing half-written
    assert reg.update_settings("support", {}, reset=True).canary_weight == 0.1
    with pytest.raises(NotFound, match="no adapter named 'ghost'"):
        reg.update_settings("ghost", {"request_log": False})


def test_feedback_review_selects_corrections(reg: Registry) -> None:
    ids = [
        reg.add_feedback(
            f"cmpl-{i}", -1, adapter="support", version=1, prompt=f"p{i}", correction=f"c{i}"
        )
        for i in range(3)
    ]
    reg.add_feedback("cmpl-x", 1, adapter="support", version=1, prompt="px")
    assert reg.review_feedback([ids[0]], "accepted") == 1
    assert reg.review_feedback([ids[1]], "rejected") == 1
    from registry.storage.feedback import corrections

    assert [c["correction"] for c in corrections(reg.db, "support", "accepted")] == ["c0"]
    assert [c["correction"] for c in corrections(reg.db, "support", "all")] == ["c0", "c2"]
    assert corrections(reg.db, "support", "none") == []
    with pytest.raises(NotFound, match="no feedback with id 999"):
        reg.review_feedback([999], "accepted")


def _logged(i: int, adapter: str = "support", at: float | None = None) -> LoggedRequest:
    return LoggedRequest(
        f"cmpl-{i}",
        adapter,
        1,
        adapter,
        f"prompt {i}",
        f"out {i}",
        "stop",
        3,
        2,
        at if at is not None else time.time(),
    )


def test_request_log_retention_and_feedback_join(reg: Registry) -> None:
    log = reg.request_log
    log.append([_logged(i) for i in range(10)] + [_logged(100, "other")])
    log.append([_logged(200, at=time.time() - 7200)])
    assert log.counts() == {"other": 1, "support": 11}
    assert log.prune(max_rows_per_adapter=5, max_age_s=3600) == 1 + 5
    assert [r.response_id for r in log.read("support")] == [f"cmpl-{i}" for i in range(5, 10)]
    assert [r.response_id for r in log.read("support", limit=2)] == ["cmpl-8", "cmpl-9"]
    reg.add_feedback("cmpl-9", -0.5, adapter="support", version=1, correction="better")
    rows = reg.logged_requests("support")
    assert rows[-1]["correction"] == "better" and rows[-1]["score"] == -0.5
    assert rows[0]["score"] is None and rows[0]["at"].endswith("+00:00")
    assert log.delete("support") == 5 and log.counts() == {"other": 1}


# SQLite registries of schema version 1 exist; PostgreSQL's start at version 2.
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_registry_of_schema_1_is_migrated(reg: Registry) -> None:
    reg.add_feedback("cmpl-1", 1, adapter="support", version=1)
    path = reg.home / "registry.db"
    reg.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE events DROP COLUMN job")
    conn.execute("ALTER TABLE feedback DROP COLUMN review")
    conn.execute("UPDATE registry SET schema_version = 1")
    conn.commit()
    conn.close()
    migrated = Registry(path.parent)
    assert migrated.feedback("support")[0]["review"] == "pending"
    assert migrated.history("support")[0].job is None
    assert migrated.info()["revision"] >= 1
    version = migrated.db.query("SELECT schema_version FROM registry")[0][0]
    assert version == 2


def test_cli_settings_feedback_and_requests(reg: Registry, cli: Callable[..., Any]) -> None:
    home = reg.home
    out = cli(
        "registry", "settings", "support", "canary_weight=0.3", "request_log=false", home=home
    )
    assert out.returncode == 0, out.stderr
    assert "canary_weight                    0.3" in out.stdout
    bad = cli("registry", "settings", "support", "canary_weight=2", home=home)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "canary_weight" in bad.stderr and "less than or equal to 1" in bad.stderr
    fid = reg.add_feedback("cmpl-1", -1, adapter="support", version=1, prompt="p", correction="c")
    assert cli("registry", "feedback", "accept", str(fid), home=home).returncode == 0
    listed = json.loads(cli("registry", "feedback", "list", "support", "--json", home=home).stdout)
    assert [(r["id"], r["review"]) for r in listed] == [(fid, "accepted")]
    reg.request_log.append([_logged(1)])
    lines = cli("registry", "requests", "support", home=home).stdout.splitlines()
    assert [json.loads(x)["correction"] for x in lines] == ["c"]
    history = cli("registry", "history", "support", "--all", home=home).stdout
    assert "settings support" in history


def test_a_job_finishes_with_its_canary_in_one_transaction(
    reg: Registry, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    first, _ = jobs.queue_job(reg.db, "support", actor="alice")
    claimed = jobs.claim_job(reg.db, actor="runner")
    assert claimed is not None and claimed.id == first.id
    reg.register("support", adapter_factory(tiny_base, seed=2), actor="runner")
    second, _ = jobs.queue_job(reg.db, "support", actor="bob")
    # One job per adapter at a time: the second waits while the first runs.
    assert jobs.claim_job(reg.db, actor="runner2") is None
    with pytest.raises(JobStateError, match=f"job {first.id} of 'support' is running"):
        jobs.claim_job(reg.db, actor="runner2", job_id=second.id)
    revision = reg.revision()
    done = jobs.finish_job(
        reg.db,
        first.id,
        succeeded=True,
        actor="runner",
        summary="registered support@2",
        version=2,
        canary=(0.3, "gate passed"),
    )
    assert done.state == "succeeded" and reg.revision() == revision + 1
    assert {(a.alias, a.version, a.weight) for a in reg.aliases("support")} == {
        ("production", 1, None),
        ("canary", 2, 0.3),
    }
    assert [e.action for e in reg.history("support")][-2:] == ["job.succeeded", "alias.set"]
    assert jobs.claim_job(reg.db, actor="runner2") is not None
