"""One admitted request (Generation), what the HTTP layer asks for (Ask), the response ids
the client sees, and the relay of token events from the engine thread."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from serving.engines.seam import SamplingParams, TokenEvent, TokenLogprob
from serving.runtime.routing import Target

RESPONSE_PREFIXES = ("chatcmpl-", "cmpl-", "classify-")


def response_id(request_id: str, *, chat: bool, classify: bool = False) -> str:
    """The id a client gets for a request: chatcmpl-ID (chat), cmpl-ID (completions) or
    classify-ID (one text of a classification)."""
    prefix = RESPONSE_PREFIXES[2 if classify else 0 if chat else 1]
    return f"{prefix}{request_id}"


def request_id_of(response: str) -> str:
    """The request id inside a response id (either prefix, or none)."""
    for prefix in RESPONSE_PREFIXES:
        if response.startswith(prefix):
            return response.removeprefix(prefix)
    return response


@dataclass(frozen=True)
class Ask:
    """What one choice of a request asks for: the HTTP layer builds it from the OpenAI
    fields (serving/http/openai_request.py); admission checks it against the server."""

    model: str
    params: SamplingParams
    max_tokens: int | None = None  # None: the rest of the context, up to the server's limit
    stops: tuple[str, ...] = ()
    include_stop: bool = False  # the stop string that ended the output is part of it
    skip_special_tokens: bool = True


@dataclass
class Generation:
    """One admitted request: its id, what serves it, and its token events."""

    id: str
    target: Target | None
    prompt: str
    prompt_tokens: int
    ask: Ask = field(repr=False)  # what it asked for: sampling, stop strings, decoding
    queue: asyncio.Queue[TokenEvent] = field(repr=False)
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""  # handed to the client so far
    completion_tokens: int = 0
    finish_reason: str | None = None
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # until drift records it
    chat: bool = False
    consumed: bool = False  # deltas() began; it frees the request when it ends
    revision: int = 0  # registry revision of the alias map that resolved it
    # (token id, its logprob) of each generated token, when the request asked for them
    token_logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list, repr=False)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = field(default=None, repr=False)
    scored_ids: list[int] = field(default_factory=list, repr=False)  # prompt_logprobs' tokens
    labels_of_classifier: tuple[str, ...] = ()  # a classification: the classifier's labels

    @property
    def model(self) -> str:
        """The request's model field."""
        return self.ask.model

    @property
    def response_id(self) -> str:
        """The id the client got: chatcmpl-... or cmpl-..."""
        return response_id(self.id, chat=self.chat, classify=bool(self.labels_of_classifier))

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
