"""Admission: a request -> the version that serves it, made resident, its prompt
tokenized and checked against the server's bounds, and submitted to the engine. Every
refusal happens here, before any output, so the HTTP layer can still answer 4xx/503.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from registry.errors import LorafleetError
from registry.names import parse_model_ref
from serving.engines.seam import Engine, GenerationRequest, SamplingParams, TokenEvent
from serving.errors import BadRequest
from serving.runtime.generation import Generation, Relay, SamplingRequest
from serving.runtime.outcomes import Outcomes
from serving.runtime.residency import Residency
from serving.runtime.routing import Router, Target
from serving.serve_config import ServeConfig

# Requests that may wait for an adapter to load at once (each waits on a thread).
LOADER_THREADS = 64


class Admission:
    def __init__(
        self,
        config: ServeConfig,
        tokenizer: Any,
        engine: Engine,
        router: Router,
        residency: Residency,
        outcomes: Outcomes,
    ) -> None:
        self.config, self.tokenizer, self.engine = config, tokenizer, engine
        self.router, self.residency, self.outcomes = router, residency, outcomes
        self._relays: dict[asyncio.AbstractEventLoop, Relay] = {}
        self._loaders = ThreadPoolExecutor(
            max_workers=LOADER_THREADS, thread_name_prefix="adapter-load"
        )

    def close(self) -> None:
        self._loaders.shutdown(wait=False, cancel_futures=True)

    async def start(
        self, body: SamplingRequest, prompt: str, *, chat: bool, session: str | None
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
                self.outcomes.refused(target.adapter, target.version)
            raise

    def _submit(
        self,
        body: SamplingRequest,
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
        self.outcomes.admitted(generation)
        return generation

    def _relay(self) -> Relay:
        loop = asyncio.get_running_loop()
        relay = self._relays.get(loop)
        if relay is None:
            relay = self._relays[loop] = Relay(loop)
        return relay


def _stops(body: SamplingRequest) -> list[str]:
    try:
        return body.stop_list()
    except ValueError as err:
        raise BadRequest(f"stop: {err}") from err
