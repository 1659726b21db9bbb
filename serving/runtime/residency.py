"""Residency: which adapter versions are loaded in the engine.

An LRU bounded by the engine's slots; pinned keys (the production and canary versions of
pinned adapters, and versions being swapped in) are never evicted. Loading verifies the
artifact's sha256 first, so a file changed on disk is refused and the previous version keeps
serving. An evicted version's slot is freed by the engine once its admitted requests end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from registry import Registry
from serving.engines.seam import Engine
from serving.errors import NoFreeSlot, NotServable, Overloaded
from serving.metrics import ADAPTER_LOAD_SECONDS, ADAPTERS_LOADED, CACHE_EVENTS
from serving.runtime.routing import Target

logger = logging.getLogger(__name__)
SLOT_WAIT_S = 30.0
EVICTION_GAP_S = 0.2


class Residency:
    def __init__(
        self, engine: Engine, engine_name: str, registry: Registry, slot_wait_s: float = SLOT_WAIT_S
    ) -> None:
        self.engine = engine
        self.slot_wait_s = slot_wait_s
        self.labels: dict[str, list[str]] = {}  # key -> a classifier's labels (ever loaded)
        self.engine_name = engine_name
        self.registry = registry
        self.pinned: set[str] = set()
        self.evicted: dict[str, float] = {}  # key -> unix time it left, until loaded again
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}
        self._held: Counter[str] = Counter()  # requests between admission and submit

    def classifier_labels(self, key: str) -> list[str] | None:
        """The labels of a classifier that was loaded (None: a generation adapter)."""
        return self.labels.get(key)

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._lru)

    def loading(self) -> list[str]:
        """Versions being loaded now, or waiting for a slot to load into."""
        with self._lock:
            return sorted(self._loading)

    @contextmanager
    def held(self, key: str) -> Iterator[None]:
        """Keep `key` from being evicted while a request is admitted: from its residency
        check until the engine counts it (submit), another request's miss must not pick it."""
        with self._lock:
            self._held[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]

    def touch(self, key: str) -> bool:
        """Mark `key` used if it is resident (never blocks); False if it must be loaded."""
        with self._lock:
            if key not in self._lru:
                return False
            self._lru.move_to_end(key)
        CACHE_EVENTS.labels("hit").inc()
        return True

    def ensure(self, target: Target) -> None:
        """Make `target` resident (blocking); NotServable / Overloaded if it cannot be."""
        key = target.key
        while True:
            if self.touch(key):
                return
            with self._lock:
                waiting = self._loading.get(key)
                if waiting is None:
                    self._loading[key] = threading.Event()
                    break
            waiting.wait(self.slot_wait_s)
        try:
            CACHE_EVENTS.labels("miss").inc()
            started = time.perf_counter()
            self._load(target)
            ADAPTER_LOAD_SECONDS.observe(time.perf_counter() - started)
            with self._lock:
                self._lru[key] = None
                self.evicted.pop(key, None)
                ADAPTERS_LOADED.set(len(self._lru))
        finally:
            with self._lock:
                self._loading.pop(key).set()

    def _load(self, target: Target) -> None:
        record = self.registry.get_version(target.adapter, target.version)
        why = record.unservable.get(self.engine_name)
        if why:
            raise NotServable(f"{record.ref} cannot be served: {why}")
        if record.rank > self.engine.max_rank:
            raise NotServable(
                f"{record.ref} has rank {record.rank} > max rank {self.engine.max_rank} of this "
                f"server; start it with --max-rank {record.rank}"
            )
        labels = record.metadata.get("labels")
        if labels:
            self.labels[target.key] = list(labels)
        path = self.registry.artifact_path(record)  # verifies sha256
        deadline = time.monotonic() + self.slot_wait_s
        last_eviction = float("-inf")
        while True:
            try:
                self.engine.load_adapter(target.key, path)
                logger.info("loaded %s", target.key)
                return
            except NoFreeSlot:
                now = time.monotonic()
                # An evicted slot frees when its last admitted request ends: give it a
                # moment before evicting another version (a whole second made B5's misses
                # wait 0.38 s on average).
                if now - last_eviction > EVICTION_GAP_S and self._evict_one():
                    last_eviction = now
                elif now > deadline:
                    raise Overloaded(
                        f"no adapter slot frees up for {target.key}: all "
                        f"{self.engine.adapter_slots} are pinned or busy; raise --max-adapters"
                    ) from None
                time.sleep(0.02)

    def _evict_one(self) -> bool:
        with self._lock:
            protected = self.pinned | set(self._loading) | set(self._held)
            for key in self._lru:
                if key not in protected:
                    del self._lru[key]
                    self.evicted[key] = time.time()
                    ADAPTERS_LOADED.set(len(self._lru))
                    break
            else:
                return False
        self.engine.unload_adapter(key)
        CACHE_EVENTS.labels("evict").inc()
        logger.info("evicted %s", key)
        return True

    def unload(self, key: str) -> bool:
        with self._lock:
            if key not in self._lru:
                return False
            del self._lru[key]
            self.evicted[key] = time.time()
            ADAPTERS_LOADED.set(len(self._lru))
        self.engine.unload_adapter(key)
        return True
