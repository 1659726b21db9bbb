"""What tools read from an OpenAI-compatible server, and the tools themselves, against
`openai_fleet`: one `lorafleet serve` (hf engine, tiny base, adapters alpha@1 and beta@1,
both production) that conftest starts once per session and test_openai_sdk.py shares.
Structured outputs (response_format) and logprobs over the openai SDK, then langchain-openai,
lm-evaluation-harness (its API backends against its own `hf` backend) and the request
functions of `vllm bench serve`.

Numbers are held to references, not to "it ran": greedy tokens, logprobs and top-5
alternatives equal log_softmax of transformers + peft in fp32 (conftest's `Reference`,
within 1e-4) for requests sent together so that they share engine batches; lm-eval's
accuracy over the server equals its accuracy over transformers + peft.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

Service = Any  # conftest's Service
Reference = Any  # conftest's Reference

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
TOLERANCE = 1e-4  # logprobs against the fp32 reference
TOP = 5  # alternatives asked for in the parity cases
REVIEWS = [
    "Review: the pizza was great.\nSentiment:",
    "Review: the staff was rude and the room was cold.\nSentiment:",
    "Review: the music was pleasant.\nSentiment:",
]
VERDICT = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "maxLength": 8},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(openai_fleet: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{openai_fleet.url}/v1", api_key="x", max_retries=0) as sdk:
        yield sdk


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---- openai SDK: response_format, structured outputs --------------------------------------


def test_response_format_text_changes_nothing(client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {"model": "beta", "messages": user(REVIEWS[0]), "temperature": 0}
    plain = client.chat.completions.create(max_completion_tokens=6, **ask)
    text = client.chat.completions.create(
        max_completion_tokens=6, response_format={"type": "text"}, **ask
    )
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_json_schema_outputs_parse_and_follow_their_schema(client: openai.OpenAI) -> None:
    import jsonschema

    subjects = "pizza hotel staff music room coffee service bread waiter view".split()
    prompts = [
        f"Review: the {s} was {w}.\nVerdict as JSON:" for s in subjects for w in ("great", "awful")
    ]
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True},
    }

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=str(client.base_url), api_key="x", max_retries=0
        ) as sdk:
            return await asyncio.gather(
                *(
                    sdk.chat.completions.create(
                        model=("alpha", "beta", "base")[i % 3],
                        messages=user(prompt),
                        temperature=0,
                        max_completion_tokens=64,
                        response_format=response_format,
                    )
                    for i, prompt in enumerate(prompts)
                )
            )

    answers = asyncio.run(run())
    assert len(answers) == 20
    for prompt, answer in zip(prompts, answers, strict=True):
        content = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop", (prompt, content)
        jsonschema.validate(json.loads(content), VERDICT)


def test_json_object_outputs_parse_as_objects(
    client: openai.OpenAI, openai_reference: Reference
) -> None:
    # json_object bounds no string or number: greedy, the tiny model writes one string
    # until the budget ends ('{" add wee 1584 tickets ...', finish_reason "length"). A bias
    # towards '"' and '}' closes strings and the object; the grammar still decides the rest.
    quote, brace = (openai_reference.tok.convert_tokens_to_ids(c) for c in ('"', "}"))
    for model in ("alpha", "beta"):
        loose = client.chat.completions.create(
            model=model,
            messages=user(REVIEWS[0] + " Answer in JSON."),
            temperature=0,
            max_completion_tokens=128,
            response_format={"type": "json_object"},
            logit_bias={str(quote): 6, str(brace): 3},
        )
        content = loose.choices[0].message.content or ""
        assert isinstance(json.loads(content), dict), (loose.choices[0].finish_reason, content)


# ---- openai SDK: logprobs against transformers + peft -------------------------------------


def check_top(
    shown: list[tuple[str, float]],
    row: torch.Tensor,
    reference: Reference,
    k: int,
    chosen: int | None = None,
) -> None:
    """Each alternative shown is one of the reference's top k + 1 (or `chosen`, which
    completions always show), by text and logprob, and each of the reference's top k is
    shown. A list (chat) shows the top k values themselves; a dict (completions) keeps one
    entry per text, so tokens of one text (say two pieces of a character, both '\ufffd')
    share an entry."""
    values, ids = row.topk(k + 1)
    candidates = ids.tolist() + ([chosen] if chosen is not None else [])
    known = [(reference.piece(i), float(row[i])) for i in candidates]
    for text, value in shown:
        assert any(t == text and abs(v - value) < TOLERANCE for t, v in known), (text, value)
    assert {t for t, _ in known[:k]} <= {t for t, _ in shown}, (known, shown)
    if chosen is None:
        got = [v for _, v in shown]
        assert got == pytest.approx(values[:k].tolist(), abs=TOLERANCE)


def check_chat(answer: Any, model: str, prompt: list[int], reference: Reference) -> None:
    generated = reference.greedy(model, prompt, 6)
    content = answer.choices[0].logprobs.content
    assert answer.choices[0].message.content == reference.text(generated)
    assert [c.token for c in content] == [reference.piece(t) for t in generated]
    rows = reference.logprobs(model, prompt + generated)
    for j, (entry, token) in enumerate(zip(content, generated, strict=True)):
        row = rows[len(prompt) - 1 + j]
        assert abs(entry.logprob - float(row[token])) < TOLERANCE, (model, j)
        assert len(entry.top_logprobs) == TOP
        check_top([(t.token, t.logprob) for t in entry.top_logprobs], row, reference, TOP)


def check_completion(
    answer: Any, model: str, prompt: list[int], n: int, echo: bool, reference: Reference
) -> None:
    generated = reference.greedy(model, prompt, n)
    logprobs = answer.choices[0].logprobs
    scored = prompt + generated if echo else generated
    start = 0 if echo else len(prompt)  # position in prompt + generated of scored[0]
    assert logprobs.tokens == [reference.piece(t) for t in scored]
    prefix = reference.tok.decode(prompt, skip_special_tokens=True) if echo else ""
    assert answer.choices[0].text == prefix + reference.text(generated)
    rows = reference.logprobs(model, prompt + generated)
    for j, token in enumerate(scored):
        at = start + j
        if at == 0:  # nothing precedes the first prompt token
            assert logprobs.token_logprobs[j] is None and logprobs.top_logprobs[j] is None
            continue
        row = rows[at - 1]
        assert abs(logprobs.token_logprobs[j] - float(row[token])) < TOLERANCE, (model, j)
        shown = logprobs.top_logprobs[j]
        assert reference.piece(token) in shown and len(shown) <= TOP + 1
        check_top(list(shown.items()), row, reference, TOP, chosen=token)
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:j]) for j in range(len(scored))
    ]


def test_logprobs_of_concurrent_requests_equal_transformers_peft(
    client: openai.OpenAI, openai_reference: Reference
) -> None:
    cases: list[tuple[str, str, Any]] = []  # (kind, model, prompt ids)
    for i, model in enumerate(("alpha", "beta", "base")):
        cases.append(("chat", model, REVIEWS[i]))
        for kind in ("echo-0", "echo-3", "plain-3"):
            cases.append((kind, model, openai_reference.ids(REVIEWS[(i + 1) % 3])))

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=str(client.base_url), api_key="x", max_retries=0
        ) as sdk:

            def ask(kind: str, model: str, prompt: Any) -> Any:
                if kind == "chat":
                    return sdk.chat.completions.create(
                        model=model,
                        messages=user(prompt),
                        temperature=0,
                        max_completion_tokens=6,
                        logprobs=True,
                        top_logprobs=TOP,
                    )
                return sdk.completions.create(
                    model=model,
                    prompt=prompt,
                    temperature=0,
                    max_tokens=int(kind[-1]),
                    logprobs=TOP,
                    echo=kind.startswith("echo"),
                )

            return await asyncio.gather(*(ask(*case) for case in cases))

    answers = asyncio.run(run())
    for (kind, model, prompt), answer in zip(cases, answers, strict=True):
        if kind == "chat":
            check_chat(answer, model, openai_reference.chat_ids(user(prompt)), openai_reference)
        else:
            check_completion(
                answer, model, prompt, int(kind[-1]), kind.startswith("echo"), openai_reference
            )


# ---- langchain-openai ---------------------------------------------------------------------


def test_langchain_invoke_stream_and_batch(openai_fleet: Service) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"{openai_fleet.url}/v1",
        api_key="x",
        model="alpha",
        temperature=0,
        max_tokens=8,
        max_retries=0,
        stream_usage=True,  # stream_options.include_usage
    )
    invoked = chat.invoke(REVIEWS[0])
    assert isinstance(invoked.content, str) and invoked.content
    chunks = list(chat.stream(REVIEWS[0]))
    assert "".join(str(c.content) for c in chunks) == invoked.content
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert invoked.usage_metadata is not None and total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == invoked.usage_metadata["output_tokens"]
    assert invoked.usage_metadata["output_tokens"] <= 8
    batch = chat.batch(REVIEWS)
    assert [m.content for m in batch] == [
        invoked.content,
        *(chat.invoke(r).content for r in REVIEWS[1:]),
    ]


# ---- lm-evaluation-harness ---------------------------------------------------------------

CHOICES = ["positive", "negative"]
STRIP = [{"function": "remove_whitespace"}, {"function": "take_first"}]


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Task YAMLs over the first 20 sentiment eval rows: (include_path, number of docs)."""
    root = tmp_path_factory.mktemp("lm-eval")
    rows = [json.loads(line) for line in (EXAMPLES / "sentiment" / "eval.jsonl").open()][:20]
    docs = root / "docs.jsonl"
    labels = [r["completion"].strip() for r in rows]
    docs.write_text(
        "".join(
            json.dumps({**r, "label": label, "gold": CHOICES.index(label)}) + "\n"
            for r, label in zip(rows, labels, strict=True)
        )
    )
    data = {"data_files": {"test": str(docs)}, "cache_dir": str(root / "cache")}
    common = {"dataset_path": "json", "dataset_kwargs": data, "test_split": "test"}
    tasks = {
        "lorafleet_sentiment_choice": {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}",
            "doc_to_choice": CHOICES,
            "doc_to_target": "gold",
            "metric_list": [{"metric": "acc"}],
        },
        "lorafleet_sentiment_generate": {
            **common,
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{label}}",
            "generation_kwargs": {
                "until": ["\n"],
                "max_gen_toks": 6,
                "do_sample": False,
                "temperature": 0.0,
            },
            "filter_list": [{"name": "strip", "filter": STRIP}],
            "metric_list": [{"metric": "exact_match"}],
        },
    }
    for name, task in tasks.items():
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **task}))
    return root, len(rows)


