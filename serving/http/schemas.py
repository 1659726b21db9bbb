"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI defines
them). Unknown fields are refused; every bound is in the schema, so a 422 names the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 262_144
MAX_STOP = 4
MAX_INT64 = 2**63 - 1  # SQLite's and torch's largest integer

Strict = ConfigDict(extra="forbid")


class SamplingFields(BaseModel):
    model_config = Strict
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_INT64)
    n: Literal[1] = 1
    user: str | None = Field(None, max_length=256)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops


class CompletionRequest(SamplingFields):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = Strict
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class FeedbackRequest(BaseModel):
    model_config = Strict
    response_id: str = Field(min_length=1, max_length=100)
    score: float = Field(ge=-1.0, le=1.0, allow_inf_nan=False)
    """-1 (bad) .. 1 (good)."""
    correction: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """The output the response should have had."""


class PromoteRequest(BaseModel):
    model_config = Strict
    adapter: str
    version: int = Field(ge=1, le=MAX_INT64)
    alias: str = "production"
    weight: float | None = Field(None, ge=0.0, le=1.0)
    reason: str = Field("", max_length=1000)


class RollbackRequest(BaseModel):
    model_config = Strict
    adapter: str
    alias: str = "production"
    reason: str = Field("", max_length=1000)


class PinRequest(BaseModel):
    model_config = Strict
    adapter: str
    reason: str = Field("", max_length=1000)


class ModelRequest(BaseModel):
    model_config = Strict
    model: str = Field(min_length=1, max_length=200)
    """NAME, NAME:ALIAS or NAME@VERSION."""


class CanaryRequest(BaseModel):
    model_config = Strict
    adapter: str
    reason: str = Field("", max_length=1000)


class RegisterRequest(BaseModel):
    """POST /admin/adapters/NAME: the adapter's files, each base64-encoded, by file name."""

    model_config = Strict
    files: dict[str, str]
    """File name -> standard base64 of its bytes (adapter_config.json,
    adapter_model.safetensors, optionally lorafleet.json)."""
    alias: str | None = None
    """Point this alias (e.g. production) at the new version once it is registered."""
    reason: str = Field("", max_length=1000)
