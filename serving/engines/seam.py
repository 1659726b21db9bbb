"""The engine seam: what the service needs from an inference engine.

An engine owns the base model and a bounded set of resident adapter versions, each under a
unique key (`NAME@VERSION`: weights are never replaced under a key already served). Requests
are submitted from any thread; tokens come back through a callback, called on the engine's
own thread, which must only hand them over (e.g. to an asyncio queue) and return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class StructuredOutput:
    """Constrained decoding: every token keeps the output a prefix of valid JSON
    (`json_object`: any JSON object; `json_schema`: an instance of `schema`, JSON text)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Penalties, bias, top-k/min-p and the grammar shape the
    distribution that is sampled (or argmax-ed when temperature is 0); log-probabilities are
    always the model's own, log_softmax of its raw logits (vLLM's "raw_logprobs")."""

    max_new_tokens: int = 64  # 0 only with prompt_logprobs (scoring a prompt)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    frequency_penalty: float = 0.0  # OpenAI's: - count * f - (count > 0) * p, generated tokens
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers'/vLLM's: prompt and generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens
    ignore_eos: bool = False  # EOS does not end the request (stop_token_ids still do)
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the top k
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's, and top k
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model and the `top` alternatives, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # resident key NAME@VERSION, or None for the base model


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, or the end of a request (token None, finish_reason set).

    `logprob` comes with each token when the request asked for logprobs. The first event of
    a request that asked for prompt_logprobs (a token, or the end when max_new_tokens is 0)
    carries one entry per prompt token, None for the first (nothing precedes it)."""

    token_id: int | None
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


OnEvent = Callable[[TokenEvent], None]


@dataclass(frozen=True)
class ClassifyRequest:
    """One text through a classification adapter: its head's logits at the prompt's last
    token (the caller drops trailing padding tokens, as transformers' pooling skips them)."""

    request_id: str
    prompt_ids: list[int]
    adapter: str  # resident key NAME@VERSION of a classifier


@dataclass(frozen=True)
class ClassifyResult:
    """The head's raw logits (fp32, one per label), or the error that ended the request."""

    logits: tuple[float, ...] = ()
    error: str | None = None


OnClassified = Callable[[ClassifyResult], None]


class Engine(Protocol):
    """One base model plus resident adapters; all methods are safe to call from any thread."""

    max_rank: int
    adapter_slots: int

    def submit(self, request: GenerationRequest, on_event: OnEvent) -> None:
        """Queue a request; raises Overloaded when the queue is full."""

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone); its slot is freed at the next step."""

    def classify(self, request: ClassifyRequest, on_done: OnClassified) -> None:
        """Queue a classification; NotServable when the engine or the adapter cannot."""

    def load_adapter(self, key: str, directory: Path) -> None:
        """Make `key` resident (blocks until it can serve); NotServable if it cannot."""

    def unload_adapter(self, key: str) -> None:
        """Free `key`'s slot once no admitted request uses it."""

    def resident(self) -> list[str]:
        """Keys of the resident adapters."""

    def shutdown(self) -> None:
        """Finish nothing more; end every request with 'cancelled'; stop the thread."""
