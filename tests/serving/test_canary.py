"""Canary statistics and criteria on known numbers, the verdict transaction on a real
registry, and the request log writer's batching, retention and shutdown flush."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from registry import Registry, RequestLog
from registry.errors import AliasConflict, NotFound
from registry.loop_records import AdapterSettings, LoggedRequest
from registry.storage.verdicts import decide_canary
from serving.watch.canary_stats import CanaryStats, VersionStats, compare_stats
from serving.watch.request_writer import RequestLogWriter

THRESHOLDS = {"prompt_tokens": 0.2, "feedback": 0.25}


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
    # latencies 2..19: numpy's linear p95 = 2 + 0.95 * 17
    assert got == VersionStats(20, 2, 18, pytest.approx(18.15), 2, 0.5)
    assert got.error_rate == 0.1
    assert stats.since("a", 3, start) == VersionStats(0, 0, 0, None, 0, None)


def test_criteria_name_both_numbers_and_the_limit() -> None:
    canary = VersionStats(40, 2, 38, 0.030, 4, 0.25)
    production = VersionStats(60, 0, 60, 0.010, 5, 0.6)
    criteria = compare_stats(
        canary,
        production,
        AdapterSettings(),
        {"prompt_tokens": 0.31, "feedback": None},
        {"prompt_tokens": 0.05},
        THRESHOLDS,
    )
    assert [(c.name, c.passed) for c in criteria] == [
        ("error_rate", False),
        ("latency", False),
        ("feedback", False),
        ("drift.prompt_tokens", False),
        ("drift.feedback", None),
    ]
    assert [c.text for c in criteria] == [
        "error rate canary 0.050 (2/40) vs production 0.000 (0/60): increase 0.050 > 0.02",
        "p95 s/token canary 0.0300 vs production 0.0100: ratio 3.00 > 1.5",
        "mean feedback canary 0.250 vs production 0.600 (4 vs 5 ratings): drop 0.350 > 0.2",
        "drift prompt_tokens canary 0.310 > threshold 0.2 (threshold 0.2, production 0.050)",
        "drift feedback canary n/a (production n/a): not compared (too few samples or no baseline)",
    ]


def test_a_canary_no_worse_than_production_passes_every_compared_criterion() -> None:
    canary = VersionStats(10, 0, 10, 0.012, 0, None)
    production = VersionStats(90, 1, 90, 0.010, 3, 1.0)
    criteria = compare_stats(
        canary, production, AdapterSettings(), {"prompt_tokens": 0.2}, {}, THRESHOLDS
    )
    assert [(c.name, c.passed) for c in criteria] == [
        ("error_rate", True),  # 0.000 - 0.011 <= 0.02
        ("latency", True),  # 1.2 <= 1.5
        ("feedback", None),  # no feedback on the canary
        ("drift.prompt_tokens", True),  # 0.2 is not above 0.2
        ("drift.feedback", None),
    ]


def test_a_canary_drifting_less_than_production_is_not_worse() -> None:
    stats = VersionStats(10, 0, 10, 0.01, 0, None)
    drift = {"prompt_tokens": 0.35, "prompt_length": 0.9}
    production = {"prompt_tokens": 0.62, "prompt_length": 0.4}
    thresholds = {"prompt_tokens": 0.2, "prompt_length": 0.25}
    criteria = compare_stats(stats, stats, AdapterSettings(), drift, production, thresholds)
    by_name = {c.name: c for c in criteria}
    assert by_name["drift.prompt_tokens"].passed is True
    assert by_name["drift.prompt_tokens"].text == (
        "drift prompt_tokens canary 0.350 <= production 0.62 (threshold 0.2, production 0.620)"
    )
    assert by_name["drift.prompt_length"].passed is False  # above both


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
