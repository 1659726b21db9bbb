"""Typed errors of the serving side; the HTTP layer maps each to a status code."""

from __future__ import annotations

from registry.errors import LorafleetError


class NotServable(LorafleetError):
    """The adapter cannot be served by this engine (feature, rank or base mismatch): 409."""


class Overloaded(LorafleetError):
    """The engine's queue is full: 503 with Retry-After."""


class NoFreeSlot(LorafleetError):
    """Every adapter slot of the engine is taken; unload one first (residency does this)."""


class EngineStopped(LorafleetError):
    """The engine was shut down."""


class BadRequest(LorafleetError):
    """A request parameter is outside what this server accepts: 400 naming the field
    (`param`, OpenAI's error field, where one field is at fault)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Unauthorized(LorafleetError):
    """An admin call without the server's API key: 401."""


class AdminCallFailed(LorafleetError):
    """A CLI call to a running server's admin API failed: unreachable, 401, unknown model."""


class AdapterTooLarge(LorafleetError):
    """An uploaded adapter decodes to more bytes than the server accepts: 413."""
