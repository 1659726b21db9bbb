"""The server's state and request flow, apart from HTTP: engine, registry, router,
residency, the registry poller (hot-swap), metrics and recent responses for feedback.

Hot-swap: a thread polls the registry revision. On a change it reads the new alias map,
loads every newly targeted version of an adapter in use *before* swapping the map in, and
keeps the old target of an alias whose new version cannot be loaded (e.g. a tampered
artifact). Requests hold the version they were admitted with until they finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from registry import Registry
from registry.basemodel import inspect_base
from registry.errors import LorafleetError, NotFound
from registry.names import CANARY_ALIAS, DEFAULT_ALIAS, parse_model_ref
from registry.requestlog import LoggedRequest
from registry.settings import all_settings
from serving.canary import CanaryStats, CanaryWatch
from serving.config import ServeConfig
from serving.drift import Drift, DriftSettings, registry_profiles
from serving.engine import GenerationRequest, SamplingParams, TokenEvent
from serving.engines import build_engine
from serving.errors import BadRequest
from serving.metrics import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    QUEUE_DEPTH,
    REGISTRY_REVISION,
    REQUEST_SECONDS,
    REQUESTS,
    TTFT_SECONDS,
)
from serving.requestlog import RequestLogWriter
from serving.residency import Residency
from serving.routing import AliasMap, Router, Target
from serving.samples import DriftHistory, Traffic
from serving.schemas import SamplingFields

logger = logging.getLogger(__name__)
RECENT_RESPONSES = 10_000
# Requests that may wait for an adapter to load at once (each waits on a thread).
LOADER_THREADS = 64


@dataclass
class Generation:
    """One admitted request: its id, what serves it, and its token events."""

    id: str
    target: Target | None
    prompt: str
    prompt_tokens: int
    stops: list[str]
    queue: asyncio.Queue[TokenEvent]
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # until drift records it
    model: str = ""  # the request's model field
    chat: bool = False
    consumed: bool = False  # deltas() began; it frees the request when it ends
    revision: int = 0  # registry revision of the alias map that resolved it

    @property
    def response_id(self) -> str:
        """The id the client got: chatcmpl-... or cmpl-..."""
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.id}"

    @property
    def served(self) -> str:
        return self.target.key if self.target else "base"

    @property
    def labels(self) -> tuple[str, str]:
        """Metric labels: adapter and version ("base", "0" for the base model)."""
        t = self.target
        return (t.adapter, str(t.version)) if t else ("base", "0")


class Relay:
    """Hands token events from the engine thread to an event loop, one wake-up for all the
    events pushed before the loop runs (a decode step ends with one event per running
    request; a wake-up each cost the loop and the engine thread the GIL 32 times a step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, queue: asyncio.Queue[TokenEvent], event: TokenEvent) -> None:
        with self._lock:
            self._items.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, event in items:
            queue.put_nowait(event)


