"""Admission: a request -> the version that serves it, made resident, its prompts
tokenized and checked against the server's bounds, and its choices submitted to the engine.
Every refusal happens here, before any output, so the HTTP layer can still answer 4xx/503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from registry.errors import LorafleetError
from registry.names import parse_model_ref
from serving.engines.seam import Engine, GenerationRequest, SamplingParams, TokenEvent
from serving.errors import BadRequest
from serving.runtime.generation import Ask, Generation, Relay
from serving.runtime.outcomes import Outcomes
from serving.runtime.residency import Residency
from serving.runtime.routing import Router, Target
from serving.serve_config import ServeConfig

# Requests that may wait for an adapter to load at once (each waits on a thread).
LOADER_THREADS = 64

Prompt = str | list[int]
"""Text (tokenized here), or token ids taken as they are."""


class Admission:
    def __init__(
        self,
        config: ServeConfig,
        tokenizer: Any,
        vocab_size: int,
        engine: Engine,
        router: Router,
        residency: Residency,
        outcomes: Outcomes,
    ) -> None:
        self.config, self.tokenizer, self.engine = config, tokenizer, engine
        self.vocab_size = vocab_size
        self.router, self.residency, self.outcomes = router, residency, outcomes
        self._relays: dict[asyncio.AbstractEventLoop, Relay] = {}
        self._loaders = ThreadPoolExecutor(
            max_workers=LOADER_THREADS, thread_name_prefix="adapter-load"
        )

    def close(self) -> None:
        self._loaders.shutdown(wait=False, cancel_futures=True)

    async def start(
        self,
        choices: Sequence[tuple[Prompt, Ask]],
        *,
        chat: bool,
        session: str | None,
    ) -> list[Generation]:
        """Resolve the model once for all `choices` (one version serves every choice of a
        request), make it resident, tokenize, check bounds and submit; errors before output.
        A refusal of any choice submits none."""
        model = choices[0][1].model
        assert all(ask.model == model for _, ask in choices), "one model per request"
        prepared = [(self._tokens(prompt, chat), prompt, ask) for prompt, ask in choices]
        for _, _, ask in prepared:
            self._check(ask)
        # One alias map resolves this request; its revision goes back to the client.
        aliases = self.router.map
        target = self.router.resolve(parse_model_ref(model), session, aliases)
        if target is None:
            return self._submit_all(prepared, chat, None, aliases.revision)
        try:
            with self.residency.held(target.key):
                await self.resident(target)
                if self.residency.classifier_labels(target.key) is not None:
                    raise BadRequest(
                        f"{target.key} is a classification adapter; send its texts to /v1/classify",
                        param="model",
                    )
                return self._submit_all(prepared, chat, target, aliases.revision)
        except LorafleetError as err:
            if not isinstance(err, BadRequest):  # the version failed to serve it
                self.outcomes.refused(target.adapter, target.version)
            raise

    async def resident(self, target: Target) -> None:
        """Make `target` resident (call it holding `residency.held(target.key)`). Loading
        blocks, waiting for a slot as long as SLOT_WAIT_S: on threads of its own, so waiting
        misses never fill the loop's default executor."""
        if not self.residency.touch(target.key):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._loaders, self.residency.ensure, target)

    def _tokens(self, prompt: Prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            ids: list[int] = self.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
            if not ids:
                raise BadRequest("prompt is empty after tokenization; send some text")
            return ids
        if not prompt:
            raise BadRequest("prompt: a list of token ids is empty; send at least one token")
        self._check_ids("prompt", prompt)
        return list(prompt)

    def _check_ids(self, name: str, ids: Sequence[int]) -> None:
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(
                f"{name}: token id {bad} is outside this model's vocabulary "
                f"(0..{self.vocab_size - 1})"
            )

    def _check(self, ask: Ask) -> None:
        limit = self.config.max_tokens_limit
        if ask.max_tokens is not None and ask.max_tokens > limit:
            raise BadRequest(
                f"max_tokens {ask.max_tokens} > {limit}, the limit of this server; ask for "
                "fewer tokens"
            )
        params = ask.params
        self._check_ids("logit_bias", [token for token, _ in params.logit_bias])
        self._check_ids("stop_token_ids", params.stop_token_ids)

    def _submit_all(
        self,
        prepared: list[tuple[list[int], Prompt, Ask]],
        chat: bool,
        target: Target | None,
        revision: int,
    ) -> list[Generation]:
        requests = [
            self._request(ids, prompt, ask, chat, target, revision) for ids, prompt, ask in prepared
        ]
        submitted: list[Generation] = []
        try:
            for generation, request in requests:
                self._submit(generation, request)
                submitted.append(generation)
        except BaseException:
            for generation in submitted:  # none of the request's choices runs
                generation.consumed = True
                generation.finish_reason = "cancelled"
                self.engine.cancel(generation.id)
                self.outcomes.finished(generation, None)
            raise
        return submitted

    def _request(
        self,
        ids: list[int],
        prompt: Prompt,
        ask: Ask,
        chat: bool,
        target: Target | None,
        revision: int,
    ) -> tuple[Generation, GenerationRequest]:
        room = self.config.max_len - len(ids)
        if ask.max_tokens is None:  # the rest of the context, up to the server's limit
            max_tokens = min(self.config.max_tokens_limit, room - 1)
            if max_tokens < 1:
                raise BadRequest(
                    f"prompt has {len(ids)} tokens, which leaves no room to generate within "
                    f"max_len {self.config.max_len} of this server; shorten the prompt"
                )
        else:
            max_tokens = ask.max_tokens
            if len(ids) + max_tokens > self.config.max_len:
                raise BadRequest(
                    f"prompt has {len(ids)} tokens; with max_tokens {max_tokens} that "
                    f"exceeds max_len {self.config.max_len} of this server; shorten the "
                    "prompt or max_tokens"
                )
        text = prompt if isinstance(prompt, str) else self._decode(ids, ask)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        scored = ask.params.prompt_logprobs is not None
        generation = Generation(
            uuid.uuid4().hex,
            target,
            text,
            len(ids),
            ask,
            queue,
            prompt_ids=ids,
            chat=chat,
            revision=revision,
            scored_ids=list(ids) if scored else [],
        )
        params = dataclasses.replace(ask.params, max_new_tokens=max_tokens)
        request = GenerationRequest(generation.id, ids, params, target.key if target else None)
        return generation, request

    def _decode(self, ids: list[int], ask: Ask) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=ask.skip_special_tokens))

    def _submit(self, generation: Generation, request: GenerationRequest) -> None:
        relay = self._relay()
        queue = generation.queue

        def on_event(event: TokenEvent) -> None:  # engine thread: only hand over
            relay.push(queue, event)

        self.engine.submit(request, on_event)
        self.outcomes.admitted(generation)

    def submit_aside(
        self, target: Target, ids: list[int], params: SamplingParams
    ) -> tuple[str, asyncio.Queue[TokenEvent]]:
        """Submit a request no client waits for (a shadow run): no Generation, not counted
        in any outcome; the caller reads the queue to its end or cancels the id."""
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        relay = self._relay()
        self.engine.submit(
            GenerationRequest(request_id, ids, params, target.key),
            lambda event: relay.push(queue, event),
        )
        return request_id, queue

    def _relay(self) -> Relay:
        loop = asyncio.get_running_loop()
        relay = self._relays.get(loop)
        if relay is None:
            relay = self._relays[loop] = Relay(loop)
        return relay
