"""The last minutes of traffic and drift, kept in memory for the dashboard (no Prometheus
needed): per adapter version, requests, errors, tokens and latencies in fixed steps, and each
drift signal's score sampled every step.

`Traffic.record` runs on the event loop for each finished request; it only adds to the
current step's bucket. Series are computed when the dashboard asks (a thread), from buckets
of at most `MAX_LATENCIES` latencies each (a uniform reservoir beyond that).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from registry.names import version_model
from serving.watch.drift import Key

logger = logging.getLogger(__name__)
STEP_S = 5.0  # one point per step
WINDOW_S = 900.0  # the last 15 minutes
MAX_LATENCIES = 512  # latencies kept per version and step
SERIES_LIMIT = 8  # versions drawn: the busiest (the table lists every version's last minute)
QUANTILES = (0.5, 0.95, 0.99)


@dataclass
class Bucket:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timed: int = 0  # requests whose latency was offered to the reservoir
    latencies: list[float] = field(default_factory=list)
    quantiles: list[float] | None = None  # p50, p95, p99, once the step has ended


class Traffic:
    """Per version and step: requests, errors, tokens and a latency sample."""

    def __init__(
        self,
        step_s: float = STEP_S,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.step_s, self.steps, self.clock = step_s, int(window_s // step_s), clock
        self._buckets: dict[Key, dict[int, Bucket]] = {}
        self._lock = threading.Lock()
        self._random = random.Random(0)

    def record(
        self,
        adapter: str,
        version: str,
        *,
        seconds: float | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: bool = False,
    ) -> None:
        """One request that ended (`seconds` None: no latency, e.g. refused or cancelled)."""
        step = int(self.clock() // self.step_s)
        with self._lock:
            buckets = self._buckets.setdefault((adapter, version), {})
            bucket = buckets.get(step)
            if bucket is None:
                bucket = buckets[step] = Bucket()
                for old in [s for s in buckets if s <= step - self.steps]:
                    del buckets[old]
            bucket.requests += 1
            bucket.errors += error
            bucket.prompt_tokens += prompt_tokens
            bucket.completion_tokens += completion_tokens
            if seconds is not None:
                bucket.timed += 1
                if len(bucket.latencies) < MAX_LATENCIES:
                    bucket.latencies.append(seconds)
                else:
                    slot = self._random.randrange(bucket.timed)
                    if slot < MAX_LATENCIES:
                        bucket.latencies[slot] = seconds

    def series(
        self, match: Callable[[str], bool] | None = None, limit: int = SERIES_LIMIT
    ) -> dict[str, Any]:
        """Step start times (unix seconds, oldest first); `recent`: the last minute of every
        version with traffic in the window; `versions`: for the `limit` busiest versions
        whose adapter passes `match`, requests/s, error rate, latency p50/p95/p99, prompt
        and completion tokens/s per step (null where a step has no request). The current
        step is divided by its elapsed part."""
        now = self.clock()
        last = int(now // self.step_s)
        first = last - self.steps + 1
        times = [s * self.step_s for s in range(first, last + 1)]
        elapsed = [self.step_s] * (len(times) - 1) + [max(now - last * self.step_s, 1.0)]
        with self._lock:
            for key in [k for k, b in self._buckets.items() if max(b) < first]:
                del self._buckets[key]  # a version without a request in the window
            copied = {
                key: {s: b for s, b in buckets.items() if s >= first}
                for key, buckets in self._buckets.items()
            }
        minute = min(self.steps, max(1, int(60 // self.step_s)))
        recent: dict[str, dict[str, Any]] = {}
        busy: list[tuple[int, Key]] = []
        for (adapter, version), buckets in copied.items():
            if not buckets:
                continue
            model = version_model(adapter, version)
            tail = [
                (buckets.get(s), sec)
                for s, sec in zip(
                    range(last - minute + 1, last + 1), elapsed[-minute:], strict=True
                )
            ]
            recent[model] = _last_minute(tail)
            if match is None or match(adapter):
                busy.append((sum(b.requests for b in buckets.values()), (adapter, version)))
        chosen = sorted(key for _, key in sorted(busy, key=lambda x: -x[0])[:limit])
        versions = []
        for adapter, version in chosen:
            buckets = copied[(adapter, version)]
            rows = [
                (buckets.get(s), s < last, seconds)
                for s, seconds in zip(range(first, last + 1), elapsed, strict=True)
            ]
            versions.append(_version_series(adapter, version, rows))
        return {
            "step_s": self.step_s,
            "times": times,
            "versions": versions,
            "matching": len(busy),
            "recent": recent,
        }


def _quantiles(bucket: Bucket, done: bool) -> list[float] | None:
    """p50, p95 and p99 of a step's latencies; kept once the step has ended (it cannot
    change), so a poll computes only the current step's."""
    if bucket.quantiles is not None:
        return bucket.quantiles
    if not bucket.latencies:
        return None
    values = [round(float(q), 4) for q in np.quantile(bucket.latencies, QUANTILES)]
    if done:
        bucket.quantiles = values
    return values


