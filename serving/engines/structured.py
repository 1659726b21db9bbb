"""Constrained decoding for the hf engine: OpenAI's `response_format` (`json_object`,
`json_schema`) as xgrammar grammars that mask the logits of each structured row.

One `Grammars` per base model: it builds xgrammar's view of the tokenizer once, compiles a
`StructuredOutput` on the caller's thread (cached, bounded), hands out one `Matcher` per
request and masks a batch of logits in place on the engine thread.

Whitespace policy: compact JSON, one line, with json.dumps' default separators (", " and
": "), no other whitespace. xgrammar's default (`any_whitespace=True`) lets whitespace run
on without bound between any two elements, and a model that ranks whitespace first spends
its budget there: the tiny test model, greedy under a two-field schema with bounded values,
finished 4 of 20 prompts in 120 tokens, the rest spent on whitespace; compact, 20 of 20 in
23-30 tokens. `max_whitespace_cnt=4` also finished 20 of 20, in 27-43 tokens (newlines and
carriage returns the client throws away). A model that would pretty-print is kept on one
line, which xgrammar's docs warn can cost some quality; the output is what `json.dumps`
writes, and every token goes to content.

What whitespace cannot fix: strings and numbers have no length bound unless the schema
gives one (`maxLength`, `maximum`), so an output can still end at `max_new_tokens` with
finish_reason "length" and incomplete JSON, as OpenAI's does. Under `json_object` the
tiny random model, greedy, never closed its first string in 600 tokens (0 of 20 prompts:
its vocabulary has one '"' token among 1770, never the best allowed).

Raw control characters (U+0000-U+001F) are never allowed: compact JSON has no place for
one, and xgrammar 0.2.8's rule for a string with `minLength` or `maxLength` lets them
through unescaped (the tiny model emitted "\x1e" inside a name), which `json.loads` rejects.
`mask` clears their tokens in every row it masks, and `accept` refuses them.

Schemas compile in xgrammar's strict mode: an object takes only the properties its schema
names (as if `additionalProperties: false`), in the order declared, so every output is an
instance of the schema, if a narrower one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from serving.engines.seam import StructuredOutput

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)

SCHEMA_FIELD = "response_format.json_schema.schema"
ANY_OBJECT = '{"type": "object"}'  # json_object: xgrammar's JSON grammar, rooted at an object
# Compact JSON (module docstring). strict_mode: only the properties a schema names.
POLICY: dict[str, Any] = {"any_whitespace": False, "strict_mode": True}
# xgrammar's C++ errors start "[15:51:54] /project/cpp/file.cc:4944: " and may carry a
# "Check failed: (cond) is false: " before the reason; the user needs only the reason.
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def validate(spec: StructuredOutput) -> None:
    """Check `spec` without a tokenizer (what the HTTP layer answers 400 for); ValueError
    naming the problem."""
    import xgrammar

    text = _schema_text(spec)
    if spec.kind == "json_object":
        return
    try:
        xgrammar.Grammar.from_json_schema(text, **POLICY)
    except RuntimeError as err:
        raise ValueError(_user_message(err)) from err


def _schema_text(spec: StructuredOutput) -> str:
    """The JSON Schema text to compile: the client's, checked to be a JSON object."""
    if spec.kind == "json_object":
        return ANY_OBJECT  # a schema given with json_object is ignored, as OpenAI does
    if spec.schema is None:
        raise ValueError(f"{SCHEMA_FIELD}: missing; json_schema needs a JSON Schema object")
    try:
        schema = json.loads(spec.schema)
    except json.JSONDecodeError as err:
        raise ValueError(f"{SCHEMA_FIELD}: not valid JSON ({err})") from err
    if not isinstance(schema, dict):
        raise ValueError(
            f"{SCHEMA_FIELD}: must be a JSON object, got {type(schema).__name__} "
            f"{spec.schema[:80]!r}"
        )
    return spec.schema


def _user_message(err: RuntimeError) -> str:
    reason = _ERROR_PREFIX.sub("", str(err).strip())
    return f"{SCHEMA_FIELD}: {reason}; fix the schema and retry"


@dataclass(frozen=True, eq=False)
class Compiled:
    """A spec compiled against one tokenizer; shared by every request with that spec."""

    spec: StructuredOutput
    grammar: xgrammar.CompiledGrammar


class Matcher:
    """One request's position in its grammar; used on the engine thread only."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab: _Vocab) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._probe: torch.Tensor | None = None  # (1, words) int32, made when first needed

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (state unchanged) if the grammar does not allow it."""
        if token in self._vocab.control:
            return False
        return bool(self._matcher.accept_token(token))

    def _fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the tokens the grammar allows into bitmask[row] (control characters
        included: the caller clears them); False when it allows every token."""
        return bool(self._matcher.fill_next_token_bitmask(bitmask, row))

    @property
    def terminated(self) -> bool:
        """The output is complete: a stop token was accepted, or the JSON is whole and only
        a stop token may follow (a top-level number that could go on is not)."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        if self._probe is None:
            self._probe = torch.zeros((1, self._vocab.words), dtype=torch.int32)
        self._fill(self._probe, 0)
        allowed = self._probe[0] & self._vocab.printable & self._vocab.content
        return not bool(allowed.any())


