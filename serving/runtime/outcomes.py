"""What happens to every request that was admitted: counted in flight while it runs, and
once it ends, fanned out to the metrics, the dashboard's traffic, the canary statistics,
the drift windows, the request log and the recent responses (feedback's lookup).

One place does this accounting for both ends a request can have: its output was read to
the end (or cut by its client) through `Server.deltas`, or no one ever began to read it
(`Server.abandon`, the client left before the response started).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from registry import RequestLog
from registry.errors import NotFound
from registry.loop_records import LoggedRequest
from serving.metrics import (
    CLASSIFICATIONS,
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    QUEUE_DEPTH,
    REQUEST_SECONDS,
    REQUESTS,
    TOP_PROBABILITY,
)
from serving.runtime.generation import RESPONSE_PREFIXES, Generation, request_id_of
from serving.watch.canary_stats import CanaryStats
from serving.watch.drift import Drift
from serving.watch.request_writer import RequestLogWriter
from serving.watch.samples import Traffic

RECENT_RESPONSES = 10_000


class RecentResponses:
    """The last RECENT_RESPONSES finished requests by id, so feedback on a response can name
    the version that served it, its prompt and its output."""

    def __init__(self, size: int = RECENT_RESPONSES) -> None:
        self.size = size
        self._by_id: OrderedDict[str, Generation] = OrderedDict()

    def remember(self, generation: Generation) -> None:
        self._by_id[generation.id] = generation
        while len(self._by_id) > self.size:
            self._by_id.popitem(last=False)

    def get(self, response_id: str) -> Generation:
        """The response with this id (chatcmpl-ID, cmpl-ID or ID); NotFound if too old."""
        found = self._by_id.get(request_id_of(response_id))
        if found is None:
            raise NotFound(
                f"unknown response id {response_id!r}; feedback is taken for the last "
                f"{self.size} responses of this server"
            )
        return found


@dataclass(frozen=True)
class Answered:
    """What feedback on a response records: the version that served it, its prompt and
    output, and its metric labels."""

    adapter: str | None
    version: int | None
    prompt: str
    output: str
    labels: tuple[str, str]


SHARED_LOG_WAIT_S = 2.0
"""How long feedback waits for another replica's request log to hold a response (its
writer appends at least every 0.5 s)."""


def answered(recent: RecentResponses, response_id: str, shared_log: RequestLog | None) -> Answered:
    """The response `response_id` from this server's recent ones, else (a registry shared by
    replicas) from the shared request log, waiting up to SHARED_LOG_WAIT_S for the replica
    that served it to append it. NotFound if neither has it."""
    try:
        generation = recent.get(response_id)
    except NotFound:
        if shared_log is None:
            raise
        request_id = request_id_of(response_id)
        ids = [response_id, *(prefix + request_id for prefix in RESPONSE_PREFIXES)]
        deadline = time.monotonic() + SHARED_LOG_WAIT_S
        while True:
            for candidate in dict.fromkeys(ids):
                if (logged := shared_log.find(candidate)) is not None:
                    labels = (logged.adapter, str(logged.version))
                    return Answered(
                        logged.adapter, logged.version, logged.prompt, logged.output, labels
                    )
            if time.monotonic() > deadline:
                raise NotFound(
                    f"unknown response id {response_id!r}; feedback is taken for the last "
                    f"{recent.size} responses of each server and for every response in the "
                    f"shared request log ({shared_log.location})"
                ) from None
            time.sleep(0.2)
    target = generation.target
    return Answered(
        target.adapter if target else None,
        target.version if target else None,
        generation.prompt,
        generation.text,
        generation.labels,
    )


class Outcomes:
    def __init__(
        self,
        *,
        traffic: Traffic,
        canary_stats: CanaryStats,
        drift: Drift,
        request_log: RequestLogWriter | None,
    ) -> None:
        self.traffic, self.canary_stats, self.drift = traffic, canary_stats, drift
        self.request_log = request_log
        self.recent = RecentResponses()
        self.in_flight = 0

    def admitted(self, generation: Generation) -> None:
        self.in_flight += 1
        QUEUE_DEPTH.set(self.in_flight)
        PROMPT_TOKENS.labels(*generation.labels).inc(generation.prompt_tokens)

    def refused(self, adapter: str, version: int) -> None:
        """A version failed to take a request before it was admitted (it could not load)."""
        self.canary_stats.record(adapter, version, error=True, seconds_per_token=None)
        self.traffic.record(adapter, str(version), seconds=None, error=True)

    def finished(self, generation: Generation, seconds: float | None) -> None:
        """Account for a request that ended with `generation.finish_reason`; `seconds` since
        its output began to be read, None if no one read it (its text is then empty)."""
        self.in_flight -= 1
        QUEUE_DEPTH.set(self.in_flight)
        adapter, version = generation.labels
        finish, tokens = generation.finish_reason, generation.completion_tokens
        status = {"stop": "ok", "length": "ok"}.get(finish or "", finish or "error")
        REQUESTS.labels(adapter, version, status).inc()
        if seconds is None:  # abandoned before its output was read
            self.traffic.record(
                adapter, version, seconds=None, prompt_tokens=generation.prompt_tokens
            )
            return
        REQUEST_SECONDS.labels(adapter, version).observe(seconds)
        COMPLETION_TOKENS.labels(adapter, version).inc(tokens)
        self.traffic.record(
            adapter,
            version,
            seconds=seconds if status == "ok" else None,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=tokens,
            error=status == "error",
        )
        if finish in ("stop", "length"):
            length = finish == "length"
            # The baseline counts a training completion's tokens with its eos; a completion
            # that ended by itself ended with one too (never sent to the client).
            completion = tokens + (0 if length else 1)
            self.drift.record(adapter, version, generation.prompt_ids, completion, length)
        generation.prompt_ids = []  # recent responses keep no token ids
        self._adapter_finished(generation, seconds)
        self.recent.remember(generation)

    def classified(
        self, generation: Generation, seconds: float | None, label: int, probability: float
    ) -> None:
        """Account for one classified text (`generation.text` is its predicted label;
        `seconds` None: it failed). Its canary latency is seconds per prompt token."""
        adapter, version = generation.labels
        PROMPT_TOKENS.labels(adapter, version).inc(generation.prompt_tokens)
        REQUESTS.labels(adapter, version, "ok" if seconds is not None else "error").inc()
        target = generation.target
        assert target is not None, "only adapters classify"
        if seconds is None:
            self.canary_stats.record(
                target.adapter, target.version, error=True, seconds_per_token=None
            )
            self.traffic.record(adapter, version, seconds=None, error=True)
            return
        REQUEST_SECONDS.labels(adapter, version).observe(seconds)
        CLASSIFICATIONS.labels(adapter, version, generation.text).inc()
        TOP_PROBABILITY.labels(adapter, version).observe(probability)
        self.traffic.record(
            adapter, version, seconds=seconds, prompt_tokens=generation.prompt_tokens
        )
        self.drift.record_classified(adapter, version, generation.prompt_ids, label, probability)
        generation.prompt_ids = []
        per_token = seconds / max(generation.prompt_tokens, 1)
        self.canary_stats.record(
            target.adapter, target.version, error=False, seconds_per_token=per_token
        )
        self._log(generation, "stop")
        self.recent.remember(generation)

    def _adapter_finished(self, generation: Generation, seconds: float) -> None:
        """Canary statistics and the request log of an adapter request that ended."""
        target = generation.target
        if target is None:
            return
        finish, tokens = generation.finish_reason, generation.completion_tokens
        per_token = seconds / tokens if tokens and finish in ("stop", "length") else None
        self.canary_stats.record(
            target.adapter, target.version, error=finish == "error", seconds_per_token=per_token
        )
        self._log(generation, finish)

    def _log(self, generation: Generation, finish: str | None) -> None:
        target = generation.target
        if self.request_log is None or target is None:
            return
        self.request_log.submit(
            LoggedRequest(
                response_id=generation.response_id,
                adapter=target.adapter,
                version=target.version,
                model=generation.model,
                prompt=generation.prompt,
                output=generation.text,
                finish_reason=finish,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                at=time.time(),
            )
        )
