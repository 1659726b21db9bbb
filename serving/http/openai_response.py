"""The answers of /v1/completions and /v1/chat/completions in OpenAI's shapes: whole
bodies and server-sent event streams over the generations of one request's choices, with
log-probabilities (chat's `logprobs.content`, completions' `tokens`/`token_logprobs`/
`top_logprobs`/`text_offset`) and usage, including the usage chunk of
`stream_options.include_usage`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from serving.engines.seam import TokenLogprob
from serving.http.openai_request import Plan
from serving.runtime.generation import Generation
from serving.runtime.server import Server


def usage(plan: Plan, generations: list[Generation]) -> dict[str, int]:
    """Each prompt's tokens once; every generated token, best_of's candidates included."""
    prompt = sum(g.prompt_tokens for g in generations[:: plan.per_prompt])
    completion = sum(g.completion_tokens for g in generations)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def answered(plan: Plan, generations: list[Generation]) -> list[Generation]:
    """The generations the answer shows, in choice order: with best_of, each prompt's n
    candidates of highest log-probability (vLLM's rule), best first."""
    if plan.per_prompt == plan.n:
        return generations
    shown: list[Generation] = []
    for start in range(0, len(generations), plan.per_prompt):
        candidates = generations[start : start + plan.per_prompt]
        candidates.sort(key=lambda g: -sum(lp.logprob for _, lp in g.token_logprobs))
        shown += candidates[: plan.n]
    return shown


async def collect(server: Server, generation: Generation) -> str:
    return "".join([d async for d in server.deltas(generation)])


async def whole_body(server: Server, plan: Plan, generations: list[Generation]) -> dict[str, Any]:
    texts = await asyncio.gather(*(collect(server, g) for g in generations))
    by_id = {g.id: t for g, t in zip(generations, texts, strict=True)}
    first = generations[0]
    choices = []
    for index, generation in enumerate(answered(plan, generations)):
        text = by_id[generation.id]
        formatted = Formatter(server, plan, generation)
        if plan.chat:
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": formatted.chat_logprobs(len(generation.token_logprobs)),
                "finish_reason": generation.finish_reason,
            }
        else:
            prefix = generation.prompt if plan.echo else ""
            choice = {
                "index": index,
                "text": prefix + text,
                "logprobs": formatted.completion_logprobs(
                    len(generation.token_logprobs), echo=plan.echo
                ),
                "finish_reason": generation.finish_reason,
            }
        choices.append(choice)
    return {
        "id": first.response_id,
        "object": "chat.completion" if plan.chat else "text_completion",
        "created": first.created,
        "model": first.served,
        "choices": choices,
        "usage": usage(plan, generations),
    }


class Formatter:
    """The logprobs of one choice, token by token (each chunk of a stream shows the tokens
    that arrived since the one before)."""

    def __init__(self, server: Server, plan: Plan, generation: Generation) -> None:
        self.server, self.plan, self.generation = server, plan, generation
        self.shown = 0  # generated tokens whose logprobs went out
        self.offset = 0  # text_offset of the next token
        self.prompt_shown = False  # echo: the prompt's tokens went out (first chunk)

    def chat_logprobs(self, upto: int) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None
        entries = self.generation.token_logprobs[self.shown : upto]
        self.shown = max(self.shown, upto)
        texts = self.server.token_texts([t for t, _ in entries])
        content = []
        for text, (_, lp) in zip(texts, entries, strict=True):
            top = lp.top[: self.plan.logprobs]
            top_texts = self.server.token_texts([t for t, _ in top])
            content.append(
                {
                    **_token(text, lp.logprob),
                    "top_logprobs": [
                        _token(t, v) for t, (_, v) in zip(top_texts, top, strict=True)
                    ],
                }
            )
        return {"content": content, "refusal": None}

    def completion_logprobs(self, upto: int, *, echo: bool) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None
        ids: list[int] = []
        entries: list[TokenLogprob | None] = []
        if echo and not self.prompt_shown:
            self.prompt_shown = True
            scored = self.generation.scored_ids
            ids += scored
            entries += list(self.generation.prompt_logprobs or [None] * len(scored))
        generated = self.generation.token_logprobs[self.shown : upto]
        self.shown = max(self.shown, upto)
        ids += [t for t, _ in generated]
        entries += [lp for _, lp in generated]
        texts = self.server.token_texts(ids)
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        top: list[dict[str, float] | None] = []
        for text, lp in zip(texts, entries, strict=True):
            if lp is None:
                top.append(None)
                continue
            alternatives = lp.top[: self.plan.logprobs]
            names = self.server.token_texts([t for t, _ in alternatives])
            shown = {name: value for name, (_, value) in zip(names, alternatives, strict=True)}
            # OpenAI: the sampled token's logprob is always among them (up to logprobs + 1).
            shown.setdefault(text, lp.logprob)
            top.append(shown)
        return {
            "tokens": texts,
            "token_logprobs": [lp.logprob if lp else None for lp in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


async def events(
    server: Server, generations: list[Generation]
) -> AsyncIterator[tuple[int, str | None]]:
    """(choice, text delta) as each generation's text arrives, interleaved; (choice, None)
    once that choice ended. Leaving early cancels every choice still running."""
    if len(generations) == 1:
        async for delta in server.deltas(generations[0]):
            yield 0, delta
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for delta in server.deltas(generation):
                queue.put_nowait((index, delta))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item[1] is None:
                running -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sse(server: Server, plan: Plan, generations: list[Generation]) -> AsyncIterator[str]:
    """The event stream of a request: chunks per choice as text arrives, a last chunk per
    choice with its finish_reason, the usage chunk if asked for, then [DONE]."""
    first = generations[0]
    kind = "chat.completion.chunk" if plan.chat else "text_completion"
    formatters = [Formatter(server, plan, g) for g in generations]
    started = [False] * len(generations)

    def chunk(index: int, text: str | None, finish: str | None) -> str:
        generation = generations[index]
        upto = len(generation.token_logprobs)
        formatter = formatters[index]
        if plan.chat:
            delta: dict[str, Any] = {} if started[index] else {"role": "assistant"}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "logprobs": formatter.chat_logprobs(upto),
                "finish_reason": finish,
            }
        else:
            if plan.echo and not started[index]:
                text = generation.prompt + (text or "")
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": formatter.completion_logprobs(upto, echo=plan.echo),
                "finish_reason": finish,
            }
        started[index] = True
        body: dict[str, Any] = {
            "id": first.response_id,
            "object": kind,
            "created": first.created,
            "model": first.served,
            "choices": [choice],
        }
        if plan.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    async for index, delta in events(server, generations):
        if delta is None:
            yield chunk(index, None, generations[index].finish_reason)
        else:
            yield chunk(index, delta, None)
    if plan.include_usage:
        body = {
            "id": first.response_id,
            "object": kind,
            "created": first.created,
            "model": first.served,
            "choices": [],
            "usage": usage(plan, generations),
        }
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
