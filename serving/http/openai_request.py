"""An OpenAI request body -> what the server is asked for: one `Ask` per choice, each with
its prompt, and how the answer is shaped (`Plan`). Every refusal of a field's value is a
BadRequest naming the field (400), raised before anything is admitted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from serving.engines.seam import SamplingParams, StructuredOutput
from serving.engines.structured import validate as validate_structured
from serving.errors import BadRequest
from serving.http.schemas import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_PROMPTS,
    MAX_STOP,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    unknown_fields,
    unsupported_fields,
)
from serving.runtime.admission import Prompt
from serving.runtime.generation import Ask

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Plan:
    """The choices to run and how to answer: choice `i` of the answer is the best `n` of
    the `per_prompt` candidates of prompt i // n."""

    choices: list[tuple[Prompt, Ask]]
    n: int
    per_prompt: int  # candidates generated per prompt: n, or best_of
    chat: bool
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token the answer shows; None: no logprobs
    echo: bool = False


def check_fields(body: SamplingFields) -> None:
    """400 for a field no reference defines, and for a documented one lorafleet does not
    implement, naming it."""
    unknown = unknown_fields(body)
    if unknown:
        names = ", ".join(unknown)
        raise BadRequest(
            f'unrecognized request argument(s): {names}; remove them (README.md, "OpenAI '
            'compatibility", lists the fields this server takes)',
            param=unknown[0],
        )
    refused = unsupported_fields(body)
    if refused:
        name, instead = refused[0]
        raise BadRequest(f"{name}: not supported by lorafleet; {instead}", param=name)


def completion_plan(body: CompletionRequest) -> Plan:
    check_fields(body)
    prompts = _prompts(body.prompt)
    n = body.n
    per_prompt = body.best_of or n
    if per_prompt < n:
        raise BadRequest(f"best_of {per_prompt} < n {n}; best_of must be >= n", param="best_of")
    if body.stream and per_prompt > n:
        raise BadRequest("best_of > n cannot be streamed; send stream: false", param="best_of")
    _bound_choices(len(prompts) * per_prompt)
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise BadRequest(
            "max_tokens: 0 is only valid with echo (scoring the prompt); ask for at least 1",
            param="max_tokens",
        )
    # best_of ranks candidates by their log-probability, so they carry it.
    logprobs = body.logprobs if body.logprobs is not None or per_prompt == n else 0
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    if max_tokens == 0 and prompt_logprobs is None:  # the engine takes 0 tokens to score
        prompt_logprobs = 0
    params = _params(
        body, logprobs=logprobs, prompt_logprobs=prompt_logprobs, max_tokens=max_tokens
    )
    choices = [
        (prompt, _ask(body, params, i, max_tokens)) for prompt in prompts for i in range(per_prompt)
    ]
    return Plan(
        choices,
        n,
        per_prompt,
        chat=False,
        stream=body.stream,
        include_usage=_include_usage(body),
        logprobs=body.logprobs,
        echo=body.echo,
    )


def chat_plan(body: ChatCompletionRequest) -> tuple[Plan, list[dict[str, Any]]]:
    """The plan, with the conversation to render by the chat template (its prompt is filled
    in by `with_prompt` once rendered)."""
    check_fields(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_tokens
    if body.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != body.max_completion_tokens:
            raise BadRequest(
                f"max_tokens {max_tokens} and max_completion_tokens "
                f"{body.max_completion_tokens} disagree; send one of them",
                param="max_completion_tokens",
            )
        max_tokens = body.max_completion_tokens
    if max_tokens == 0:
        raise BadRequest("max_tokens: ask for at least 1 token", param="max_tokens")
    _bound_choices(body.n)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, logprobs=logprobs, prompt_logprobs=None, max_tokens=max_tokens)
    choices: list[tuple[Prompt, Ask]] = [
        ("", _ask(body, params, i, max_tokens)) for i in range(body.n)
    ]
    plan = Plan(
        choices,
        body.n,
        body.n,
        chat=True,
        stream=body.stream,
        include_usage=_include_usage(body),
        logprobs=logprobs,
    )
    return plan, [_message(i, m) for i, m in enumerate(body.messages)]


def with_prompt(plan: Plan, prompt: str) -> Plan:
    return replace(plan, choices=[(prompt, ask) for _, ask in plan.choices])


