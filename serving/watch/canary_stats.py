"""Canary statistics: the live samples of every adapter version the server serves, and the
comparison of a canary with production over the same period. The criteria that read a
comparison (statistical tests) are in serving/watch/canary_criteria.py; the check that acts
on it is serving/watch/canary.py.

Per version, the last MAX_EVENTS requests and ratings are kept, each with its wall time:
requests that ended, errors (finish reason "error", or a failure to serve a request that
was routed to the version, e.g. its artifact cannot be loaded), seconds per completion
token (requests that ended with stop or length and produced a token) and feedback scores.
A comparison counts only what happened since the canary alias was last set.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

MAX_EVENTS = 5000
"""Requests and ratings kept per version (the oldest leave first)."""
MAX_VERSIONS = 64
"""Versions tracked at once; the least recently used one is dropped."""
State = Literal["pass", "fail", "inconclusive", "skipped"]
Decision = Literal["promoted", "rolled_back", "inconclusive"]


@dataclass(frozen=True)
class VersionStats:
    """One version's live samples over a period."""

    requests: int
    errors: int
    latencies: tuple[float, ...] = ()  # seconds per completion token, oldest first
    scores: tuple[float, ...] = ()  # feedback scores in [-1, 1]

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def median_s_per_token(self) -> float | None:
        return float(np.median(self.latencies)) if self.latencies else None

    @property
    def p95_s_per_token(self) -> float | None:
        return float(np.percentile(self.latencies, 95)) if self.latencies else None

    @property
    def mean_feedback(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "latency_samples": len(self.latencies),
            "median_s_per_token": self.median_s_per_token,
            "p95_s_per_token": self.p95_s_per_token,
            "ratings": len(self.scores),
            "mean_feedback": self.mean_feedback,
        }


@dataclass
class _Events:
    # (wall time, error, seconds per completion token or None)
    requests: deque[tuple[float, bool, float | None]]
    feedback: deque[tuple[float, float]]  # (wall time, score)


class CanaryStats:
    """Live samples of the versions the server serves; `record` and `add_feedback` run on
    the event loop and only append under a lock."""

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

    def close(self) -> None:
        """Nothing to end here (the shared kind, canary_shared.py, stops its thread)."""

    def since(self, adapter: str, version: int, start: float) -> VersionStats:
        """Samples of `adapter@version` over what happened at or after `start` (unix s)."""
        with self._lock:
            events = self._versions.get((adapter, version))
            requests = [r for r in events.requests if r[0] >= start] if events else []
            scores = tuple(s for at, s in events.feedback if at >= start) if events else ()
        return VersionStats(
            requests=len(requests),
            errors=sum(1 for r in requests if r[1]),
            latencies=tuple(r[2] for r in requests if r[2] is not None),
            scores=scores,
        )


@dataclass(frozen=True)
class Criterion:
    """One criterion of a verdict: its state, the test behind it and the numbers it read."""

    name: str
    state: State
    text: str  # the numbers, the limit and the state, for the history's reason
    test: str | None = None  # e.g. "Mann-Whitney U, one-sided"
    statistic: float | None = None
    p_value: float | None = None  # of "worse than production" (fail needs it below alpha)
    p_within: float | None = None  # of "within the tolerance" (pass needs it below alpha)
    alpha: float | None = None  # this criterion's share of canary_alpha
    effect: float | None = None  # how much worse the canary looks (see `limit`)
    limit: float | None = None  # the tolerance on `effect`
    n: tuple[int, int] = (0, 0)  # samples (canary, production)
    meta: dict[str, Any] = field(default_factory=dict)  # per criterion: e.g. the scores

    @property
    def passed(self) -> bool | None:
        return {"pass": True, "fail": False}.get(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n": list(self.n), "passed": self.passed}


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
    waiting: str | None  # why it is not judged yet (None: ready)
    alpha: float = 0.025  # the false-alarm rate this look spends (split over the criteria)
    look: int = 0  # at canary_min_requests x 2^look requests

    @property
    def verdict(self) -> Decision:
        """rolled_back if any criterion failed, promoted if every tested one passed, else
        inconclusive (keep collecting)."""
        states = {c.state for c in self.criteria}
        if "fail" in states:
            return "rolled_back"
        return "inconclusive" if "inconclusive" in states else "promoted"

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
            "alpha": self.alpha,
            "look": self.look,
            "criteria": [c.to_dict() for c in self.criteria],
            "ready": self.waiting is None,
            "waiting": self.waiting,
            "verdict": self.verdict,
            "reason": self.reason(),
        }