def _version_series(
    adapter: str, version: str, rows: list[tuple[Bucket | None, bool, float]]
) -> dict[str, Any]:
    def rate(value: Callable[[Bucket], int]) -> list[float]:
        return [round(value(b) / s, 4) if b else 0.0 for b, _, s in rows]

    quantiles = [_quantiles(b, done) if b else None for b, done, _ in rows]
    return {
        "adapter": adapter,
        "version": version,
        "model": version_model(adapter, version),
        "requests_per_s": rate(lambda b: b.requests),
        "error_rate": [round(b.errors / b.requests, 4) if b else None for b, _, _ in rows],
        **{
            name: [q[i] if q else None for q in quantiles]
            for i, name in enumerate(("p50_s", "p95_s", "p99_s"))
        },
        "prompt_tokens_per_s": rate(lambda b: b.prompt_tokens),
        "completion_tokens_per_s": rate(lambda b: b.completion_tokens),
    }


def _last_minute(tail: list[tuple[Bucket | None, float]]) -> dict[str, Any]:
    """The last minute in one figure per measure: what the fleet table shows."""
    recent = [b for b, _ in tail if b]
    seconds = sum(s for _, s in tail)
    requests = sum(b.requests for b in recent)
    latencies = [x for b in recent for x in b.latencies]
    return {
        "requests": requests,
        "requests_per_s": round(requests / seconds, 4),
        "error_rate": round(sum(b.errors for b in recent) / requests, 4) if requests else None,
        "p95_s": round(float(np.quantile(latencies, 0.95)), 4) if latencies else None,
        "completion_tokens_per_s": round(sum(b.completion_tokens for b in recent) / seconds, 4),
    }


class DriftHistory:
    """Each tracked version's drift scores, sampled every `step_s` on a thread of its own
    from `summary` (serving/watch/drift.py `Drift.summary`), for the last `window_s` seconds."""

    def __init__(
        self,
        summary: Callable[[], list[dict[str, Any]]],
        step_s: float = STEP_S,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.summary, self.step_s, self.clock = summary, step_s, clock
        self.window_s = window_s
        self._points: dict[Key, deque[tuple[float, dict[str, float | None]]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift-history", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample(self) -> None:
        now = self.clock()
        rows = self.summary()
        with self._lock:
            for row in rows:
                key = (row["adapter"], str(row["version"]))
                points = self._points.setdefault(
                    key, deque(maxlen=int(self.window_s // self.step_s))
                )
                points.append((now, dict(row["scores"])))
            for key, points in list(self._points.items()):
                while points and points[0][0] < now - self.window_s:
                    points.popleft()
                if not points:
                    del self._points[key]

    def series(self, keys: set[Key] | None = None) -> list[dict[str, Any]]:
        """Per version (those in `keys`, else all): sample times and each signal's scores
        (null: not scored)."""
        with self._lock:
            copied = {
                key: list(points)
                for key, points in self._points.items()
                if keys is None or key in keys
            }
        out = []
        for (adapter, version), points in sorted(copied.items()):
            signals = sorted({name for _, scores in points for name in scores})
            out.append(
                {
                    "adapter": adapter,
                    "version": version,
                    "model": version_model(adapter, version),
                    "times": [round(t, 3) for t, _ in points],
                    "scores": {n: [scores.get(n) for _, scores in points] for n in signals},
                }
            )
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.step_s):
            try:
                self.sample()
            except Exception:  # keep sampling; the traceback is logged
                logger.exception("drift history sample failed")
