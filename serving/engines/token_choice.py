"""What each request of the hf engine asks of its tokens, and the choice of its next one.

The engine's loop (serving/engines/hf.py) runs the forward passes and hands each step's
raw logits (rows, vocab) to `TokenChoice.pick`. Rows that ask for nothing extra (greedy, no
penalty, bias, min_tokens or grammar) take their tokens from one argmax over the batch, with
no Python per row here; only rows with a `sampling.Shaping` are adjusted, masked by their
grammar (serving/engines/structured.py) and sampled, and only rows that ask for
log-probabilities pay for one batched log_softmax (serving/engines/sampling.py). `take`
then says what the chosen token does to its row: a stop token, EOS, a token the grammar
refuses or completes, or a length limit ends it.

It is separate from the loop so that the loop reads as batching, KV and adapters, and all a
request may ask of its tokens (sampling, penalties, response_format, log-probabilities) is
in one place. `TokenChoice` owns the grammars: they are built on the first structured
request, under a lock, since `check` and `compile` run on the callers' threads (so a bad
schema fails its caller); the rest runs on the engine thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from serving.engines.sampling import (
    PromptLogprobs,
    Shaping,
    check_params,
    chosen_logprobs,
    needs_shaping,
    score_prompts,
)
from serving.engines.seam import (
    GenerationRequest,
    OnEvent,
    SamplingParams,
    StructuredOutput,
    TokenEvent,
    TokenLogprob,
)
from serving.errors import BadRequest

if TYPE_CHECKING:
    from serving.engines.structured import Compiled, Grammars, Matcher


@dataclass(frozen=True)
class Queued:
    """A submitted request waiting for a row."""

    request: GenerationRequest
    on_event: OnEvent
    grammar: Compiled | None  # compiled in `submit`, on the caller's thread


@dataclass
class Row:
    """A running request: its place in the engine's KV buffers and its token choice."""

    request: GenerationRequest
    on_event: OnEvent
    slot: int | None
    length: int = 0  # tokens in the KV buffers
    last_token: int = 0
    generated: int = 0
    shaping: Shaping | None = None  # None: the batched-argmax fast path
    matcher: Matcher | None = None
    prompt_logprobs: PromptLogprobs | None = None  # until the first event carries them
    done: bool = field(default=False)

    def with_prompt_logprobs(self, event: TokenEvent) -> TokenEvent:
        """The request's first event carries its prompt log-probabilities."""
        if self.prompt_logprobs is None:
            return event
        event, self.prompt_logprobs = replace(event, prompt_logprobs=self.prompt_logprobs), None
        return event


