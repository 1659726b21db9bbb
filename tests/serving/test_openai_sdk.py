"""The openai SDK (sync and async) against `openai_fleet`: one `lorafleet serve` (hf engine,
tiny base, adapters alpha@1 and beta@1, both production) that conftest starts once per
session and test_openai_tools.py shares. Shapes, streaming and usage; the sampling fields
(n and best_of with a seed, penalties and logit_bias, stop, the forms of a prompt, vLLM's
extensions); models.retrieve and the refusals by name; every parameter of the installed
SDK's create() known to the server, and null asking for its default.

Numbers are held to references, not to "it ran": greedy texts equal transformers + peft in
fp32 (conftest's `Reference`), penalties and logit_bias the same reference with OpenAI's
rule applied. Structured outputs and the parity of logprobs are in test_openai_tools.py.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import openai
import pytest

Service = Any  # conftest's Service
Reference = Any  # conftest's Reference

REVIEWS = [
    "Review: the pizza was great.\nSentiment:",
    "Review: the staff was rude and the room was cold.\nSentiment:",
    "Review: the music was pleasant.\nSentiment:",
]


@pytest.fixture(scope="module")
def client(openai_fleet: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{openai_fleet.url}/v1", api_key="x", max_retries=0) as sdk:
        yield sdk


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---- openai SDK: shapes, streaming, usage -------------------------------------------------


def test_sync_chat_and_completions_stream_what_they_answer_whole(
    client: openai.OpenAI, openai_reference: Reference
) -> None:
    chat = client.chat.completions.create(
        model="alpha", messages=user(REVIEWS[0]), temperature=0, max_completion_tokens=6
    )
    expected = openai_reference.greedy("alpha", openai_reference.chat_ids(user(REVIEWS[0])), 6)
    assert chat.choices[0].message.content == openai_reference.text(expected)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == len(expected)
    streamed = client.chat.completions.create(
        model="alpha",
        messages=user(REVIEWS[0]),
        temperature=0,
        max_completion_tokens=6,
        stream=True,
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == openai_reference.text(
        expected
    )
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    prompt = openai_reference.ids(REVIEWS[1])
    whole = client.completions.create(model="beta", prompt=prompt, temperature=0, max_tokens=6)
    assert whole.choices[0].text == openai_reference.text(
        openai_reference.greedy("beta", prompt, 6)
    )
    pieces = client.completions.create(
        model="beta", prompt=prompt, temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text


def test_async_client_answers_as_the_sync_one(client: openai.OpenAI) -> None:
    ask = {"model": "beta", "messages": user(REVIEWS[2]), "temperature": 0, "max_tokens": 5}
    chat = client.chat.completions.create(**ask)
    completion = client.completions.create(
        model="alpha", prompt=REVIEWS[2], temperature=0, max_tokens=5
    )

    async def run() -> tuple[str, str, str]:
        async with openai.AsyncOpenAI(
            base_url=str(client.base_url), api_key="x", max_retries=0
        ) as sdk:
            whole = await sdk.chat.completions.create(**ask)
            stream = await sdk.chat.completions.create(**ask, stream=True)
            deltas = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            text = await sdk.completions.create(
                model="alpha", prompt=REVIEWS[2], temperature=0, max_tokens=5
            )
            return whole.choices[0].message.content or "", "".join(deltas), text.choices[0].text

    whole, streamed, text = asyncio.run(run())
    assert whole == streamed == chat.choices[0].message.content
    assert text == completion.choices[0].text


def test_max_completion_tokens_bounds_the_answer(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="alpha",
        messages=user(REVIEWS[0]),
        temperature=0,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert answer.choices[0].finish_reason == "length"


def test_content_parts_are_their_texts_joined_by_newlines(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "Review: the pizza"}, {"type": "text", "text": "was great."}]
    asked = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": parts}],
        temperature=0,
        max_completion_tokens=6,
    )
    joined = client.chat.completions.create(
        model="alpha",
        messages=user("Review: the pizza\nwas great."),
        temperature=0,
        max_completion_tokens=6,
    )
    assert asked.choices[0].message.content == joined.choices[0].message.content
    assert asked.usage == joined.usage


def test_developer_tool_roles_and_earlier_tool_calls(
    client: openai.OpenAI, openai_reference: Reference
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    conversation: list[dict[str, Any]] = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    answer = client.chat.completions.create(
        model="beta",
        messages=conversation,
        temperature=0,
        max_completion_tokens=5,
    )
    # developer is rendered as system; an assistant turn without content as empty text.
    rendered = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(openai_reference.chat_ids(rendered))
    as_system = client.chat.completions.create(
        model="beta",
        messages=[{**conversation[0], "role": "system"}, *conversation[1:]],
        temperature=0,
        max_completion_tokens=5,
    )
    assert answer.choices[0].message.content == as_system.choices[0].message.content


def test_include_usage_ends_the_stream_with_the_usage_of_the_whole_answer(
    client: openai.OpenAI,
) -> None:
    ask: dict[str, Any] = {"model": "alpha", "temperature": 0, "max_tokens": 7}
    whole_chat = client.chat.completions.create(messages=user(REVIEWS[1]), **ask)
    chat_chunks = list(
        client.chat.completions.create(
            messages=user(REVIEWS[1]),
            stream=True,
            stream_options={"include_usage": True},
            **ask,
        )
    )
    whole_text = client.completions.create(prompt=REVIEWS[1], **ask)
    text_chunks = list(
        client.completions.create(
            prompt=REVIEWS[1], stream=True, stream_options={"include_usage": True}, **ask
        )
    )
    for chunks, whole in ((chat_chunks, whole_chat), (text_chunks, whole_text)):
        last = chunks[-1]
        assert last.choices == []
        assert last.usage is not None and whole.usage is not None
        assert last.usage.model_dump() == whole.usage.model_dump()
        assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks[:-1]) == (
        whole_chat.choices[0].message.content
    )
    assert "".join(c.choices[0].text for c in text_chunks[:-1]) == whole_text.choices[0].text


# ---- openai SDK: sampling fields ----------------------------------------------------------


def test_n_with_a_seed_gives_choice_i_the_seed_plus_i(client: openai.OpenAI) -> None:
    def sample(n: int, seed: int) -> list[str]:
        answer = client.chat.completions.create(
            model="alpha",
            messages=user(REVIEWS[0]),
            n=n,
            seed=seed,
            temperature=1.0,
            max_completion_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in answer.choices] == list(range(n))
        return [c.message.content or "" for c in answer.choices]

    three = sample(3, 7)
    assert sample(3, 7) == three  # reproducible
    assert len(set(three)) > 1  # and the choices differ
    assert sample(1, 7) == three[:1]
    assert sample(1, 8) == three[1:2]


def test_best_of_shows_the_candidates_of_highest_logprob(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {
        "model": "beta",
        "prompt": REVIEWS[2],
        "temperature": 1.0,
        "seed": 3,
        "max_tokens": 6,
    }
    # The candidates of best_of=3 are the choices of n=3 with the same seed (seed + i).
    candidates = client.completions.create(n=3, logprobs=0, **ask).choices
    ranked = sorted(
        candidates,
        key=lambda c: -sum(c.logprobs.token_logprobs),
    )
    best = client.completions.create(best_of=3, n=1, **ask)
    assert [c.text for c in best.choices] == [ranked[0].text]
    two = client.completions.create(best_of=3, n=2, **ask)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [c.text for c in ranked[:2]]
    assert two.usage is not None  # every candidate's tokens are counted
    assert two.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in candidates)


def test_penalties_and_logit_bias_follow_openais_rule(
    client: openai.OpenAI, openai_reference: Reference
) -> None:
    prompt = openai_reference.ids(REVIEWS[0])
    penalised = client.completions.create(
        model="alpha",
        prompt=prompt,
        temperature=0,
        max_tokens=10,
        frequency_penalty=1.5,
        presence_penalty=0.5,
    )
    expected = openai_reference.greedy("alpha", prompt, 10, frequency=1.5, presence=0.5)
    assert penalised.choices[0].text == openai_reference.text(expected)

    forced = openai_reference.ids(" positive")[0]
    answer = client.completions.create(
        model="alpha", prompt=prompt, temperature=0, max_tokens=4, logit_bias={str(forced): 100}
    )
    assert answer.choices[0].text == openai_reference.text([forced] * 4)
    first = openai_reference.greedy("alpha", prompt, 1)[0]
    banned = client.completions.create(
        model="alpha", prompt=prompt, temperature=0, max_tokens=4, logit_bias={str(first): -100}
    )
    assert banned.choices[0].text == openai_reference.text(
        openai_reference.greedy("alpha", prompt, 4, bias={first: -100.0})
    )


def test_stop_ends_the_text_before_the_stop_string(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {"model": "beta", "prompt": REVIEWS[0], "temperature": 0}
    full = client.completions.create(max_tokens=12, extra_body={"ignore_eos": True}, **ask)
    text = full.choices[0].text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 1) if text[i : i + 2].strip())
    cut = client.completions.create(max_tokens=12, stop=[stop], **ask)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kept = client.completions.create(
        max_tokens=12, stop=stop, extra_body={"include_stop_str_in_output": True}, **ask
    )
    assert kept.choices[0].text == text[: text.index(stop)] + stop


def test_prompt_forms_and_the_order_of_their_choices(
    client: openai.OpenAI, openai_reference: Reference
) -> None:
    a, b = REVIEWS[0], REVIEWS[1]

    def texts(prompt: Any, n: int = 1) -> list[str]:
        answer = client.completions.create(
            model="alpha", prompt=prompt, n=n, temperature=0, max_tokens=5
        )
        assert [c.index for c in answer.choices] == list(range(len(answer.choices)))
        return [c.text for c in answer.choices]

    [text_a], [text_b] = texts(a), texts(b)
    assert texts([a, b], n=2) == [text_a, text_a, text_b, text_b]  # prompt_index * n + j
    assert texts(openai_reference.ids(a)) == [text_a]
    assert texts([openai_reference.ids(b), openai_reference.ids(a)]) == [text_b, text_a]
    stream = client.completions.create(
        model="alpha",
        prompt=[openai_reference.ids(a), openai_reference.ids(b)],
        temperature=0,
        max_tokens=5,
        stream=True,
    )
    streamed = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [text_a, text_b]
    usage = client.completions.create(model="alpha", prompt=[a, b], max_tokens=1).usage
    assert usage is not None
    assert usage.prompt_tokens == len(openai_reference.ids(a)) + len(openai_reference.ids(b))


def test_vllm_extensions_top_k_and_ignore_eos(client: openai.OpenAI) -> None:
    greedy = client.completions.create(
        model="alpha", prompt=REVIEWS[2], temperature=0, max_tokens=6
    )
    top_1 = client.completions.create(
        model="alpha",
        prompt=REVIEWS[2],
        temperature=1.0,
        max_tokens=6,
        extra_body={"top_k": 1, "repetition_penalty": 1.0, "min_p": 0.0},
    )
    assert top_1.choices[0].text == greedy.choices[0].text
    long = client.completions.create(
        model="alpha",
        prompt=REVIEWS[2],
        temperature=1.0,
        seed=1,
        max_tokens=20,
        extra_body={"ignore_eos": True, "min_tokens": 20},
    )
    assert long.usage is not None and long.usage.completion_tokens == 20


# ---- openai SDK: models and refusals ------------------------------------------------------


def test_models_retrieve_every_kind_of_name(client: openai.OpenAI) -> None:
    assert client.models.retrieve("base").id == "base"
    alpha = client.models.retrieve("alpha")
    assert (alpha.id, alpha.object, alpha.owned_by) == ("alpha", "model", "lorafleet")
    assert alpha.model_extra is not None and alpha.model_extra["version"] == 1
    for name in ("alpha:production", "alpha@1", "beta@1"):
        model = client.models.retrieve(name)
        assert model.id == name
        assert model.model_extra is not None
        adapter = name.split("@")[0].split(":")[0]
        assert (model.model_extra["adapter"], model.model_extra["version"]) == (adapter, 1)
    refusals = {
        "gamma": "models: base, alpha, beta",
        "alpha@7": "active versions: 1",
        "alpha:canary": "its aliases: alpha:production -> 1",
    }
    for name, what_exists in refusals.items():
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(name)
        assert name.split(":")[-1] in missing.value.message
        assert what_exists in missing.value.message


def test_a_bare_name_retrieves_its_entry_of_the_model_list(client: openai.OpenAI) -> None:
    """NAME (which serves NAME:production) is the adapter itself: its /v1/models entry,
    with the version it serves now."""
    listed = {m.id: m.model_dump() for m in client.models.list().data}
    assert client.models.retrieve("alpha").model_dump() == {**listed["alpha"], "version": 1}


def test_unknown_fields_and_tools_are_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model="alpha", messages=user("hi"), extra_body={"colour": "blue"}
        )
    assert "colour" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as unknown_text:
        client.completions.create(model="alpha", prompt="hi", extra_body={"flavour": 1})
    assert "flavour" in unknown_text.value.message
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="alpha",
            messages=user("hi"),
            tools=[tool],
        )
    assert "tools" in tools.value.message
    assert "not supported by lorafleet" in tools.value.message


@pytest.fixture(scope="module")
def null_answers(client: openai.OpenAI, openai_fleet: Service) -> dict[str, Any]:
    """{"ENDPOINT.NAME": response} of a request setting one parameter of the installed
    SDK's create() to null (the SDK types every one as Optional)."""
    transport = {"extra_headers", "extra_query", "extra_body", "timeout"}
    endpoints = [
        (
            "chat/completions",
            client.chat.completions.create,
            {"model": "alpha", "messages": user("hi")},
        ),
        ("completions", client.completions.create, {"model": "alpha", "prompt": "hi"}),
    ]
    answers = {}
    for endpoint, create, required in endpoints:
        for name in sorted(set(inspect.signature(create).parameters) - transport - set(required)):
            body = {**required, "max_tokens": 1, name: None}
            answers[f"{endpoint}.{name}"] = openai_fleet.http.post(f"/v1/{endpoint}", json=body)
    return answers


def test_every_parameter_of_the_installed_sdk_is_a_field_the_server_knows(
    client: openai.OpenAI,
) -> None:
    """Each parameter of the installed SDK's create() is a declared field (implemented,
    ignored or refused by name), never an "unrecognized request argument". Checked on the
    schemas: a null value is dropped before unknown fields are looked for, so a request
    could not tell."""
    from serving.http.schemas import ChatCompletionRequest, CompletionRequest

    transport = {"extra_headers", "extra_query", "extra_body", "timeout"}
    for create, schema in (
        (client.chat.completions.create, ChatCompletionRequest),
        (client.completions.create, CompletionRequest),
    ):
        parameters = set(inspect.signature(create).parameters) - transport
        assert parameters - set(schema.model_fields) == set(), schema.__name__


def test_a_null_parameter_asks_for_its_default(null_answers: dict[str, Any]) -> None:
    """OpenAI's reference marks these fields nullable and the SDK sends None as null."""
    refused = {
        name: response.json()["error"]["message"]
        for name, response in null_answers.items()
        if response.status_code != 200 and "unrecognized" not in response.text
    }
    assert refused == {}
