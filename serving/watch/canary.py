"""Canary verdicts: the check that promotes or rolls back a canary once it has run long
enough, judged on the comparison of serving/watch/canary_stats.py.

A canary is judged once it has served >= `canary_min_requests` requests AND
`canary_window_s` seconds have passed since its alias move (adapter settings). Not worse on
every compared criterion -> promoted (production -> the canary's version, canary alias
removed); otherwise rolled back (canary alias removed). A canary that cannot be loaded at
all (e.g. a tampered artifact) is rolled back at once with the load error as the reason.
The verdict is one registry transaction (registry/storage/verdicts.py) that first checks the
canary still points at the judged version, so of several servers judging at once one wins.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from registry import Registry
from registry.errors import AliasConflict, LorafleetError, NotFound
from registry.loop_records import AdapterSettings, Verdict, VerdictRecord
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS
from registry.records import AliasRecord
from serving.errors import Overloaded
from serving.metrics import CANARY_VERDICTS
from serving.watch.canary_stats import (
    CanaryStats,
    Comparison,
    DriftScores,
    VersionStats,
    compare_stats,
)

logger = logging.getLogger(__name__)
# Makes NAME@VERSION resident unless it is (blocks; Overloaded while no slot is free).
LoadVersion = Callable[[str, int], None]


def _unix(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


class CanaryWatch:
    """Judges every canary of the registry about once per `interval_s` on its own thread
    (when `enabled`); `status` gives the live comparison, `decide` a manual verdict."""

    def __init__(
        self,
        registry: Registry,
        stats: CanaryStats,
        load: LoadVersion,
        drift: DriftScores,
        thresholds: Mapping[str, float],
        *,
        applied: Callable[[], object],
        interval_s: float = 1.0,
        enabled: bool = True,
    ) -> None:
        self.registry, self.stats, self._load = registry, stats, load
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
        settings = self.registry.all_settings()
        return [
            self.compare(alias, production, settings.get(alias.adapter, AdapterSettings()))
            for alias, production in self._canaries(adapter)
        ]

    def check(self) -> list[VerdictRecord]:
        """One round: roll back canaries that cannot be loaded, judge the ready ones."""
        canaries = self._canaries()
        if not canaries:
            return []  # the usual round: one read of the aliases
        settings = self.registry.all_settings()
        decided = []
        for alias, production in canaries:
            key = f"{alias.adapter}@{alias.version}"
            try:
                self._load(alias.adapter, alias.version)
            except Overloaded as err:  # no free slot now: not the canary's fault
                logger.warning("canary %s not loaded yet: %s", key, err)
                continue
            except LorafleetError as err:
                reason = f"canary {key} cannot be loaded: {err}"
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
            record = self.registry.decide_canary(
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
        record = self.registry.decide_canary(
            adapter,
            verdict,
            actor=actor,
            reason=f"manual: {reason or 'no reason given'}{live}",
            version=comparison.canary_version if comparison else None,
        )
        CANARY_VERDICTS.labels(adapter, verdict).inc()
        self._applied()
        return record, comparison