class Picked(NamedTuple):
    """One step's choice for a batch of rows, in their order."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask
    endings: dict[int, TokenEvent]  # row index -> the error ending it (no token allowed)


class TokenChoice:
    """Per-request token choice for one base model (module docstring)."""

    def __init__(
        self, base_dir: Path, vocab_size: int, eos_ids: frozenset[int], max_len: int
    ) -> None:
        """`vocab_size` is the logits' width, `eos_ids` what the engine takes for EOS and
        `max_len` the tokens a row's KV buffers hold."""
        self.vocab_size, self.eos_ids, self.max_len = vocab_size, eos_ids, max_len
        self._base_dir = base_dir
        self._grammars: Grammars | None = None  # built on the first structured request
        self._grammars_lock = threading.Lock()

    # ---- any thread ----------------------------------------------------------------------

    def check(self, params: SamplingParams) -> Compiled | None:
        """BadRequest naming what `params` ask that this engine cannot run (a bad schema
        included); else the compiled grammar of its response_format, if any."""
        check_params(params, self.vocab_size)
        return self.compile(params.structured) if params.structured is not None else None

    def compile(self, spec: StructuredOutput) -> Compiled:
        """The compiled grammar of `spec`; BadRequest when the schema is invalid."""
        with self._grammars_lock:
            if self._grammars is None:
                from transformers import AutoTokenizer

                from serving.engines.structured import Grammars

                tokenizer = AutoTokenizer.from_pretrained(str(self._base_dir))
                # The grammar ends the output with what this engine takes for EOS.
                stops = sorted(self.eos_ids)
                self._grammars = Grammars(tokenizer, self.vocab_size, stop_token_ids=stops)
            grammars = self._grammars
        try:
            return grammars.compile(spec)
        except ValueError as err:
            raise BadRequest(str(err)) from err  # the message names the field

    # ---- engine thread -------------------------------------------------------------------

    def prepare(self, queued: Queued, slot: int | None) -> Row:
        """A new row for `queued` (adapter slot `slot`): its shaping, None on the fast path,
        and its grammar's matcher."""
        request = queued.request
        prompt = request.prompt_ids
        shaping = None
        if needs_shaping(request.params):
            shaping = Shaping(request.params, prompt, self.vocab_size, tuple(self.eos_ids))
        matcher = None
        if queued.grammar is not None:
            assert self._grammars is not None, "a grammar was compiled by `submit`"
            matcher = self._grammars.matcher(queued.grammar)
        return Row(
            request, queued.on_event, slot, length=len(prompt), shaping=shaping, matcher=matcher
        )

    def score_prompts(self, rows: list[Row], full: torch.Tensor) -> None:
        """Set the prompt log-probabilities of `rows` from the packed logits of every one of
        their prompt positions (sum of their prompts' lengths, vocab)."""
        prompts = [r.request.prompt_ids for r in rows]
        tops = [r.request.params.prompt_logprobs or 0 for r in rows]
        for row, logprobs in zip(rows, score_prompts(full, prompts, tops), strict=True):
            row.prompt_logprobs = logprobs

    def pick(self, rows: list[Row], logits: torch.Tensor) -> Picked:
        """Each row's next token, and its log-probability, from its raw logits (rows, vocab);
        a row whose every token is masked gets an error ending instead."""
        tokens: list[int] = logits.argmax(-1).tolist()  # one op for the batch, not per row
        endings: dict[int, TokenEvent] = {}
        shaped = [i for i, r in enumerate(rows) if r.shaping is not None]
        if shaped:
            self._shape_and_pick([rows[i] for i in shaped], logits[shaped], shaped, tokens, endings)
        logprobs = chosen_logprobs(logits, tokens, [r.request.params.logprobs for r in rows])
        return Picked(tokens, logprobs, endings)

    def _shape_and_pick(
        self,
        rows: list[Row],
        logits: torch.Tensor,
        at: list[int],
        tokens: list[int],
        endings: dict[int, TokenEvent],
    ) -> None:
        """Pick the tokens of rows that shape their distribution, writing them to
        tokens[at[j]] (or their ending to endings[at[j]]); `logits` (rows, vocab) is their
        copy, adjusted in place."""
        matchers = []
        for j, row in enumerate(rows):
            assert row.shaping is not None
            row.shaping.adjust(logits[j], row.generated)
            if row.matcher is not None:
                matchers.append((j, row.matcher))
        if matchers:
            assert self._grammars is not None
            self._grammars.mask(logits, matchers)
        for j, row in enumerate(rows):
            assert row.shaping is not None
            token = row.shaping.pick(logits[j])
            if token is None:
                error = (
                    f"no token is allowed after {row.generated} tokens: logit_bias, "
                    f"min_tokens ({row.request.params.min_tokens}) and the grammar mask them all"
                )
                endings[at[j]] = TokenEvent(None, "error", error=error)
            else:
                tokens[at[j]] = token

    def take(self, row: Row, token: int) -> tuple[bool, TokenEvent | None]:
        """Advance `row` by its chosen token: (deliver the token?, the event that ends the
        row after it or instead of it, or None). A stop token, EOS (unless ignore_eos) or a
        token the grammar refuses ends the row undelivered; a complete grammar, max_new_tokens
        or a full KV row ends it after the token."""
        params = row.request.params
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            return False, TokenEvent(None, "stop")
        if row.matcher is not None and not row.matcher.accept(token):
            error = f"token {token} is not allowed by the request's response_format grammar"
            return False, TokenEvent(None, "error", error=error)
        row.last_token = token
        row.generated += 1
        if row.shaping is not None:
            row.shaping.observe(token)
        if row.matcher is not None and row.matcher.terminated:
            return True, TokenEvent(None, "stop")
        if row.generated >= params.max_new_tokens or row.length + 1 >= self.max_len:
            return True, TokenEvent(None, "length")
        return True, None


def compact(rows: list[Row], move: Callable[[int, int, int], None]) -> None:
    """Drop finished rows in place, moving the last row into each hole; `move(from, to,
    length)` moves its KV the same way."""
    i = 0
    while i < len(rows):
        if not rows[i].done:
            i += 1
            continue
        last = len(rows) - 1
        if i != last:
            move(last, i, rows[last].length)
            rows[i] = rows[last]
        rows.pop()
