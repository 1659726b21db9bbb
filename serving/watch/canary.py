"""Canary verdicts: the check that promotes or rolls back a canary once it has run long
enough, judged by the statistical criteria of serving/watch/canary_criteria.py.

A canary is judged once it has served >= `canary_min_requests` requests AND
`canary_window_s` seconds have passed since its alias move (adapter settings), or at
`canary_max_window_s` whatever it served. A criterion
that fails -> rolled back (canary alias removed); every tested criterion passes -> promoted
(production -> the canary's version, canary alias removed); otherwise the verdict is
inconclusive and the canary keeps collecting until `canary_max_window_s`, when
`canary_inconclusive` applies: `hold` (a `canary.held` event; it keeps its traffic and is
no longer judged: a person decides) or `rollback`. A canary that cannot be loaded at all
(e.g. a tampered artifact) is rolled back at once with the load error as the reason.
The verdict is one registry transaction (registry/storage/verdicts.py) that first checks the
canary still points at the judged version, so of several servers judging at once one wins.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime

from registry import Registry
from registry.errors import AliasConflict, LorafleetError, NotFound
from registry.loop_records import AdapterSettings, Verdict, VerdictRecord
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS
from registry.records import AliasRecord
from serving.errors import Overloaded
from serving.metrics import CANARY_VERDICTS
from serving.watch.canary_criteria import (
    DriftInput,
    ShadowPairs,
    compare_stats,
    look_alpha,
    look_of,
)
from serving.watch.canary_stats import CanaryStats, Comparison, VersionStats
from serving.watch.drift_signals import DriftSettings, DriftWindow

logger = logging.getLogger(__name__)
# Makes NAME@VERSION resident unless it is (blocks; Overloaded while no slot is free).
LoadVersion = Callable[[str, int], None]
# (adapter, version, since unix s) -> that version's drift samples over the period.
DriftSince = Callable[[str, int, float], DriftWindow]
# (adapter, canary version, since unix s) -> the shadow comparison over the period.
ShadowSince = Callable[[str, int, float], ShadowPairs | None]


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
        drift: DriftSince | None,
        drift_settings: DriftSettings,
        *,
        applied: Callable[[], object],
        shadow: ShadowSince | None = None,
        interval_s: float = 1.0,
        enabled: bool = True,
    ) -> None:
        self.registry, self.stats, self._load = registry, stats, load
        self._drift, self.drift_settings, self._applied = drift, drift_settings, applied
        self._shadow = shadow
        # per canary (adapter, version, alias move): the last look taken; those held
        self._looks: dict[tuple[str, int, str], int] = {}
        self._held: set[tuple[str, int, str]] = set()
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
            except Exception:  # anything else: logged, and the next round tries again
                logger.exception("canary check failed")

    def _canaries(self, adapter: str | None = None) -> list[tuple[AliasRecord, int | None]]:
        """(canary alias, production version) of every adapter with a canary."""
        aliases = self.registry.aliases(adapter)
        production = {a.adapter: a.version for a in aliases if a.alias == DEFAULT_ALIAS}
        return [(a, production.get(a.adapter)) for a in aliases if a.alias == CANARY_ALIAS]

    def compare(
        self,
        canary: AliasRecord,
        production: int | None,
        settings: AdapterSettings,
        look: int | None = None,
    ) -> Comparison:
        """The live comparison of one canary at look `look` (default: the look its requests
        reached); reads drift windows: call off the event loop."""
        start = _unix(canary.updated_at)
        elapsed = time.time() - start
        mine = self.stats.since(canary.adapter, canary.version, start)
        theirs = (
            self.stats.since(canary.adapter, production, start)
            if production is not None
            else VersionStats(0, 0)
        )
        drift = None
        if self._drift is not None:
            drift = DriftInput(
                self._drift(canary.adapter, canary.version, start),
                self._drift(canary.adapter, production, start) if production is not None else None,
                self.drift_settings,
            )
        shadow = self._shadow(canary.adapter, canary.version, start) if self._shadow else None
        if look is None:
            look = look_of(mine.requests, settings.canary_min_requests) or 0
        criteria = compare_stats(mine, theirs, settings, drift, shadow, look=look)
        waiting = []
        if mine.requests < settings.canary_min_requests:
            waiting.append(f"{mine.requests}/{settings.canary_min_requests} requests")
        if elapsed < settings.canary_window_s:
            waiting.append(f"{elapsed:.1f}/{settings.canary_window_s:g} s")
        if (canary.adapter, canary.version, canary.updated_at) in self._held:
            waiting.append("held for a manual verdict")
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
            look_alpha(settings.canary_alpha, look),
            look,
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
            if self._ready(alias, chosen):  # drift windows are read only then
                decided.append(self._judge(alias, production, chosen))
        done = [d for d in decided if d is not None]
        if done:
            self._applied()
        return done

    def _ready(self, alias: AliasRecord, settings: AdapterSettings) -> bool:
        """Judged now: its window has passed and it has its requests, or its max window has
        passed whatever it served (then canary_inconclusive applies unless it is decided)."""
        if (alias.adapter, alias.version, alias.updated_at) in self._held:
            return False
        elapsed = time.time() - _unix(alias.updated_at)
        if elapsed < settings.canary_window_s:
            return False
        if elapsed >= max(settings.canary_max_window_s, settings.canary_window_s):
            return True
        served = self.stats.since(alias.adapter, alias.version, _unix(alias.updated_at))
        return served.requests >= settings.canary_min_requests

    def _judge(
        self, alias: AliasRecord, production: int | None, settings: AdapterSettings
    ) -> VerdictRecord | None:
        """Look at a ready canary when its requests reach the next look (canary_min_requests
        x 2^i): decide it, or keep collecting; past canary_max_window_s one last look, and
        canary_inconclusive if that is inconclusive too."""
        key = (alias.adapter, alias.version, alias.updated_at)
        start = _unix(alias.updated_at)
        served = self.stats.since(alias.adapter, alias.version, start).requests
        expired = time.time() - start >= max(settings.canary_max_window_s, settings.canary_window_s)
        last = self._looks.get(key, -1)
        look = last + 1 if expired else look_of(served, settings.canary_min_requests)
        if look is None or look <= last:
            return None  # no new look yet
        self._looks[key] = look
        comparison = self.compare(alias, production, settings, look)
        verdict = comparison.verdict
        if verdict != "inconclusive":
            return self._decide(alias, verdict, comparison.reason())
        if not expired:
            return None  # keep collecting
        reason = f"inconclusive after {comparison.elapsed_s:.0f} s: {comparison.reason()}"
        if settings.canary_inconclusive == "rollback":
            return self._decide(alias, "rolled_back", reason)
        self._held.add(key)
        if self.registry.hold_canary(alias.adapter, alias.version, actor=self.actor, reason=reason):
            CANARY_VERDICTS.labels(alias.adapter, "held").inc()
            logger.info("canary %s@%d held: %s", alias.adapter, alias.version, reason)
        return None

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
