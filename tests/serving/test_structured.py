"""Constrained decoding (serving/engines/structured.py) on the tiny model's real logits:
greedy outputs under a schema parse and validate, masks touch only their rows, bad schemas
fail with a message naming the problem, and compiled grammars are cached."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.engines.seam import StructuredOutput
from serving.engines.structured import Compiled, Grammars, validate

PERSON = {
    "type": "object",
    "properties": {
        # Bounded: a random model never closes a string or stops adding digits by itself.
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_SPEC = StructuredOutput("json_schema", json.dumps(PERSON))
OBJECT_SPEC = StructuredOutput("json_object")
TOPICS = (
    "cats dogs rain sun moon tea code river stone wind fire snow leaf bird fish tree road "
    "book song door"
).split()
PROMPTS = [f"Describe {topic} as JSON, please. Answer {i}:" for i, topic in enumerate(TOPICS)]
BUDGET = 120  # new tokens per prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_base))


@pytest.fixture(scope="module")
def model(tiny_base: Path) -> Iterator[Any]:
    # One thread: the tiny model's matmuls are too small to split, and on a busy 2-core
    # host two threads' spin-waits made a step 25x slower (113 vs 4.4 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grammars(tokenizer: Any, model: Any) -> Grammars:
    return Grammars(tokenizer, model.config.vocab_size)


def generate(
    model: Any,
    grammars: Grammars,
    compiled: Compiled,
    prompt: list[int],
    bias: dict[int, float] | None = None,
) -> tuple[list[int], bool]:
    """Greedy tokens under the grammar (after adding `bias` to the logits, as a client's
    logit_bias would), and whether the matcher terminated within BUDGET."""
    matcher = grammars.matcher(compiled)
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(BUDGET):
            step = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = step.past_key_values
            logits = step.logits[:, -1, :].float()  # (1, vocab)
            for token, value in (bias or {}).items():
                logits[0, token] += value
            grammars.mask(logits, [(0, matcher)])
            token = int(logits.argmax())
            assert matcher.accept(token), f"the mask allowed token {token}, accept refused it"
            out.append(token)
            if matcher.terminated:
                return out, True
            ids = torch.tensor([[token]])
    return out, False


def test_schema_outputs_parse_and_validate(model: Any, tokenizer: Any, grammars: Grammars) -> None:
    compiled = grammars.compile(PERSON_SPEC)
    outputs = []
    for prompt in PROMPTS:
        tokens, terminated = generate(model, grammars, compiled, tokenizer(prompt)["input_ids"])
        text = tokenizer.decode(tokens)
        assert terminated, f"{prompt!r}: no complete JSON in {BUDGET} tokens: {text!r}"
        value = json.loads(text)
        jsonschema.validate(value, PERSON)
        assert text == json.dumps(value, ensure_ascii=False)  # compact: json.dumps' layout
        outputs.append(text)
    assert len(set(outputs)) > 1  # the prompts steer the model: not one canned answer


def test_json_object_outputs_parse_as_objects(
    model: Any, tokenizer: Any, grammars: Grammars
) -> None:
    """The grammar cannot bound a json_object's strings, and this random model, greedy, never
    picks the vocabulary's one '"' token to close one (0 of 20 prompts in 600 tokens); a
    bias of 3 on '"' and '}' makes it close what it opens, as a trained model does."""
    compiled = grammars.compile(OBJECT_SPEC)
    closers = {tokenizer.convert_tokens_to_ids(t): 3.0 for t in ('"', "}")}
    outputs = []
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt)["input_ids"]
        tokens, terminated = generate(model, grammars, compiled, prompt_ids, closers)
        text = tokenizer.decode(tokens)
        assert terminated, f"{prompt!r}: no complete JSON in {BUDGET} tokens: {text!r}"
        assert isinstance(json.loads(text), dict)
        outputs.append(text)
    assert len(set(outputs)) > 1


def test_json_object_admits_a_real_object_and_then_only_eos(
    tokenizer: Any, grammars: Grammars
) -> None:
    text = json.dumps({"a": [1, -2.5e3, {"b": None}], "c": 'x "y" z', "d": True, "e": {}})
    matcher = grammars.matcher(grammars.compile(OBJECT_SPEC))
    vocab = grammars.vocab_size
    for token in tokenizer(text)["input_ids"]:
        logits = torch.zeros(1, vocab)
        grammars.mask(logits, [(0, matcher)])
        assert logits[0, token] == 0, f"token {token} of {text!r} masked"
        assert not matcher.terminated
        assert matcher.accept(token)
    assert matcher.terminated
    logits = torch.zeros(1, vocab)
    grammars.mask(logits, [(0, matcher)])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    assert matcher.accept(tokenizer.eos_token_id)
    assert matcher.terminated


def test_control_characters_are_never_allowed(tokenizer: Any, grammars: Grammars) -> None:
    """xgrammar 0.2.8 lets a raw "\x1e" into a string with maxLength; json.loads refuses it."""
    (control,) = tokenizer("\x1e")["input_ids"]
    matcher = grammars.matcher(grammars.compile(PERSON_SPEC))
    for token in tokenizer('{"name": "ab')["input_ids"]:
        assert matcher.accept(token)
    logits = torch.zeros(1, grammars.vocab_size)
    grammars.mask(logits, [(0, matcher)])
    assert logits[0, control] == float("-inf")
    assert logits[0, tokenizer.convert_tokens_to_ids('"')] == 0
    assert not matcher.accept(control)


def test_terminated_waits_while_the_json_can_go_on(tokenizer: Any, grammars: Grammars) -> None:
    spec = StructuredOutput("json_schema", '{"type": "integer", "maximum": 500}')
    matcher = grammars.matcher(grammars.compile(spec))
    one, two, three = (tokenizer.convert_tokens_to_ids(d) for d in "123")
    assert not matcher.accept(tokenizer.convert_tokens_to_ids("a"))
    assert matcher.accept(one) and matcher.accept(two)
    assert not matcher.terminated  # "12" is whole, but "123" may follow
    assert matcher.accept(three)
    assert matcher.terminated  # "1230" would exceed the maximum


def test_mask_touches_only_rows_with_a_matcher(tokenizer: Any, grammars: Grammars) -> None:
    vocab = grammars.vocab_size
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    person = grammars.compile(PERSON_SPEC)
    grammars.mask(logits, [(1, grammars.matcher(person)), (3, grammars.matcher(person))])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    for row in (1, 3):
        allowed = torch.isfinite(logits[row])
        assert torch.equal(logits[row][allowed], before[row][allowed])
        ids = allowed.nonzero().flatten().tolist()
        assert ids and all(tokenizer.decode([i]).startswith("{") for i in ids)
        assert tokenizer.eos_token_id not in ids


def test_padded_vocab_is_masked(tokenizer: Any) -> None:
    """Logits wider than the tokenizer (a padded lm_head): ids past it are never allowed."""
    grammars = Grammars(tokenizer, 4096)
    logits = torch.zeros(2, 4096)
    grammars.mask(logits, [(0, grammars.matcher(grammars.compile(OBJECT_SPEC)))])
    assert torch.isinf(logits[0, len(tokenizer) :]).all()
    assert torch.isfinite(logits[0, : len(tokenizer)]).any()
    assert torch.equal(logits[1], torch.zeros(4096))


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ('{"type": "bogus"}', 'Unsupported type "bogus"'),
        ('{"type": "integer", "minimum": 5, "maximum": 1}', "minimum greater than maximum"),
        ('{"type": "string", "pattern": "("}', "parenthesis is not closed"),
        ('{"type": ', "not valid JSON"),
        ("[1]", "must be a JSON object, got list"),
        (None, "missing"),
    ],
)
def test_invalid_schema_names_the_problem(
    grammars: Grammars, schema: str | None, problem: str
) -> None:
    spec = StructuredOutput("json_schema", schema)
    for check in (validate, grammars.compile):
        with pytest.raises(ValueError, match=r"response_format\.json_schema\.schema: ") as info:
            check(spec)
        assert problem in str(info.value)
        assert "/project/cpp" not in str(info.value)


def test_valid_specs_validate() -> None:
    validate(PERSON_SPEC)
    validate(OBJECT_SPEC)


def test_compile_is_cached_and_bounded(tokenizer: Any) -> None:
    grammars = Grammars(tokenizer, len(tokenizer), cache_size=2)
    first = grammars.compile(PERSON_SPEC)
    assert grammars.compile(StructuredOutput("json_schema", json.dumps(PERSON))) is first
    assert grammars.compile(OBJECT_SPEC) is not first
    grammars.compile(StructuredOutput("json_schema", '{"type": "boolean"}'))
    assert grammars.compile(OBJECT_SPEC) is grammars.compile(OBJECT_SPEC)
    assert grammars.compile(PERSON_SPEC) is not first  # evicted: the least recently used


def test_compile_from_many_threads_gives_one_object(tokenizer: Any) -> None:
    grammars = Grammars(tokenizer, len(tokenizer))
    results: list[Compiled] = []
    threads = [
        threading.Thread(target=lambda: results.append(grammars.compile(PERSON_SPEC)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