def _bound_choices(count: int) -> None:
    if count > MAX_CHOICES:
        raise BadRequest(
            f"the request asks for {count} choices (prompts x n, or best_of); this server "
            f"takes at most {MAX_CHOICES} per request; split it",
            param="n",
        )


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def _prompts(prompt: str | list[str] | list[list[int]] | list[int]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt: the list is empty; send at least one prompt", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [[p for p in prompt if isinstance(p, int)]]
    if len(prompt) > MAX_PROMPTS:
        raise BadRequest(
            f"prompt: {len(prompt)} prompts; this server takes at most {MAX_PROMPTS} per request",
            param="prompt",
        )
    out: list[Prompt] = []
    for p in prompt:
        if isinstance(p, int):
            raise BadRequest(
                "prompt: mixes token ids and lists; send one list of ids or a list of lists",
                param="prompt",
            )
        out.append(p if isinstance(p, str) else list(p))
    return out


def _params(
    body: SamplingFields,
    *,
    logprobs: int | None,
    prompt_logprobs: int | None,
    max_tokens: int | None,
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens or 0,  # admission sets it (None: the rest of the context)
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_p=body.min_p,
        seed=body.seed,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=_logit_bias(body.logit_bias),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured=_structured(body),
    )


def _ask(body: SamplingFields, params: SamplingParams, index: int, max_tokens: int | None) -> Ask:
    """Choice `index`: with a seed, choice i samples with seed + i, so n choices differ and
    each is reproducible."""
    if params.seed is not None and index:
        params = replace(params, seed=params.seed + index)
    return Ask(
        model=body.model,
        params=params,
        max_tokens=max_tokens,
        stops=tuple(_stops(body.stop)),
        include_stop=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise BadRequest(f"stop: takes at most {MAX_STOP} non-empty strings", param="stop")
    return stops


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(
            f"logit_bias: {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias"
        )
    out = []
    for key, value in bias.items():
        if not key.lstrip("-").isdigit():
            raise BadRequest(
                f"logit_bias: key {key!r} is not a token id; keys are token ids as strings",
                param="logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise BadRequest(
                f"logit_bias: bias {value} of token {key} is outside -100..100",
                param="logit_bias",
            )
        out.append((int(key), float(value)))
    return tuple(out)


def _structured(body: SamplingFields) -> StructuredOutput | None:
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        spec = StructuredOutput("json_object")
    else:
        if form.json_schema is None or not form.json_schema.schema_:
            raise BadRequest(
                "response_format.json_schema.schema: missing; send the JSON Schema the "
                "output must follow",
                param="response_format.json_schema",
            )
        spec = StructuredOutput("json_schema", json.dumps(form.json_schema.schema_))
    try:
        validate_structured(spec)
    except ValueError as err:
        raise BadRequest(str(err), param="response_format") from err
    return spec


def _message(index: int, message: ChatMessage) -> dict[str, Any]:
    """One message as chat templates take it: developer is system, content is text, earlier
    tool calls carry their arguments as objects (transformers' convention)."""
    out: dict[str, Any] = {
        "role": "system" if message.role == "developer" else message.role,
        "content": _text(index, message.content),
    }
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [_tool_call(index, j, c) for j, c in enumerate(message.tool_calls)]
    return out


def _text(index: int, content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if kind not in ("text", "refusal"):
            raise BadRequest(
                f"messages[{index}].content[{j}]: {kind!r} parts are not supported by "
                "lorafleet; send text parts",
                param=f"messages[{index}].content[{j}].type",
            )
        if not isinstance(text, str):
            raise BadRequest(
                f"messages[{index}].content[{j}]: a {kind} part needs a string '{kind}' field",
                param=f"messages[{index}].content[{j}]",
            )
        texts.append(text)
    return "\n".join(texts)


def _tool_call(index: int, j: int, call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(
            f"messages[{index}].tool_calls[{j}]: needs function.name",
            param=f"messages[{index}].tool_calls[{j}]",
        )
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise BadRequest(
                f"messages[{index}].tool_calls[{j}].function.arguments: not JSON ({err})",
                param=f"messages[{index}].tool_calls[{j}].function.arguments",
            ) from err
    return {**call, "function": {**function, "arguments": arguments}}
