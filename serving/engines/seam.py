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
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # resident key NAME@VERSION, or None for the base model


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, or the end of a request (token None, finish_reason set)."""

    token_id: int | None
    finish_reason: FinishReason | None = None
    error: str | None = None


OnEvent = Callable[[TokenEvent], None]


class Engine(Protocol):
    """One base model plus resident adapters; all methods are safe to call from any thread."""

    max_rank: int
    adapter_slots: int

    def submit(self, request: GenerationRequest, on_event: OnEvent) -> None:
        """Queue a request; raises Overloaded when the queue is full."""

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone); its slot is freed at the next step."""

    def load_adapter(self, key: str, directory: Path) -> None:
        """Make `key` resident (blocks until it can serve); NotServable if it cannot."""

    def unload_adapter(self, key: str) -> None:
        """Free `key`'s slot once no admitted request uses it."""

    def resident(self) -> list[str]:
        """Keys of the resident adapters."""

    def shutdown(self) -> None:
        """Finish nothing more; end every request with 'cancelled'; stop the thread."""
