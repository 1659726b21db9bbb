"""Canary statistics pooled across the replicas of a shared registry.

Each replica keeps its own samples (canary_stats.py) and also appends those of adapters
that have a canary to the registry's `canary_events` table, in batches from a thread of its
own (`canary-samples`) at least every FLUSH_S. A comparison reads every replica's samples
from there, so the canary's requests on every replica count, and the verdict is decided
once: the registry refuses a second verdict on the same canary (AliasConflict). Replicas'
clocks are compared through the samples' wall times: keep them in sync (NTP).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from registry import Registry
from serving.watch.canary_stats import MAX_EVENTS, CanaryStats, VersionStats

logger = logging.getLogger(__name__)

FLUSH_S = 0.5
KEEP_S = 7 * 86400.0
"""Samples older than this are pruned (far beyond any canary window)."""
PRUNE_EVERY_S = 3600.0


class SharedCanaryStats(CanaryStats):
    """CanaryStats whose comparisons read every replica's samples from the registry.
    `pooled(adapter)` says whether an adapter's samples are pooled now (it has a canary)."""

    def __init__(self, registry: Registry, pooled: Callable[[str], bool]) -> None:
        super().__init__()
        self.registry = registry
        self.pooled = pooled
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._pending: list[tuple[float, str, int, bool | None, float | None, float | None, str]]
        self._pending = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._pruned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="canary-samples", daemon=True)
        self._thread.start()

    def record(
        self, adapter: str, version: int, *, error: bool, seconds_per_token: float | None
    ) -> None:
        super().record(adapter, version, error=error, seconds_per_token=seconds_per_token)
        if self.pooled(adapter):
            with self._pending_lock:
                sample = (time.time(), adapter, version, error, seconds_per_token, None)
                self._pending.append((*sample, self.replica))

    def add_feedback(self, adapter: str, version: int, score: float) -> None:
        super().add_feedback(adapter, version, score)
        if self.pooled(adapter):
            with self._pending_lock:
                self._pending.append(
                    (time.time(), adapter, version, None, None, score, self.replica)
                )

    def since(self, adapter: str, version: int, start: float) -> VersionStats:
        """Every replica's samples of `adapter@version` at or after `start`; this replica's
        own alone when the registry cannot be read (logged)."""
        self.flush()
        try:
            requests, ratings = self.registry.canary_samples_since(
                adapter, version, start, MAX_EVENTS
            )
        except Exception as err:
            logger.warning("pooled canary samples unreadable, using this replica's: %s", err)
            return super().since(adapter, version, start)
        return VersionStats(
            requests=len(requests),
            errors=sum(1 for _, error, _ in requests if error),
            latencies=tuple(s for _, _, s in requests if s is not None),
            scores=tuple(score for _, score in ratings),
        )

    def flush(self) -> None:
        """Append what this replica has not yet pooled; kept for the next try on failure."""
        with self._flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                self.registry.add_canary_samples(batch)
            except Exception as err:  # kept for the next try; the thread must not end
                logger.warning("pooling %d canary samples failed: %s", len(batch), err)
                with self._pending_lock:
                    self._pending = (batch + self._pending)[-MAX_EVENTS:]

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()
            if time.time() - self._pruned_at > PRUNE_EVERY_S:
                self._pruned_at = time.time()
                try:
                    self.registry.prune_canary_samples(time.time() - KEEP_S)
                except Exception as err:
                    logger.warning("pruning pooled canary samples failed: %s", err)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
