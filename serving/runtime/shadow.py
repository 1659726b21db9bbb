"""Shadow comparison: while an adapter has a canary, a share of the requests production
serves (the adapter's `shadow_share` setting) is run again on the canary, off the request
path, and the two outputs are compared; the canary's verdict reads the agreement as one
more criterion (serving/watch/canary_criteria.py).

What is shadowed: a production request of an adapter with a canary that ended by itself or
at max_tokens, sampled greedily (temperature 0, no grammar), so that the same version would
give the same output again and a difference is the canary's. The canary's run uses the same
prompt ids, max_tokens and stop strings, greedily; its answer is never returned to anyone,
and it counts in no metric of the canary's traffic, no drift window and no request log.

Cost bound: at most MAX_IN_FLIGHT shadow runs per server at a time (a request offered while
one runs is counted as "busy" and not shadowed), each no longer than the production
request it repeats; a canary that is not resident is not loaded for it.

Per canary version the last MAX_PAIRS comparisons are kept, each with its wall time:
whether the outputs agreed (exact match after whitespace normalization) and their token F1
(the completion task metric of tuning/evaluation.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping

from registry.errors import LorafleetError
from registry.scoring import exact_match, token_f1
from serving.metrics import SHADOW_REQUESTS
from serving.runtime.generation import Generation
from serving.runtime.routing import Target
from serving.watch.canary_criteria import ShadowPairs

logger = logging.getLogger(__name__)
MAX_IN_FLIGHT = 1
MAX_PAIRS = 5000
MAX_VERSIONS = 64
# (canary target, prompt ids, the production request) -> the canary's output text.
RunOnCanary = Callable[[Target, list[int], Generation], Awaitable[str]]


def shadowable(generation: Generation) -> bool:
    """A production request whose output the same version would give again: it generated
    tokens and ended by itself or at max_tokens, greedily, without a grammar."""
    params = generation.ask.params
    return (
        generation.finish_reason in ("stop", "length")
        and generation.completion_tokens > 0
        and params.temperature == 0
        and params.structured is None
        and params.prompt_logprobs is None  # a prompt scored, not a completion
    )


class Shadow:
    """The shadow runs of one server and their comparisons; `offer` runs on the event loop,
    `since` on any thread."""

    def __init__(
        self,
        run: RunOnCanary,
        shares: Callable[[], Mapping[str, float]],
        pair_of: Callable[[str], tuple[int, Target] | None],
    ) -> None:
        self._run, self._shares, self._pair_of = run, shares, pair_of
        self._rng = random.Random()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pairs: OrderedDict[tuple[str, int], deque[tuple[float, bool, float]]] = OrderedDict()
        self._lock = threading.Lock()

    def offer(self, generation: Generation, prompt_ids: list[int]) -> None:
        """Maybe shadow a request that production served and that just ended."""
        target = generation.target
        if target is None:
            return
        share = self._shares().get(target.adapter, 0.0)
        if share <= 0 or not shadowable(generation):
            return
        pair = self._pair_of(target.adapter)
        if pair is None or pair[0] != target.version:
            return  # no canary, or this request was not production's
        canary = pair[1]
        if self._rng.random() >= share:
            return
        if self._in_flight >= MAX_IN_FLIGHT:
            SHADOW_REQUESTS.labels(target.adapter, "busy").inc()
            return
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._compare(canary, list(prompt_ids), generation)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, canary: Target, prompt_ids: list[int], production: Generation) -> None:
        try:
            text = await self._run(canary, prompt_ids, production)
        except LorafleetError as err:  # e.g. the canary left the resident set meanwhile
            SHADOW_REQUESTS.labels(canary.adapter, "failed").inc()
            logger.info("shadow run on %s not compared: %s", canary.key, err)
            return
        finally:
            self._in_flight -= 1
        agreed = exact_match(text, production.text) == 1.0
        f1 = token_f1(text, production.text)
        self.add(canary.adapter, canary.version, agreed, f1)
        SHADOW_REQUESTS.labels(canary.adapter, "compared").inc()

    def add(self, adapter: str, version: int, agreed: bool, f1: float) -> None:
        """One comparison of `adapter@version` (the canary) with production."""
        key = (adapter, version)
        with self._lock:
            pairs = self._pairs.get(key)
            if pairs is None:
                pairs = self._pairs[key] = deque(maxlen=MAX_PAIRS)
                if len(self._pairs) > MAX_VERSIONS:
                    self._pairs.popitem(last=False)
            pairs.append((time.time(), agreed, f1))

    def since(self, adapter: str, version: int, start: float) -> ShadowPairs | None:
        """The comparisons of canary `adapter@version` at or after `start` (unix s); None
        when it has none."""
        with self._lock:
            found = [p for p in self._pairs.get((adapter, version), ()) if p[0] >= start]
        if not found:
            return None
        return ShadowPairs(
            len(found),
            sum(1 for p in found if p[1]),
            sum(p[2] for p in found) / len(found),
        )
