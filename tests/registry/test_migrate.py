"""`lorafleet registry migrate`: an embedded registry (SQLite + local files) copied, history
included, into PostgreSQL + S3 (real servers), checked, and then used from the new place;
a migration killed before its commit leaves the target empty and can be run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import Registry
from registry.errors import NotInitialized
from registry.loop_records import LoggedRequest

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
STORE_VARIABLES = ("LORAFLEET_REGISTRY_URL", "LORAFLEET_ARTIFACTS_URL")


@pytest.fixture
def embedded(
    tmp_path: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """A SQLite registry with a history of every kind: versions, alias moves and a
    rollback, a canary, settings, feedback, a finished and a queued job, a schedule, an
    alert, an archived version."""
    for name in STORE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    registry = Registry.create(home, tiny_base, max_rank=16, actor="tests")
    for seed in range(4):
        registry.register("support", adapter_factory(tiny_base, seed=seed), actor="ci")
    registry.register("intent", adapter_factory(tiny_base, seed=9), actor="ci")
    registry.promote("support", 1)
    registry.promote("support", 2, reason="better")
    registry.rollback("support", reason="worse on Mondays")
    registry.promote("intent", 1)
    registry.set_alias("support", "canary", 3, weight=0.25, actor="tests", reason="try")
    registry.archive("support", 4)
    registry.update_settings("support", {"canary_min_requests": 50, "pinned": True})
    registry.add_feedback("cmpl-1", 0.5, adapter="support", version=1, correction="fine")
    job, _ = registry.jobs.queue("support", actor="tests", reason="weekly")
    registry.jobs.claim(actor="runner")
    registry.jobs.finish(job.id, succeeded=False, actor="runner", summary="gate refused")
    registry.jobs.set_schedule("intent", every_s=3600, cron=None, actor="tests")
    registry.request_log.append(
        [
            LoggedRequest(
                response_id=f"cmpl-{i}", adapter="support", version=1, model="support",
                prompt="Review: fine.\nSentiment:", output=" positive", finish_reason="stop",
                prompt_tokens=6, completion_tokens=1, at=1_700_000_000.0 + i,
            )
            for i in range(3)
        ]
    )
    registry.receive_alert(
        fingerprint="f1",
        starts_at="2026-12-01T00:00:00Z",
        labels={"alertname": "LorafleetDrift", "adapter": "intent", "version": "1"},
        actor="alertmanager",
    )
    registry.close()
    return home


def lorafleet(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "LORAFLEET_HOME": str(home), **env}
    for name in STORE_VARIABLES:
        full.pop(name, None)
    return subprocess.run([LORAFLEET, *args], env=full, capture_output=True, text=True, timeout=300)


def state(registry: Registry) -> dict[str, Any]:
    return {
        "history": [e.to_dict() for e in registry.history(all_events=True)],
        "versions": {
            name: [v.to_dict() for v in registry.list_versions(name)]
            for name in registry.adapter_names()
        },
        "aliases": sorted((a.adapter, a.alias, a.version, a.weight) for a in registry.aliases()),
        "settings": {k: v.model_dump() for k, v in registry.all_settings().items()},
        "feedback": registry.feedback("support"),
        "jobs": [j.to_dict() for j in registry.jobs.recent()],
        "schedules": [s.to_dict() for s in registry.jobs.schedules()],
        "requests": registry.logged_requests("support"),
    }


def test_migrate_copies_everything_and_the_copy_is_used(
    embedded: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    postgres: Any,
    s3: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = Registry(embedded)
    before = state(source)
    source.close()
    url, bucket = postgres.new_database(), s3.new_bucket()
    done = lorafleet(
        "registry", "migrate", "--to", url, "--artifacts-to", bucket, home=embedded, **s3.env()
    )
    assert done.returncode == 0, done.stderr
    assert "verified: every row equal, every artifact whole" in done.stdout
    assert "5 versions" in done.stdout and "5 artifacts" in done.stdout  # archived too
    assert "3 logged requests" in done.stdout
    print("\n" + done.stdout)

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)

    moved = Registry(embedded.parent / "elsewhere", url=url, artifacts_url=bucket)
    after = state(moved)
    assert after["history"][:-1] == before["history"]
    assert after["history"][-1]["action"] == "migrate"
    assert {k: v for k, v in after.items() if k != "history"} == {
        k: v for k, v in before.items() if k != "history"
    }
    assert moved.resolve("support").version == 1 and moved.resolve("support:canary").version == 3
    path = moved.artifact_path(moved.resolve("support"))
    assert (path / "adapter_model.safetensors").is_file()
    assert moved.fsck(verify=True).problems == []
    # new rows continue the copied ids
    new = moved.register("intent", adapter_factory(tiny_base, seed=11))
    queued, _ = moved.jobs.queue("support", actor="tests")  # intent has one queued
    assert new.version == 2 and queued.id > max(j["id"] for j in before["jobs"])
    assert moved.history(all_events=True)[-1].id > after["history"][-1]["id"]
    moved.close()
    again = lorafleet(
        "registry", "migrate", "--to", url, "--artifacts-to", bucket, home=embedded, **s3.env()
    )
    assert again.returncode == 2 and "already holds a registry" in again.stderr


def test_a_killed_migration_leaves_the_target_empty(
    embedded: Path, postgres: Any, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, bucket = postgres.new_database(), s3.new_bucket()
    env = {
        **os.environ, **s3.env(), "LORAFLEET_HOME": str(embedded),
        "LORAFLEET_PAUSE_AT": "migrate.committing",
    }
    proc = subprocess.Popen(
        [LORAFLEET, "registry", "migrate", "--to", url, "--artifacts-to", bucket],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().strip() == "lorafleet: paused at migrate.committing"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(NotInitialized, match="no registry at postgresql://"):
        Registry(embedded.parent / "elsewhere", url=url, artifacts_url=bucket)
    done = lorafleet(
        "registry", "migrate", "--to", url, "--artifacts-to", bucket, home=embedded, **s3.env()
    )
    assert done.returncode == 0, done.stderr


def test_local_files_need_a_shared_place(embedded: Path, postgres: Any) -> None:
    done = lorafleet("registry", "migrate", "--to", postgres.new_database(), home=embedded)
    assert done.returncode == 2
    assert "are local to this host: give --artifacts-to URL" in done.stderr
