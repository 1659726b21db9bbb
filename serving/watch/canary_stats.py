"""Canary statistics: live counts per adapter version and the comparison of a canary with
production over the same period (the criteria below). The check that acts on a comparison
is serving/watch/canary.py.

Statistics (per version, the last MAX_EVENTS requests and ratings, each with its wall time):
requests that ended, errors (finish reason "error", or a failure to serve a request that
was routed to the version, e.g. its artifact cannot be loaded), p95 seconds per completion
token (requests that ended with stop or length and produced a token), and mean feedback
score. A comparison counts only what happened since the canary alias was last set.

The criteria, over the period since the canary alias was set:

- error rate: canary's - production's <= `canary_max_error_rate_increase` (default 0.02);
  production without requests in the period (a canary at weight 1) counts as rate 0;
- latency: canary's p95 s/token / production's <= `canary_max_latency_ratio` (default 1.5),
  compared when both have latency samples;
- feedback: production's mean score - canary's <= `canary_max_feedback_drop` (default 0.2),
  compared only when both sides have feedback;
- drift: every drift score of the canary version (serving/watch/drift.py) at or below its
  threshold, or at or below production's score on the same signal (a canary no further from
  its baseline than production is from its own is not worse); signals without a canary
  score (too few samples, no baseline) are not compared.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from registry.loop_records import AdapterSettings, Verdict

MAX_EVENTS = 5000
"""Requests and ratings kept per version (the oldest leave first)."""
MAX_VERSIONS = 64
"""Versions tracked at once; the least recently used one is dropped."""
DriftScores = Callable[[str, int], Mapping[str, float | None]]


@dataclass(frozen=True)
class VersionStats:
    """One version's live statistics over a period."""

    requests: int
    errors: int
    latency_samples: int
    p95_s_per_token: float | None
    ratings: int
    mean_feedback: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": self.error_rate}


@dataclass
class _Events:
    # (wall time, error, seconds per completion token or None)
    requests: deque[tuple[float, bool, float | None]]
    feedback: deque[tuple[float, float]]  # (wall time, score)


class CanaryStats:
    """Live statistics of the versions the server serves; `record` and `add_feedback` run
    on the event loop and only append under a lock."""

    def __init__(self) -> None:
        self._versions: OrderedDict[tuple[str, int], _Events] = OrderedDict()
        self._lock = threading.Lock()

    def _events(self, key: tuple[str, int]) -> _Events:
        events = self._versions.get(key)
        if events is None:
            events = self._versions[key] = _Events(
                deque(maxlen=MAX_EVENTS), deque(maxlen=MAX_EVENTS)
            )
            if len(self._versions) > MAX_VERSIONS:
                self._versions.popitem(last=False)
        else:
            self._versions.move_to_end(key)
        return events

    def record(
        self, adapter: str, version: int, *, error: bool, seconds_per_token: float | None
    ) -> None:
        """One request routed to `adapter@version` ended (or failed to be served)."""
        with self._lock:
            self._events((adapter, version)).requests.append(
                (time.time(), error, seconds_per_token)
            )

    def add_feedback(self, adapter: str, version: int, score: float) -> None:
        with self._lock:
            self._events((adapter, version)).feedback.append((time.time(), score))

    def since(self, adapter: str, version: int, start: float) -> VersionStats:
        """Statistics of `adapter@version` over what happened at or after `start` (unix s)."""
        with self._lock:
            events = self._versions.get((adapter, version))
            requests = [r for r in events.requests if r[0] >= start] if events else []
            scores = [s for at, s in events.feedback if at >= start] if events else []
        latencies = [r[2] for r in requests if r[2] is not None]
        return VersionStats(
            requests=len(requests),
            errors=sum(1 for r in requests if r[1]),
            latency_samples=len(latencies),
            p95_s_per_token=float(np.percentile(latencies, 95)) if latencies else None,
            ratings=len(scores),
            mean_feedback=float(np.mean(scores)) if scores else None,
        )


@dataclass(frozen=True)
class Criterion:
    """One comparison of canary and production; `passed` None: not compared."""

    name: str
    passed: bool | None
    text: str


