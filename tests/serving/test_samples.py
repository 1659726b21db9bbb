"""The dashboard's in-memory series (serving/watch/samples.py) on a clock the test moves."""

from __future__ import annotations

from typing import Any

import pytest

from serving.watch.samples import MAX_LATENCIES, DriftHistory, Traffic


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rates_errors_tokens_and_percentiles_per_step() -> None:
    clock = Clock(1000.0)  # a step boundary: steps of 5 s start at 1000, 1005, ...
    traffic = Traffic(step_s=5.0, window_s=30.0, clock=clock)
    for i in range(10):
        traffic.record("a", "1", seconds=0.1 * (i + 1), prompt_tokens=3, completion_tokens=2)
    traffic.record("a", "1", seconds=None, error=True)
    clock.now = 1005.0
    traffic.record("b", "2", seconds=1.0, completion_tokens=4)
    clock.now = 1007.0  # 2 s into the last step
    series = traffic.series()
    assert series["times"] == [980.0, 985.0, 990.0, 995.0, 1000.0, 1005.0]
    a, b = series["versions"]
    assert (a["model"], b["model"]) == ("a@1", "b@2")
    assert a["requests_per_s"] == [0.0, 0.0, 0.0, 0.0, 2.2, 0.0]  # 11 requests / 5 s
    assert a["error_rate"] == [None, None, None, None, round(1 / 11, 4), None]
    assert a["p50_s"][4] == pytest.approx(0.55)
    assert a["p99_s"][4] == pytest.approx(0.991)
    assert a["prompt_tokens_per_s"][4] == 6.0 and a["completion_tokens_per_s"][4] == 4.0
    assert b["requests_per_s"][-1] == 0.5  # 1 request in the 2 s elapsed of this step
    # the last minute is the whole 30 s window here: 11 requests in 5 * 5 + 2 s
    minute = series["recent"]["a@1"]
    assert minute["requests"] == 11 and minute["requests_per_s"] == round(11 / 27, 4)
    assert minute["error_rate"] == round(1 / 11, 4)
    assert minute["p95_s"] == pytest.approx(0.955)
    assert series["recent"]["b@2"]["requests"] == 1 and series["matching"] == 2


def test_charts_are_limited_to_the_busiest_matching_versions() -> None:
    clock = Clock(1000.0)
    traffic = Traffic(step_s=5.0, window_s=30.0, clock=clock)
    for n, adapter in enumerate(["quiet", "busy", "middle", "other"]):
        for _ in range((n * 7) % 5 + 1):  # quiet 1, busy 3, middle 5, other 2
            traffic.record(adapter, "1", seconds=0.1)
    drawn = traffic.series(limit=2)
    assert [v["model"] for v in drawn["versions"]] == ["busy@1", "middle@1"]  # by name
    assert drawn["matching"] == 4 and len(drawn["recent"]) == 4  # the table: every version
    some = traffic.series(lambda name: "i" in name, limit=5)
    assert [v["model"] for v in some["versions"]] == ["middle@1", "quiet@1"]
    assert some["matching"] == 2


def test_an_ended_steps_percentiles_are_computed_once() -> None:
    clock = Clock(1000.0)
    traffic = Traffic(step_s=5.0, window_s=30.0, clock=clock)
    traffic.record("a", "1", seconds=0.5)
    traffic.series()
    assert traffic._buckets[("a", "1")][200].quantiles is None  # the step is still running
    clock.now = 1005.0
    traffic.series()
    assert traffic._buckets[("a", "1")][200].quantiles == [0.5, 0.5, 0.5]


def test_old_steps_leave_the_window() -> None:
    clock = Clock(1000.0)
    traffic = Traffic(step_s=5.0, window_s=30.0, clock=clock)
    traffic.record("a", "1", seconds=0.1)
    clock.now = 1031.0
    gone = traffic.series()
    assert gone["versions"] == [] and gone["recent"] == {}  # out of the window
    assert traffic._buckets == {}  # and out of memory
    traffic.record("a", "1", seconds=0.2)
    assert traffic._buckets[("a", "1")].keys() == {206}  # the old bucket was dropped


def test_latencies_are_a_bounded_sample() -> None:
    clock = Clock(1000.0)
    traffic = Traffic(step_s=5.0, window_s=30.0, clock=clock)
    for i in range(MAX_LATENCIES * 4):
        traffic.record("a", "1", seconds=float(i))
    bucket = traffic._buckets[("a", "1")][200]
    assert len(bucket.latencies) == MAX_LATENCIES and bucket.timed == MAX_LATENCIES * 4
    assert max(bucket.latencies) > MAX_LATENCIES  # later requests replaced earlier ones
    p50 = traffic.series()["versions"][0]["p50_s"][-1]
    assert MAX_LATENCIES * 1.5 < p50 < MAX_LATENCIES * 2.5  # near the true median, 1023.5


def test_drift_history_samples_scores_and_forgets_old_points() -> None:
    clock = Clock(1000.0)
    rows: list[dict[str, Any]] = [
        {"adapter": "a", "version": 1, "scores": {"prompt_length": None, "feedback": 0.1}}
    ]
    history = DriftHistory(lambda: rows, step_s=5.0, window_s=20.0, clock=clock)
    history.sample()
    clock.now = 1005.0
    rows[0]["scores"] = {"prompt_length": 0.3, "feedback": 0.2}
    history.sample()
    (series,) = history.series()
    assert series["model"] == "a@1" and series["times"] == [1000.0, 1005.0]
    assert series["scores"] == {"feedback": [0.1, 0.2], "prompt_length": [None, 0.3]}
    rows.clear()
    clock.now = 1021.0
    history.sample()
    assert [s["times"] for s in history.series()] == [[1005.0]]
    clock.now = 1030.0
    history.sample()
    assert history.series() == []


def test_drift_history_thread_starts_and_stops() -> None:
    calls: list[int] = []
    history = DriftHistory(lambda: calls.append(1) or [], step_s=0.01)
    history.start()
    import time

    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    history.close()
    assert calls