class Server:
    def __init__(self, config: ServeConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.registry = Registry(config.home)
        fingerprint = inspect_base(config.base).fingerprint
        if fingerprint != self.registry.base.fingerprint:
            raise LorafleetError(
                f"base {config.base} has fingerprint {fingerprint} but the registry at "
                f"{self.registry.home} is bound to {self.registry.base.fingerprint}; serve "
                f"{self.registry.base.path} or use the registry of this base (--home)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.base))
        self.drift = Drift(DriftSettings.from_config(config), registry_profiles(self.registry))
        self.engine_name, self.engine = build_engine(config)
        self.residency = Residency(self.engine, self.engine_name, self.registry)
        self.router = Router(AliasMap.load(self.registry))
        REGISTRY_REVISION.set(self.router.map.revision)
        self.canary_stats = CanaryStats()
        self.traffic = Traffic()  # the dashboard's charts
        self.drift_history = DriftHistory(self.drift.summary)
        self.pinned_in_registry: frozenset[str] = frozenset()  # adapters with pinned=true
        self.request_log = (
            RequestLogWriter(
                lambda: self.registry.request_log,
                max_rows_per_adapter=config.request_log_max_rows,
                max_age_s=config.request_log_max_age_days * 86400,
            )
            if config.request_log
            else None
        )
        self._read_settings()
        self._recent: OrderedDict[str, Generation] = OrderedDict()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._in_flight = 0
        self._relays: dict[asyncio.AbstractEventLoop, Relay] = {}
        self._loaders = ThreadPoolExecutor(
            max_workers=LOADER_THREADS, thread_name_prefix="adapter-load"
        )
        self._preload_pinned(self.router.map)
        self._poller = threading.Thread(target=self._poll, name="registry-poller", daemon=True)
        self._poller.start()
        self.drift_history.start()
        self.canary = CanaryWatch(
            self.registry,
            self.canary_stats,
            self.residency,
            self.drift.scores,
            self.drift.settings.thresholds,
            applied=self.refresh,
            interval_s=config.canary_interval_s,
            enabled=config.canary_verdicts,
        )

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
        self.canary.close()
        self.drift_history.close()
        if self.request_log is not None:
            self.request_log.close()  # writes what is pending
        self.drift.close()
        self._loaders.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
        self.registry.close()

    # ---- hot-swap ------------------------------------------------------------------------

    @property
    def pinned(self) -> set[str]:
        """Adapters kept resident: `--pin` and the registry's `pinned` setting."""
        return set(self.config.pinned) | self.pinned_in_registry

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
        while not self._stop.wait(self.config.poll_interval_s):
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

    def refresh(self) -> bool:
        """Apply the registry's current aliases; True if the map changed."""
        with self._refresh_lock:
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

    def _read_settings(self) -> None:
        """Pinned adapters and those that opted out of the request log (settings bump the
        revision)."""
        settings = all_settings(self.registry.db)
        self.pinned_in_registry = frozenset(a for a, s in settings.items() if s.pinned)
        if self.request_log is not None:
            self.request_log.opted_out = frozenset(
                a for a, s in settings.items() if not s.request_log
            )

    # ---- requests ------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    async def start(
        self, body: SamplingFields, prompt: str, *, chat: bool, session: str | None
    ) -> Generation:
        """Resolve, make resident, tokenize, check bounds and submit; errors before output."""
        stops = _stops(body)
        if body.max_tokens > self.config.max_tokens_limit:
            raise BadRequest(
                f"max_tokens {body.max_tokens} > {self.config.max_tokens_limit}, the limit of "
                "this server; ask for fewer tokens"
            )
        # One alias map resolves this request; its revision goes back to the client.
        aliases = self.router.map
        target = self.router.resolve(parse_model_ref(body.model), session, aliases)
        if target is None:
            return self._submit(body, prompt, chat, None, stops, aliases.revision)
        try:
            with self.residency.held(target.key):
                if not self.residency.touch(target.key):
                    # Loading blocks, waiting for a slot as long as SLOT_WAIT_S: on threads
                    # of its own, so waiting misses never fill the loop's default executor.
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._loaders, self.residency.ensure, target)
                return self._submit(body, prompt, chat, target, stops, aliases.revision)
        except LorafleetError as err:
            if not isinstance(err, BadRequest):  # the version failed to serve it
                self.canary_stats.record(
                    target.adapter, target.version, error=True, seconds_per_token=None
                )
                self.traffic.record(target.adapter, str(target.version), seconds=None, error=True)
            raise

    def _submit(
        self,
        body: SamplingFields,
        prompt: str,
        chat: bool,
        target: Target | None,
        stops: list[str],
        revision: int,
    ) -> Generation:
        ids = self.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        if not ids:
            raise BadRequest("prompt is empty after tokenization; send some text")
        if len(ids) + body.max_tokens > self.config.max_len:
            raise BadRequest(
                f"prompt has {len(ids)} tokens; with max_tokens {body.max_tokens} that exceeds "
                f"max_len {self.config.max_len} of this server; shorten the prompt or max_tokens"
            )
        relay = self._relay()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        generation = Generation(
            uuid.uuid4().hex,
            target,
            prompt,
            len(ids),
            stops,
            queue,
            prompt_ids=ids,
            model=body.model,
            chat=chat,
            revision=revision,
        )
        params = SamplingParams(
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        request = GenerationRequest(generation.id, ids, params, target.key if target else None)

        def on_event(event: TokenEvent) -> None:  # engine thread: only hand over
            relay.push(queue, event)

        self.engine.submit(request, on_event)
        self._in_flight += 1
        QUEUE_DEPTH.set(self._in_flight)
        PROMPT_TOKENS.labels(*generation.labels).inc(len(ids))
        return generation

    async def deltas(self, generation: Generation) -> AsyncIterator[str]:
        """Text deltas as tokens arrive; sets finish_reason. Cancels the engine request if
        the consumer goes away (client disconnect)."""
        tokens: list[int] = []
        started = time.perf_counter()
        adapter, version = generation.labels
        # Incremental detokenization: decode only the tokens since the last emitted text,
        # starting from the token before them, so each step costs O(1) tokens, not O(n).
        prefix, read = 0, 0
        generation.consumed = True
        try:
            while True:
                event = await generation.queue.get()
                if event.token_id is None:
                    generation.finish_reason = event.finish_reason
                    if event.error:
                        logger.error("request %s failed: %s", generation.id, event.error)
                    break
                if not tokens:
                    TTFT_SECONDS.labels(adapter, version).observe(time.perf_counter() - started)
                tokens.append(event.token_id)
                generation.completion_tokens = len(tokens)
                before = self._decode(tokens[prefix:read])
                after = self._decode(tokens[prefix:])
                if len(after) <= len(before) or after.endswith("\ufffd"):
                    continue  # the rest of a multi-byte character is still to come
                prefix, read = read, len(tokens)
                text = generation.text + after[len(before) :]
                cut = _first_stop(text, generation.stops, len(generation.text))
                if cut is not None:
                    text = text[:cut]
                    self.engine.cancel(generation.id)
                    generation.finish_reason = "stop"
                delta, generation.text = text[len(generation.text) :], text
                if delta:
                    yield delta
                if cut is not None:
                    break
        finally:
            if generation.finish_reason is None:
                self.engine.cancel(generation.id)
                generation.finish_reason = "cancelled"
            self._in_flight -= 1
            QUEUE_DEPTH.set(self._in_flight)
            status = {"stop": "ok", "length": "ok"}.get(
                generation.finish_reason, generation.finish_reason
            )
            seconds = time.perf_counter() - started
            REQUESTS.labels(adapter, version, status).inc()
            REQUEST_SECONDS.labels(adapter, version).observe(seconds)
            COMPLETION_TOKENS.labels(adapter, version).inc(len(tokens))
            self.traffic.record(
                adapter,
                version,
                seconds=seconds if status == "ok" else None,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=len(tokens),
                error=status == "error",
            )
            if generation.finish_reason in ("stop", "length"):
                length = generation.finish_reason == "length"
                # The baseline counts a training completion's tokens with its eos; a completion
                # that ended by itself ended with one too (never sent to the client).
                completion = len(tokens) + (0 if length else 1)
                self.drift.record(adapter, version, generation.prompt_ids, completion, length)
            generation.prompt_ids = []  # recent responses keep no token ids
            self._finished(generation, seconds)
            self._remember(generation)

    def abandon(self, generation: Generation) -> None:
        """Free an admitted request whose output no one began to read (its client went away
        before the response started): cancel it in the engine, count it as cancelled."""
        if generation.consumed:
            return  # deltas() frees it
        generation.consumed = True
        generation.finish_reason = "cancelled"
        self.engine.cancel(generation.id)
        self._in_flight -= 1
        QUEUE_DEPTH.set(self._in_flight)
        REQUESTS.labels(*generation.labels, "cancelled").inc()
        self.traffic.record(
            *generation.labels, seconds=None, prompt_tokens=generation.prompt_tokens
        )

    def _finished(self, generation: Generation, seconds: float) -> None:
        """Canary statistics and the request log of an adapter request that ended."""
        target = generation.target
        if target is None:
            return
        finish, tokens = generation.finish_reason, generation.completion_tokens
        per_token = seconds / tokens if tokens and finish in ("stop", "length") else None
        self.canary_stats.record(
            target.adapter, target.version, error=finish == "error", seconds_per_token=per_token
        )
        if self.request_log is not None:
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
                    completion_tokens=tokens,
                    at=time.time(),
                )
            )

    def _relay(self) -> Relay:
        loop = asyncio.get_running_loop()
        relay = self._relays.get(loop)
        if relay is None:
            relay = self._relays[loop] = Relay(loop)
        return relay

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""

    def _remember(self, generation: Generation) -> None:
        self._recent[generation.id] = generation
        while len(self._recent) > RECENT_RESPONSES:
            self._recent.popitem(last=False)

    def feedback(self, response_id: str, score: float, correction: str | None) -> int:
        generation = self._recent.get(response_id.removeprefix("cmpl-").removeprefix("chatcmpl-"))
        if generation is None:
            raise NotFound(
                f"unknown response id {response_id!r}; feedback is taken for the last "
                f"{RECENT_RESPONSES} responses of this server"
            )
        target = generation.target
        stored = self.registry.add_feedback(
            response_id,
            score,
            adapter=target.adapter if target else None,
            version=target.version if target else None,
            correction=correction,
            prompt=generation.prompt,
            output=generation.text,
        )
        self.drift.add_feedback(*generation.labels, score)
        if target is not None:
            self.canary_stats.add_feedback(target.adapter, target.version, score)
        return stored

    def drift_key(self, model: str) -> tuple[str, int]:
        """(adapter, version) that `model` names, without the canary split (NAME is
        NAME:production); ("base", 0) for the base model. NotFound naming what exists."""
        ref = parse_model_ref(model)
        if ref.adapter is None:
            return "base", 0
        if ref.version is None:
            held = self.router.map.aliases.get((ref.adapter, ref.alias or DEFAULT_ALIAS))
            if held is not None:
                return ref.adapter, held[0]
        target = self.router.resolve(ref)  # raises NotFound for what does not exist
        assert target is not None
        return target.adapter, target.version

    def spell_tokens(self, report: dict[str, Any]) -> dict[str, Any]:
        """Label the prompt_tokens bins of a `Drift.report` with their text (on the event
        loop, which owns the tokenizer)."""
        tokens = report["signals"]["prompt_tokens"]
        if tokens["bins"]:
            ids = tokens["bins"][:-1]
            tokens["labels"] = [str(self.tokenizer.decode([i])) for i in ids] + ["other"]
        return report

    def models(self) -> list[dict[str, Any]]:
        current = self.router.map
        out: list[dict[str, Any]] = [{"id": "base", "object": "model", "owned_by": "lorafleet"}]
        for adapter, states in sorted(current.versions.items()):
            aliases = {a: v for (n, a), (v, _) in current.aliases.items() if n == adapter}
            out.append(
                {
                    "id": adapter,
                    "object": "model",
                    "owned_by": "lorafleet",
                    "versions": sorted(v for v, s in states.items() if s == "active"),
                    "aliases": aliases,
                }
            )
        return out


def _stops(body: SamplingFields) -> list[str]:
    try:
        return body.stop_list()
    except ValueError as err:
        raise BadRequest(f"stop: {err}") from err


def _first_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Index where the earliest stop string starts, searching only where it can be new."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None