@dataclass(frozen=True)
class Comparison:
    """A canary against production since the canary's alias move."""

    adapter: str
    canary_version: int
    production_version: int | None
    since: str  # the canary alias move (ISO time)
    elapsed_s: float
    canary: VersionStats
    production: VersionStats
    criteria: list[Criterion]
    waiting: str | None  # why no verdict yet (None: ready)

    @property
    def verdict(self) -> Verdict:
        return "rolled_back" if any(c.passed is False for c in self.criteria) else "promoted"

    def reason(self) -> str:
        return "; ".join(c.text for c in self.criteria)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "canary_version": self.canary_version,
            "production_version": self.production_version,
            "since": self.since,
            "elapsed_s": round(self.elapsed_s, 3),
            "canary": self.canary.to_dict(),
            "production": self.production.to_dict(),
            "criteria": [asdict(c) for c in self.criteria],
            "ready": self.waiting is None,
            "waiting": self.waiting,
            "verdict": self.verdict,
            "reason": self.reason(),
        }


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_stats(
    canary: VersionStats,
    production: VersionStats,
    settings: AdapterSettings,
    drift: Mapping[str, float | None],
    production_drift: Mapping[str, float | None],
    thresholds: Mapping[str, float],
) -> list[Criterion]:
    """Every criterion of the verdict, each text naming both numbers and the limit."""
    out = []
    c_rate, p_rate = canary.error_rate or 0.0, production.error_rate or 0.0
    limit = settings.canary_max_error_rate_increase
    out.append(
        Criterion(
            "error_rate",
            c_rate - p_rate <= limit + 1e-12,
            f"error rate canary {c_rate:.3f} ({canary.errors}/{canary.requests}) vs production "
            f"{p_rate:.3f} ({production.errors}/{production.requests}): increase "
            f"{c_rate - p_rate:.3f} {'<=' if c_rate - p_rate <= limit + 1e-12 else '>'} {limit:g}",
        )
    )
    c_lat, p_lat = canary.p95_s_per_token, production.p95_s_per_token
    limit = settings.canary_max_latency_ratio
    if c_lat is None or p_lat is None or p_lat <= 0:
        out.append(
            Criterion(
                "latency",
                None,
                f"p95 s/token canary {_num(c_lat, 4)} vs production {_num(p_lat, 4)}: not "
                "compared (no latency samples on one side)",
            )
        )
    else:
        ratio = c_lat / p_lat
        out.append(
            Criterion(
                "latency",
                ratio <= limit,
                f"p95 s/token canary {c_lat:.4f} vs production {p_lat:.4f}: ratio {ratio:.2f} "
                f"{'<=' if ratio <= limit else '>'} {limit:g}",
            )
        )
    out.append(_feedback(canary, production, settings.canary_max_feedback_drop))
    out += _drift(drift, production_drift, thresholds)
    return out


def _feedback(canary: VersionStats, production: VersionStats, limit: float) -> Criterion:
    c, p = canary.mean_feedback, production.mean_feedback
    counts = f"({canary.ratings} vs {production.ratings} ratings)"
    if c is None or p is None:
        return Criterion(
            "feedback",
            None,
            f"mean feedback canary {_num(c)} vs production {_num(p)} {counts}: not compared "
            "(needs feedback on both sides)",
        )
    drop = p - c
    ok = drop <= limit + 1e-12
    return Criterion(
        "feedback",
        ok,
        f"mean feedback canary {c:.3f} vs production {p:.3f} {counts}: drop {drop:.3f} "
        f"{'<=' if ok else '>'} {limit:g}",
    )


def _drift(
    drift: Mapping[str, float | None],
    production: Mapping[str, float | None],
    thresholds: Mapping[str, float],
) -> list[Criterion]:
    out = []
    for signal, threshold in thresholds.items():
        score, other = drift.get(signal), production.get(signal)
        if score is None:
            out.append(
                Criterion(
                    f"drift.{signal}",
                    None,
                    f"drift {signal} canary n/a (production {_num(other)}): not compared "
                    "(too few samples or no baseline)",
                )
            )
            continue
        # Not worse: below the threshold, or no further from its own baseline than production
        # is from its baseline on the same traffic (a retrained canary that still drifts a
        # little on the traffic that made production drift is an improvement).
        limit = threshold if other is None else max(threshold, other)
        ok = score <= limit
        out.append(
            Criterion(
                f"drift.{signal}",
                ok,
                f"drift {signal} canary {score:.3f} {'<=' if ok else '>'} "
                f"{'threshold' if limit == threshold else 'production'} {limit:.3g} "
                f"(threshold {threshold:g}, production {_num(other)})",
            )
        )
    return out
