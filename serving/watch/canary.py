"""Canary verdicts: live statistics per adapter version, the comparison of a canary with
production, and the check that promotes or rolls back once the canary has run long enough.

Statistics (per version, the last MAX_EVENTS requests and ratings, each with its wall time):
requests that ended, errors (finish reason "error", or a failure to serve a request that
was routed to the version, e.g. its artifact cannot be loaded), p95 seconds per completion
token (requests that ended with stop or length and produced a token), and mean feedback
score. A comparison counts only what happened since the canary alias was last set.

A canary is judged once it has served >= `canary_min_requests` requests AND
`canary_window_s` seconds have passed since its alias move (adapter settings). Then, over
the same period:

- error rate: canary's - production's <= `canary_max_error_rate_increase` (default 0.02);
  production without requests in the period (a canary at weight 1) counts as rate 0;
- latency: canary's p95 s/token / production's <= `canary_max_latency_ratio` (default 1.5),
  compared when both have latency samples;
- feedback: production's mean score - canary's <= `canary_max_feedback_drop` (default 0.2),
  compared only when both sides have feedback;
- drift: every drift score of the canary version (serving/drift.py) at or below its
  threshold, or at or below production's score on the same signal (a canary no further from
  its baseline than production is from its own is not worse); signals without a canary
  score (too few samples, no baseline) are not compared.

Not worse on every compared criterion -> promoted (production -> the canary's version,
canary alias removed); otherwise rolled back (canary alias removed). A canary that cannot be
loaded at all (e.g. a tampered artifact) is rolled back at once with the load error as the
reason. The verdict is one registry transaction (registry/verdicts.py) that first checks the
canary still points at the judged version, so of several servers judging at once one wins.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np

from registry import Registry
from registry.errors import AliasConflict, LorafleetError, NotFound
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS
from registry.records import AliasRecord
from registry.settings import AdapterSettings, all_settings
from registry.verdicts import Verdict, VerdictRecord, decide_canary
from serving.errors import Overloaded
from serving.metrics import CANARY_VERDICTS
from serving.residency import Residency
from serving.routing import Target

logger = logging.getLogger(__name__)

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


def _unix(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


class CanaryWatch:
    """Judges every canary of the registry about once per `interval_s` on its own thread
    (when `enabled`); `status` gives the live comparison, `decide` a manual verdict."""

    def __init__(
        self,
        registry: Registry,
        stats: CanaryStats,
        residency: Residency,
        drift: DriftScores,
        thresholds: Mapping[str, float],
        *,
        applied: Callable[[], object],
        interval_s: float = 1.0,
        enabled: bool = True,
    ) -> None:
        self.registry, self.stats, self.residency = registry, stats, residency
        self._drift, self.thresholds, self._applied = drift, thresholds, applied
        self.interval_s = interval_s
        self.actor = f"canary-check@{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="canary", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except LorafleetError as err:  # registry busy: try again next round
                logger.warning("canary check failed: %s", err)

    def _canaries(self, adapter: str | None = None) -> list[tuple[AliasRecord, int | None]]:
        """(canary alias, production version) of every adapter with a canary."""
        aliases = self.registry.aliases(adapter)
        production = {a.adapter: a.version for a in aliases if a.alias == DEFAULT_ALIAS}
        return [(a, production.get(a.adapter)) for a in aliases if a.alias == CANARY_ALIAS]

    def compare(
        self, canary: AliasRecord, production: int | None, settings: AdapterSettings
    ) -> Comparison:
        """The live comparison of one canary (reads drift scores: call off the event loop)."""
        start = _unix(canary.updated_at)
        elapsed = time.time() - start
        mine = self.stats.since(canary.adapter, canary.version, start)
        theirs = (
            self.stats.since(canary.adapter, production, start)
            if production is not None
            else VersionStats(0, 0, 0, None, 0, None)
        )
        no_drift: dict[str, float | None] = {}
        criteria = compare_stats(
            mine,
            theirs,
            settings,
            self._drift(canary.adapter, canary.version),
            self._drift(canary.adapter, production) if production is not None else no_drift,
            self.thresholds,
        )
        waiting = []
        if mine.requests < settings.canary_min_requests:
            waiting.append(f"{mine.requests}/{settings.canary_min_requests} requests")
        if elapsed < settings.canary_window_s:
            waiting.append(f"{elapsed:.1f}/{settings.canary_window_s:g} s")
        return Comparison(
            canary.adapter,
            canary.version,
            production,
            canary.updated_at,
            elapsed,
            mine,
            theirs,
            criteria,
            ", ".join(waiting) or None,
        )

    def status(self, adapter: str | None = None) -> list[Comparison]:
        settings = all_settings(self.registry.db)
        return [
            self.compare(alias, production, settings.get(alias.adapter, AdapterSettings()))
            for alias, production in self._canaries(adapter)
        ]

    def check(self) -> list[VerdictRecord]:
        """One round: roll back canaries that cannot be loaded, judge the ready ones."""
        canaries = self._canaries()
        if not canaries:
            return []  # the usual round: one read of the aliases
        settings = all_settings(self.registry.db)
        decided = []
        for alias, production in canaries:
            target = Target(alias.adapter, alias.version)
            try:
                if target.key not in self.residency.resident():
                    self.residency.ensure(target)
            except Overloaded as err:  # no free slot now: not the canary's fault
                logger.warning("canary %s not loaded yet: %s", target.key, err)
                continue
            except LorafleetError as err:
                reason = f"canary {target.key} cannot be loaded: {err}"
                decided.append(self._decide(alias, "rolled_back", reason))
                continue
            chosen = settings.get(alias.adapter, AdapterSettings())
            if self._ready(alias, chosen):  # drift scores are read only then
                comparison = self.compare(alias, production, chosen)
                decided.append(self._decide(alias, comparison.verdict, comparison.reason()))
        done = [d for d in decided if d is not None]
        if done:
            self._applied()
        return done

    def _ready(self, alias: AliasRecord, settings: AdapterSettings) -> bool:
        start = _unix(alias.updated_at)
        if time.time() - start < settings.canary_window_s:
            return False
        served = self.stats.since(alias.adapter, alias.version, start).requests
        return served >= settings.canary_min_requests

    def _decide(self, alias: AliasRecord, verdict: Verdict, reason: str) -> VerdictRecord | None:
        try:
            record = decide_canary(
                self.registry.db,
                alias.adapter,
                verdict,
                actor=self.actor,
                reason=reason,
                version=alias.version,
            )
        except (AliasConflict, NotFound) as err:  # another server or a user decided first
            logger.info(
                "canary verdict on %s@%d not recorded: %s", alias.adapter, alias.version, err
            )
            return None
        CANARY_VERDICTS.labels(alias.adapter, verdict).inc()
        logger.info("canary %s@%d %s: %s", alias.adapter, alias.version, verdict, reason)
        return record

    def decide(
        self, adapter: str, verdict: Verdict, *, actor: str, reason: str
    ) -> tuple[VerdictRecord, Comparison | None]:
        """A manual verdict on `adapter`'s canary; the live comparison joins the reason."""
        found = self._canaries(adapter)
        comparison = None
        if found:
            alias, production = found[0]
            settings = self.registry.settings(adapter)
            comparison = self.compare(alias, production, settings)
        live = f"; live: {comparison.reason()}" if comparison else ""
        record = decide_canary(
            self.registry.db,
            adapter,
            verdict,
            actor=actor,
            reason=f"manual: {reason or 'no reason given'}{live}",
            version=comparison.canary_version if comparison else None,
        )
        CANARY_VERDICTS.labels(adapter, verdict).inc()
        self._applied()
        return record, comparison
