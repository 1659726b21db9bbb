"""The hf engine's per-row sampling and its log-probabilities.

A row whose request is greedy and shapes nothing takes its token from the engine's one
batched argmax; only rows that need it get a `Shaping`, which applies the request's logit
processors in vLLM's order (logit_bias, min_tokens, repetition penalty, frequency and
presence penalties; the engine masks the grammar next) and then samples (temperature,
top_k, min_p, top_p) or takes the argmax. Log-probabilities are always of the raw logits,
one log_softmax and one topk over all rows that asked (`token_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serving.engines.seam import SamplingParams, TokenLogprob
from serving.errors import BadRequest

PromptLogprobs = tuple[TokenLogprob | None, ...]


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """BadRequest naming every value this engine cannot run, at submit: left to the engine
    thread, most (an index outside the vocabulary, a negative top-k) would fail the whole
    batch's step, not just their row."""
    problems = []
    if params.max_new_tokens < 0 or (params.max_new_tokens == 0 and params.prompt_logprobs is None):
        problems.append(
            f"max_new_tokens is {params.max_new_tokens}; ask for 1 or more (0 only with "
            "prompt_logprobs, to score a prompt)"
        )
    bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab_size]
    if bad:
        problems.append(f"logit_bias token id {bad[0]} is outside 0..{vocab_size - 1}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value < 0:
            problems.append(f"{name} is {value}; ask for 0 or more top alternatives")
    if params.top_k < 0:
        problems.append(f"top_k is {params.top_k}; use 0 (off) or more")
    if params.repetition_penalty <= 0:
        problems.append(f"repetition_penalty is {params.repetition_penalty}; it must be > 0")
    if problems:
        raise BadRequest("; ".join(problems))


def needs_shaping(params: SamplingParams) -> bool:
    """False for the fast path: greedy, no bias, penalty, min_tokens or grammar."""
    return (
        params.temperature > 0
        or bool(params.logit_bias)
        or params.min_tokens > 0
        or params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
        or params.structured is not None
    )


class Shaping:
    """One row's logit processors and sampler. The token statistics the penalties need are
    (vocab,) tensors updated by `observe` once per generated token, never recounted."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        eos_ids: Sequence[int],
    ) -> None:
        self.params = params
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            self.bias = torch.tensor(ids), torch.tensor(values, dtype=torch.float32)
        ends = {t for t in (*eos_ids, *params.stop_token_ids) if 0 <= t < vocab_size}
        self.ends = torch.tensor(sorted(ends), dtype=torch.long) if params.min_tokens else None
        self.seen: torch.Tensor | None = None  # (vocab,) bool: prompt and generated tokens
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids)] = True
        self.counts: torch.Tensor | None = None  # (vocab,) fp32: generated tokens
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab_size)
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            seed = params.seed
            self.generator.manual_seed(seed if seed is not None else torch.seed())

    def adjust(self, logits: torch.Tensor, generated: int) -> None:
        """In place on this row's (vocab,) fp32 logits, `generated` tokens in: bias,
        min_tokens, penalties."""
        params = self.params
        if self.bias is not None:
            logits.index_add_(0, *self.bias)
        if self.ends is not None and generated < params.min_tokens:
            logits[self.ends] = float("-inf")
        if self.seen is not None:  # transformers' rule: shrink positive, grow negative
            r = params.repetition_penalty
            penalized = torch.where(logits > 0, logits / r, logits * r)
            logits.copy_(torch.where(self.seen, penalized, logits))
        if self.counts is not None:
            logits -= self.counts * params.frequency_penalty
            logits -= (self.counts > 0).float() * params.presence_penalty

    def pick(self, logits: torch.Tensor) -> int | None:
        """The next token from the adjusted (and grammar-masked) logits; None when every
        token is masked, which no sampler can recover from."""
        if float(logits.max()) == float("-inf"):
            return None
        params = self.params
        if self.generator is None:
            return int(logits.argmax())
        logits = logits / params.temperature
        if 0 < params.top_k < logits.numel():
            kth = logits.topk(params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.min_p > 0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
            probs /= probs.sum()
        if params.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(-1) - ordered < params.top_p  # always keeps the first
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def observe(self, token: int) -> None:
        """Count a generated token."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int]
) -> list[TokenLogprob]:
    """Each row's log-probability of its token and its `tops[i]` best alternatives.

    logits (rows, vocab) fp32, raw; tokens (rows,). One log_softmax and one topk (of the
    largest k asked) for all rows, then each row keeps its own k.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    k = min(max(tops, default=0), logits.shape[-1])
    ids: list[list[int]] = [[] for _ in tops]
    values: list[list[float]] = [[] for _ in tops]
    if k > 0:
        best = logprobs.topk(k, dim=-1)
        values, ids = best.values.tolist(), best.indices.tolist()
    return [
        TokenLogprob(c, tuple(zip(ids[i][:top], values[i][:top], strict=True)))
        for i, (c, top) in enumerate(zip(chosen, tops, strict=True))
    ]


def chosen_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """Per row, its chosen token's log-probability and top `tops[i]`, or None where tops[i]
    is None (rows that did not ask cost nothing); logits (rows, vocab), raw."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    asked = [i for i, k in enumerate(tops) if k is not None]
    if asked:
        picked = torch.tensor([tokens[i] for i in asked])
        scored = token_logprobs(logits[asked], picked, [tops[i] or 0 for i in asked])
        for i, logprob in zip(asked, scored, strict=True):
            out[i] = logprob
    return out


def score_prompts(
    full: torch.Tensor, prompts: Sequence[Sequence[int]], tops: Sequence[int]
) -> list[PromptLogprobs]:
    """Each prompt's log-probabilities, None for its first token, from the packed logits of
    every prompt position (sum of the prompts' lengths, vocab), prompts in order.

    Position p scores token p + 1; a prompt's last position scores what follows it, so it
    is left out. One `token_logprobs` call for all prompts.
    """
    starts = torch.tensor([0, *(len(p) for p in prompts[:-1])]).cumsum(0).tolist()
    keep = torch.cat(
        [torch.arange(s, s + len(p) - 1) for s, p in zip(starts, prompts, strict=True)]
    )
    targets = torch.tensor([t for p in prompts for t in p[1:]], dtype=torch.long)
    per_position = [k for p, k in zip(prompts, tops, strict=True) for _ in p[1:]]
    scored = token_logprobs(full[keep], targets, per_position)
    out: list[PromptLogprobs] = []
    at = 0
    for prompt in prompts:
        out.append((None, *scored[at : at + len(prompt) - 1]))
        at += len(prompt) - 1
    return out
