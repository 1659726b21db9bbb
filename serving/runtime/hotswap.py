"""Hot-swap: a thread polls the registry revision. On a change it reads the new alias map,
loads every newly targeted version of an adapter in use *before* swapping the map in, and
keeps the old target of an alias whose new version cannot be loaded (e.g. a tampered
artifact). Requests hold the version they were admitted with until they finish.

Pins: `--pin NAME` and the registry's `pinned` setting keep an adapter's production and
canary versions resident; they are loaded at start and after every change.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from registry import Registry
from registry.errors import LorafleetError
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS
from serving.metrics import REGISTRY_REVISION
from serving.runtime.residency import Residency
from serving.runtime.routing import AliasMap, Router, Target
from serving.serve_config import ServeConfig
from serving.watch.request_writer import RequestLogWriter

logger = logging.getLogger(__name__)


class HotSwap:
    def __init__(
        self,
        config: ServeConfig,
        registry: Registry,
        router: Router,
        residency: Residency,
        request_log: RequestLogWriter | None,
    ) -> None:
        self.config, self.registry = config, registry
        self.router, self.residency, self.request_log = router, residency, request_log
        self.pinned_in_registry: frozenset[str] = frozenset()  # adapters with pinned=true
        self.shadow_shares: dict[str, float] = {}  # adapters with a shadow_share > 0
        REGISTRY_REVISION.set(router.map.revision)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._read_settings()
        self._preload_pinned(router.map)
        self._poller = threading.Thread(target=self._poll, name="registry-poller", daemon=True)

    def start(self) -> None:
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller.is_alive():
            self._poller.join(timeout=5)

    @property
    def pinned(self) -> set[str]:
        """Adapters kept resident: `--pin` and the registry's `pinned` setting."""
        return set(self.config.pinned) | self.pinned_in_registry

    def refresh(self) -> bool:
        """Apply the registry's current aliases; True if the map changed."""
        with self._lock:
            if self.registry.revision() == self.router.map.revision:
                return False
            old, new = self.router.map, AliasMap.load(self.registry)
            self._read_settings()
            in_use = {k.split("@")[0] for k in self.residency.resident()} | self.pinned
            for key, target in new.targets().items():
                if old.aliases.get(key, (None, None))[0] == target.version:
                    continue
                if target.adapter not in in_use and key[1] != CANARY_ALIAS:
                    continue  # loaded on first request; a canary is loaded before it routes
                try:
                    self.residency.ensure(target)
                except LorafleetError as err:
                    logger.error("keeping %s:%s on its old version: %s", *key, err)
                    new = new.with_alias(key, old.aliases.get(key))
            self._preload_pinned(new, strict=False)
            self.router.swap(new)
            REGISTRY_REVISION.set(new.revision)
            logger.info("alias map at revision %d", new.revision)
            return True

    def _pinned_targets(self, aliases: AliasMap) -> dict[tuple[str, str], Target]:
        pinned = self.pinned
        return {
            key: target
            for key, target in aliases.targets().items()
            if target.adapter in pinned and key[1] in (DEFAULT_ALIAS, CANARY_ALIAS)
        }

    def _preload_pinned(self, aliases: AliasMap, *, strict: bool = True) -> None:
        """Pin and load the pinned targets. A `--pin` target that fails to load stops the
        server at start (`strict`); otherwise the failure is logged and it stays unpinned."""
        targets = self._pinned_targets(aliases)
        self.residency.pinned = {t.key for t in targets.values()}
        for target in targets.values():
            try:
                self.residency.ensure(target)
            except LorafleetError as err:
                if strict and target.adapter in self.config.pinned:
                    raise
                logger.error("cannot keep %s resident: %s", target.key, err)
                self.residency.pinned.discard(target.key)

    def _poll(self) -> None:
        supervisor = os.getppid()
        while not self._stop.is_set():
            try:  # returns at once when a PostgreSQL registry notifies a change
                self.registry.wait_for_change(self.config.poll_interval_s)
            except LorafleetError as err:  # unreachable: keep serving, try again
                logger.warning("registry change feed failed: %s", err)
                self._stop.wait(self.config.poll_interval_s)
            if self._stop.is_set():
                return
            if os.getppid() != supervisor:
                # BentoML's supervisor gives each worker its own session, so a SIGKILL of the
                # `lorafleet serve` process group would leave this worker serving on alone.
                logger.error("the server's supervisor (pid %d) is gone; stopping", supervisor)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                self.refresh()
            except LorafleetError as err:  # registry busy: keep serving from the old map
                logger.warning("registry poll failed: %s", err)

    def _read_settings(self) -> None:
        """Pinned adapters and those that opted out of the request log (settings bump the
        revision)."""
        settings = self.registry.all_settings()
        self.pinned_in_registry = frozenset(a for a, s in settings.items() if s.pinned)
        self.shadow_shares = {a: s.shadow_share for a, s in settings.items() if s.shadow_share}
        if self.request_log is not None:
            self.request_log.opted_out = frozenset(
                a for a, s in settings.items() if not s.request_log
            )
