"""Canary statistics on known numbers, the verdict and hold transactions on a real
registry, and the request log writer's batching, retention and shutdown flush. The criteria
are tested in test_canary_criteria.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from registry import Registry, RequestLog
from registry.errors import AliasConflict, NotFound
from registry.loop_records import LoggedRequest
from registry.storage.verdicts import decide_canary
from serving.watch.canary_stats import CanaryStats, VersionStats
from serving.watch.request_writer import RequestLogWriter


def test_stats_count_only_what_happened_since_the_alias_move() -> None:
    stats = CanaryStats()
    stats.record("a", 2, error=False, seconds_per_token=9.0)
    stats.add_feedback("a", 2, -1.0)
    start = time.time()
    for i in range(20):
        stats.record("a", 2, error=i < 2, seconds_per_token=None if i < 2 else float(i))
    stats.add_feedback("a", 2, 1.0)
    stats.add_feedback("a", 2, 0.0)
    got = stats.since("a", 2, start)
    assert got == VersionStats(20, 2, tuple(float(i) for i in range(2, 20)), (1.0, 0.0))
    assert got.error_rate == 0.1 and got.mean_feedback == 0.5
    assert got.median_s_per_token == 10.5
    assert got.p95_s_per_token == pytest.approx(18.15)  # numpy's linear p95 = 2 + 0.95 * 17
    assert got.to_dict()["latency_samples"] == 18 and got.to_dict()["ratings"] == 2
    assert stats.since("a", 3, start) == VersionStats(0, 0)


def _canary_registry(home: Path, adapter_factory: Callable[..., Path], base: Path) -> Registry:
    registry = Registry(home)
    for seed in (1, 2, 3):
        registry.register("a", adapter_factory(base, rank=4, seed=seed))
    registry.promote("a", 1)
    registry.set_alias("a", "canary", 2, weight=0.3)
    return registry


def test_verdict_is_refused_when_the_canary_moved_meanwhile(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = _canary_registry(home, adapter_factory, tiny_base)
    registry.set_alias("a", "canary", 3)  # e.g. another retraining since the check read it
    revision = registry.revision()
    with pytest.raises(AliasConflict, match="canary now points at version 3, not 2"):
        decide_canary(registry.db, "a", "promoted", actor="s1", reason="r", version=2)
    assert registry.revision() == revision  # nothing written
    record = decide_canary(registry.db, "a", "promoted", actor="s2", reason="ok", version=3)
    assert (record.production_before, record.production_after, record.revision) == (
        1,
        3,
        revision + 1,
    )
    assert {a.alias: a.version for a in registry.aliases("a")} == {"production": 3}
    with pytest.raises(NotFound, match="has no canary alias"):
        decide_canary(registry.db, "a", "rolled_back", actor="s1", reason="r")
    registry.rollback("a")  # the promotion is an ordinary alias move: rollback undoes it
    assert {a.alias: a.version for a in registry.aliases("a")} == {"production": 1}


def test_a_hold_is_recorded_once_per_alias_move(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = _canary_registry(home, adapter_factory, tiny_base)
    assert registry.hold_canary("a", 2, actor="s1", reason="inconclusive after 3600 s: ...")
    assert not registry.hold_canary("a", 2, actor="s2", reason="again")  # another server
    assert not registry.hold_canary("a", 3, actor="s1", reason="r")  # the canary is at 2
    held = [e for e in registry.history("a") if e.action == "canary.held"]
    assert [(e.version, e.actor, e.reason) for e in held] == [
        (2, "s1", "held: inconclusive after 3600 s: ...")
    ]
    assert {a.alias: a.version for a in registry.aliases("a")} == {"production": 1, "canary": 2}
    time.sleep(0.01)  # the next alias move is later than the hold (ms timestamps)
    registry.set_alias("a", "canary", 2, weight=0.4)  # moved again: a new window, a new hold
    assert registry.hold_canary("a", 2, actor="s1", reason="r2")
    record = decide_canary(registry.db, "a", "promoted", actor="ana", reason="checked")
    assert record.production_after == 2  # a held canary is decided by hand


def _row(i: int, adapter: str = "a") -> LoggedRequest:
    return LoggedRequest(
        f"cmpl-{i}", adapter, 1, adapter, f"p{i}", f"o{i}", "stop", 3, 2, time.time()
    )


def test_writer_batches_prunes_and_flushes_on_close(home: Path) -> None:
    log = RequestLog(home)
    writer = RequestLogWriter(lambda: log, max_rows_per_adapter=3, max_age_s=3600)
    writer.opted_out = frozenset({"b"})
    for i in range(1, 10):
        writer.submit(_row(i))
    writer.submit(replace(_row(0), at=time.time() - 7200))  # newest row, but too old
    writer.submit(_row(99, "b"))
    writer.close()  # writes what is pending
    assert [r.response_id for r in log.read("a")] == ["cmpl-7", "cmpl-8", "cmpl-9"]
    assert log.counts() == {"a": 3}
    assert (writer.written, writer.dropped) == (10, 0)  # 10 written, 7 pruned since


def test_writer_drops_a_failing_batch_without_raising(home: Path) -> None:
    def broken() -> RequestLog:
        raise NotFound("no request log here")

    writer = RequestLogWriter(broken, max_rows_per_adapter=3, max_age_s=3600)
    writer.submit(_row(1))
    writer.close()
    assert (writer.written, writer.dropped) == (0, 1)