class FailedRequests(logging.Handler):
    """lm-eval's API models log a failed request and retry it; count them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "API request failed" in message or message.startswith("Exception:"):
            self.messages.append(message)


def evaluate(
    model: str, model_args: dict[str, Any], tasks: list[str], root: Path, **kw: Any
) -> Any:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    failed = FailedRequests()
    logger = logging.getLogger("lm_eval")
    logger.addHandler(failed)
    try:
        results = simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=tasks,
            task_manager=TaskManager(include_path=str(root)),
            bootstrap_iters=0,
            log_samples=True,
            random_seed=0,
            **kw,
        )
    finally:
        logger.removeHandler(failed)
    assert results is not None
    assert failed.messages == [], failed.messages[:3]
    return results


def sample_outputs(results: Any, task: str) -> list[Any]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"] for s in samples]


def test_lm_eval_over_the_server_scores_as_over_transformers_peft(
    openai_fleet: Service, tiny_base: Path, lm_eval_tasks: tuple[Path, int]
) -> None:
    root, count = lm_eval_tasks
    tasks = ["lorafleet_sentiment_choice", "lorafleet_sentiment_generate"]
    served = evaluate(
        "local-completions",
        {
            "model": "alpha",
            "base_url": f"{openai_fleet.url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tiny_base),
            "tokenized_requests": True,
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks,
        root,
        batch_size=4,  # several prompts (token id lists) per request
    )
    local = evaluate(
        "hf",
        {
            "pretrained": str(tiny_base),
            "peft": str(openai_fleet.adapters["alpha@1"]),
            "dtype": "float32",
        },
        tasks,
        root,
        device="cpu",
        batch_size=1,
    )
    choice, generate = (served["results"][t] for t in tasks)
    assert choice["acc,none"] == local["results"][tasks[0]]["acc,none"]
    for ours, theirs in zip(
        sample_outputs(served, tasks[0]), sample_outputs(local, tasks[0]), strict=True
    ):
        assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-3)
    assert abs(generate["exact_match,strip"] - local["results"][tasks[1]]["exact_match,strip"]) <= (
        1 / count
    )
    # The server, as vLLM, never hands out an incomplete character at the end of a text;
    # transformers' decode ends such a text with U+FFFD.
    pairs = [
        ([a.rstrip("\ufffd") for a in ours], [b.rstrip("\ufffd") for b in theirs])
        for ours, theirs in zip(
            sample_outputs(served, tasks[1]), sample_outputs(local, tasks[1]), strict=True
        )
    ]
    differ = [pair for pair in pairs if pair[0] != pair[1]]
    assert len(differ) <= 1, differ


def test_lm_eval_chat_completions_run_without_a_failed_request(
    openai_fleet: Service, lm_eval_tasks: tuple[Path, int]
) -> None:
    root, count = lm_eval_tasks
    task = "lorafleet_sentiment_generate"
    results = evaluate(
        "local-chat-completions",
        {
            "model": "alpha",
            "base_url": f"{openai_fleet.url}/v1/chat/completions",
            "num_concurrent": 2,
            "max_retries": 1,
        },
        [task],
        root,
        apply_chat_template=True,
    )
    outputs = sample_outputs(results, task)
    assert len(outputs) == count
    assert all(isinstance(o[0], str) and "LMEVAL" not in o[0] for o in outputs), outputs


# ---- vLLM's benchmark client --------------------------------------------------------------


def test_vllm_bench_request_functions_succeed(
    openai_fleet: Service, openai_reference: Reference
) -> None:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        AIOHTTP_TIMEOUT,
        RequestFuncInput,
        async_request_openai_chat_completions,
        async_request_openai_completions,
    )

    def request(endpoint: str, i: int) -> Any:
        prompt = REVIEWS[i % 3]
        return RequestFuncInput(
            prompt=prompt,
            api_url=f"{openai_fleet.url}/v1/{endpoint}",
            prompt_len=len(openai_reference.ids(prompt)),
            output_len=8,
            model=("alpha", "beta")[i % 2],
            ignore_eos=i < 4,  # `vllm bench serve --ignore-eos`: exactly output_len tokens
        )

    async def run() -> list[Any]:
        async with aiohttp.ClientSession(timeout=AIOHTTP_TIMEOUT) as session:
            texts = [
                async_request_openai_completions(request("completions", i), session)
                for i in range(8)
            ]
            chats = [
                async_request_openai_chat_completions(request("chat/completions", i), session)
                for i in range(8)
            ]
            return await asyncio.gather(*texts, *chats)

    outputs = asyncio.run(run())
    for i, output in enumerate(outputs):
        assert output.success, output.error
        assert output.ttft > 0 and output.latency >= output.ttft
        assert 0 < output.output_tokens <= 8
        if i % 8 < 4:
            assert output.output_tokens == 8, i
        assert output.generated_text