class Grammars:
    """Compiles response formats for one tokenizer and masks logits with them.

    `compile` may be called from any thread; `matcher` and `mask` from the engine thread.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        stop_token_ids: Sequence[int] | None = None,
        cache_size: int = 64,
    ) -> None:
        """`vocab_size` is the width of the model's logits (may exceed len(tokenizer));
        `stop_token_ids` (default: the tokenizer's eos) are what the grammar allows once the
        JSON is complete; `cache_size` bounds the compiled specs kept."""
        import xgrammar

        stops = list(stop_token_ids or [])
        if not stops and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; pass the model's stop_token_ids")
        stops = stops or [tokenizer.eos_token_id]
        self.vocab_size = vocab_size
        self._info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops
        )
        # Our cache (bounded by count, and the identity a cache hit promises) is the only
        # one: xgrammar's own is unbounded by default. compile_* release the GIL and are
        # safe to call from several threads; half the cores is xgrammar's advice.
        self._compiler = xgrammar.GrammarCompiler(
            self._info,
            max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)),
            cache_enabled=False,
        )
        self._cache: OrderedDict[StructuredOutput, Compiled] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._vocab = _Vocab.build(self._info.decoded_vocab, stops, vocab_size)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)  # (rows, words) int32
        logger.info("grammars ready: vocab %d, stop tokens %s, compact JSON", vocab_size, stops)

    def compile(self, spec: StructuredOutput) -> Compiled:
        """The compiled grammar of `spec`, from the cache when it holds it; ValueError with
        a message for the client when the schema is invalid."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        text = _schema_text(spec)
        start = time.perf_counter()
        try:  # outside the lock: a slow schema must not hold up other callers
            grammar = self._compiler.compile_json_schema(text, **POLICY)
        except RuntimeError as err:
            raise ValueError(_user_message(err)) from err
        logger.debug("compiled %s in %.1f ms", spec.kind, 1e3 * (time.perf_counter() - start))
        with self._lock:
            # Two threads may compile the same spec at once; both return the first stored.
            compiled = self._cache.setdefault(spec, Compiled(spec, grammar))
            self._cache.move_to_end(spec)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled: Compiled) -> Matcher:
        import xgrammar

        return Matcher(xgrammar.GrammarMatcher(compiled.grammar), self._vocab)

    def mask(self, logits: torch.Tensor, matchers: list[tuple[int, Matcher]]) -> None:
        """Set to -inf, in place, the tokens each matcher forbids in its row of `logits`
        (batch, vocab), fp32 on CPU; rows without a matcher are not touched."""
        import xgrammar

        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits are {logits.shape[-1]} wide, the grammars {self.vocab_size}")
        if logits.shape[0] > self._bitmask.shape[0]:  # grows to the largest batch seen
            self._bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        rows = []
        for row, matcher in matchers:
            if matcher._fill(self._bitmask, row):
                rows.append(row)
        if rows:
            self._bitmask &= self._vocab.printable  # one op for all rows: (rows, words)
            xgrammar.apply_token_bitmask_inplace(
                logits, self._bitmask, vocab_size=self.vocab_size, indices=rows
            )


@dataclass(frozen=True)
class _Vocab:
    """What the masks need to know of the tokenizer, as (words,) int32 bitmasks in
    xgrammar's layout (token i is bit i % 32 of word i // 32)."""

    words: int
    printable: torch.Tensor  # every token but those holding a byte below 0x20
    content: torch.Tensor  # every real token (id < vocab_size) but the stop tokens
    control: frozenset[int]  # ids of the tokens holding a byte below 0x20

    @staticmethod
    def build(decoded: Sequence[bytes], stops: Sequence[int], vocab_size: int) -> _Vocab:
        control = frozenset(
            i for i, text in enumerate(decoded) if any(byte < 0x20 for byte in text)
        )
        control = control - set(stops)
        return _Vocab(
            words=(vocab_size + 31) // 32,
            printable=_bitmask_without(control, vocab_size, only_real=False),
            content=_bitmask_without(set(stops), vocab_size, only_real=True),
            control=control,
        )


def _bitmask_without(ids: Collection[int], vocab_size: int, *, only_real: bool) -> torch.Tensor:
    """(words,) int32 with every bit set but those of `ids` (and, with `only_real`, of the
    padding bits past `vocab_size` in the last word)."""
    bits = torch.ones(((vocab_size + 31) // 32) * 32, dtype=torch.bool)
    if only_real:
        bits[vocab_size:] = False
    bits[list(ids)] = False
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    words = (bits.view(-1, 32).to(torch.int64) * weights).sum(-1)  # (words,) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
