"""Request and response bodies of the HTTP API, OpenAI-compatible where OpenAI defines them.

Every request field of OpenAI's Chat Completions and Completions references is declared
here, and so are the vLLM extensions its clients send. Each field is implemented, accepted
and ignored where ignoring cannot change the output (`user`, `metadata`, ...), or refused
with a 400 naming it ("not supported by lorafleet": `UNSUPPORTED`). A field no reference
defines is refused with a 400 naming it, as OpenAI does (`unknown_fields`). Bounds are in
the schema, so a 422 names the field and its bound. The table in README.md follows this
module.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_PROMPT_CHARS = 262_144
MAX_STOP = 4
MAX_INT64 = 2**63 - 1  # SQLite's and torch's largest integer
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs (vLLM's default max_logprobs too)
MAX_CHOICES = 128  # prompts x n (or best_of) of one request
MAX_PROMPTS = 128
MAX_LOGIT_BIAS = 300  # entries of logit_bias

Strict = ConfigDict(extra="forbid")
# OpenAI's request bodies: unknown fields are kept so that `unknown_fields` can name them in
# a 400, OpenAI's answer, instead of pydantic's 422.
Open = ConfigDict(extra="allow")


def too_long() -> PydanticCustomError:
    """pydantic's own error for a string over MAX_PROMPT_CHARS (the text of max_length)."""
    return PydanticCustomError(
        "string_too_long",
        "String should have at most {max_length} characters",
        {"max_length": MAX_PROMPT_CHARS},
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # options it does not use change nothing
    include_usage: bool = False
    """A last chunk with the request's usage and no choices; every other chunk has
    "usage": null."""


class JsonSchemaFormat(BaseModel):
    model_config = Open
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = Open
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """Fields of both endpoints."""

    model_config = Open

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """null means the default: OpenAI's SDK sends it for a parameter given as None."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=0)
    """None: 16 on completions (OpenAI's default); on chat, the rest of the context up to
    the server's --max-tokens-limit. 0 only with echo (scoring the prompt)."""
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_INT64)
    """Choice i of a request with n > 1 samples with seed + i."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias in -100..100 added to its logit."""
    response_format: ResponseFormat | None = None
    # Accepted and ignored: they cannot change the output.
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    # vLLM's extensions (its clients send them).
    top_k: int = Field(-1, ge=-1)
    """-1 or 0: off."""
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[list[int]] | list[int]
    """A string, a list of strings, a list of token ids or a list of such lists: one
    choice (n choices) per prompt."""
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, prompt: Any) -> Any:
        texts = [prompt] if isinstance(prompt, str) else prompt
        for text in texts:
            if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
                raise too_long()
        return prompt


class ChatMessage(BaseModel):
    model_config = Open
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    """A string or a list of parts; only text parts ({"type": "text", "text": ...})."""
    name: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant's earlier calls, rendered by the chat template."""
    tool_call_id: str | None = None
    refusal: str | None = None
    function_call: dict[str, Any] | None = None  # deprecated by OpenAI; refused
    audio: dict[str, Any] | None = None  # refused

    @field_validator("content")
    @classmethod
    def _bounded(cls, content: Any) -> Any:
        parts = (
            [content]
            if isinstance(content, str)
            else [p.get("text") for p in content or [] if isinstance(p, dict)]
        )
        if sum(len(p) for p in parts if isinstance(p, str)) > MAX_PROMPT_CHARS:
            raise too_long()
        return content


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The same as max_tokens (OpenAI's current name)."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_options: dict[str, Any] | None = None  # ignored: caching changes no output
    # Refused when set (UNSUPPORTED).
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    moderation: dict[str, Any] | None = None


# Documented fields lorafleet does not implement, with what to do instead. A field is
# refused only when its value asks for something: null (and the values below that ask for
# nothing) pass.
UNSUPPORTED: dict[str, str] = {
    "audio": "send and receive text",
    "modalities": 'ask for ["text"] or leave it out',
    "prediction": "leave it out (predicted outputs only speed up a model that has them)",
    "web_search_options": "search outside and put the results in the messages",
    "functions": "describe the function in a system message",
    "function_call": "describe the function in a system message",
    "tools": "describe the tools in a system message",
    "tool_choice": 'leave it out or send "none"',
    "reasoning_effort": "leave it out (the served models have no reasoning effort)",
    "verbosity": "leave it out and ask for the length in the prompt",
    "moderation": "moderate outside: no moderation model runs here",
    "suffix": "put the text after the insertion point in the prompt",
}
NO_ASK: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "tools": ([],),
    "tool_choice": ("none", "auto"),  # "auto" without tools: no tool can be called
    "suffix": ("",),
}


def unsupported_fields(body: BaseModel) -> list[tuple[str, str]]:
    """(field, what to do) for each documented field the request sets that lorafleet does
    not implement, including fields of its messages (unknown fields are refused before)."""
    found = []
    for name in body.model_fields_set & UNSUPPORTED.keys():
        value = getattr(body, name)
        if value is not None and value not in NO_ASK.get(name, ()):
            found.append((name, UNSUPPORTED[name]))
    for i, message in enumerate(getattr(body, "messages", None) or []):
        for name in ("audio", "function_call"):
            if getattr(message, name) is not None:
                found.append((f"messages[{i}].{name}", UNSUPPORTED[name]))
    return found


def unknown_fields(body: BaseModel) -> list[str]:
    """Paths of the fields no reference defines (`colour`, `messages[0].colour`)."""
    found = [str(k) for k in (body.model_extra or {})]
    form = getattr(body, "response_format", None)
    if form is not None:
        found += [f"response_format.{k}" for k in (form.model_extra or {})]
    for i, message in enumerate(getattr(body, "messages", None) or []):
        found += [f"messages[{i}].{k}" for k in (message.model_extra or {})]
    return found


class FeedbackRequest(BaseModel):
    model_config = Strict
    response_id: str = Field(min_length=1, max_length=100)
    score: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
    """-1 (bad) .. 1 (good); may be left out when `label` is given."""
    correction: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """The output the response should have had."""
    label: str | None = Field(None, min_length=1, max_length=1000)
    """A classified text's true label (its correction; score 1 if predicted, else -1)."""

    @model_validator(mode="after")
    def _score_or_label(self) -> FeedbackRequest:
        if self.score is None and self.label is None:
            raise ValueError("give a score (-1..1) or, for a classified text, its label")
        return self


class ClassifyRequest(BaseModel):
    """vLLM's classification API (`/classify`), the fields its clients send."""

    model_config = Strict
    model: str = Field(min_length=1, max_length=1000)
    input: str | list[str] | list[int] | list[list[int]]
    """A text, texts, or token ids (one list per text)."""
    user: str | None = None
    """Accepted and ignored."""
    add_special_tokens: bool = True
    """Add the tokenizer's special tokens (BOS) to each text, as training did."""
    use_activation: bool | None = None
    """Softmax probabilities (default) or, with false, the head's raw logits."""

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        items = (
            [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        )
        if not items:
            raise ValueError("input is empty; send a text or a list of texts")
        if len(items) > MAX_PROMPTS:
            raise ValueError(f"input has {len(items)} texts; send at most {MAX_PROMPTS} at once")
        if any(isinstance(i, str) and len(i) > MAX_PROMPT_CHARS for i in items):
            raise too_long()
        return value

    def texts(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]  # one text or one list of token ids
        return list(value)  # type: ignore[arg-type]  # texts or lists of token ids


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
