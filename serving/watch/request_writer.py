"""The server's request log writer: finished adapter requests -> the registry's request log
(registry/storage/requestlog.py), appended in batches by a background thread.

`submit` runs on the event loop and only appends to an in-memory list (never SQLite); the
writer thread takes up to BATCH_ROWS rows at least every `interval_s` and appends them in
one transaction; at most every PRUNE_INTERVAL_S (and when closing) it prunes the log to
`max_rows_per_adapter` rows per adapter and `max_age_s` (pruning counts rows per adapter,
a scan of the log: too costly for every batch of a busy server).
A failing write is logged and its rows dropped: the log never fails or slows a request.
When writes fall behind by more than MAX_PENDING rows, new rows are dropped (counted in the
log). `close` writes what is pending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from registry import RequestLog
from registry.errors import LorafleetError
from registry.loop_records import LoggedRequest

logger = logging.getLogger(__name__)

BATCH_ROWS = 256
MAX_PENDING = 50_000
PRUNE_INTERVAL_S = 30.0


class RequestLogWriter:
    """Batches LoggedRequest rows into the request log from its own thread."""

    def __init__(
        self,
        open_log: Callable[[], RequestLog],
        *,
        max_rows_per_adapter: int,
        max_age_s: float,
        interval_s: float = 0.5,
    ) -> None:
        self._open_log = open_log
        self.max_rows_per_adapter = max_rows_per_adapter
        self.max_age_s = max_age_s
        self.interval_s = interval_s
        self.opted_out: frozenset[str] = frozenset()  # adapters whose request_log is false
        self.written = 0
        self.dropped = 0
        self._pruned_at = float("-inf")
        self._pending: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def submit(self, row: LoggedRequest) -> None:
        """Queue one finished request (event loop: no I/O); skipped for opted-out adapters."""
        if row.adapter in self.opted_out:
            return
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append(row)
            full = len(self._pending) >= BATCH_ROWS
        if full:
            self._wake.set()

    def close(self) -> None:
        """Stop the thread after it has written every pending row."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            while self._write_batch():
                pass
            if stopping:
                return

    def _write_batch(self) -> bool:
        """Write up to BATCH_ROWS pending rows; True if more are pending."""
        with self._lock:
            batch, self._pending = self._pending[:BATCH_ROWS], self._pending[BATCH_ROWS:]
            more = bool(self._pending)
        if not batch:
            return False
        try:
            log = self._open_log()
            log.append(batch)
            now = time.monotonic()
            if self._stop.is_set() or now - self._pruned_at >= PRUNE_INTERVAL_S:
                log.prune(max_rows_per_adapter=self.max_rows_per_adapter, max_age_s=self.max_age_s)
                self._pruned_at = now
        except (LorafleetError, OSError) as err:
            self.dropped += len(batch)
            logger.error("request log: %d rows dropped: %s", len(batch), err)
            return more
        self.written += len(batch)
        logger.debug("request log: %d rows written", len(batch))
        return more
