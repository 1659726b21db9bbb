"""The hf engine's sampling fields and log-probabilities on the tiny model: logprobs and
prompt logprobs equal log_softmax of transformers + peft (fp32, one request at a time) in
batches that mix adapters, the base and rows that shape their distribution; logit_bias,
min_tokens, ignore_eos and the penalties against references computed here; top_k=1 and
min_p=1 sample the greedy tokens; structured rows emit JSON of their schema; rows that ask
for nothing still equal peft's greedy."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from serving.engines.hf import HFEngine
from serving.engines.seam import (
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
    TokenEvent,
    TokenLogprob,
)
from serving.errors import BadRequest

Reference = Callable[[str | None, list[int]], torch.Tensor]
Ask = tuple[list[int], str | None, dict[str, Any]]  # prompt, adapter key, SamplingParams
TOLERANCE = 1e-4


class Run:
    """The events of one request."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.done = threading.Event()

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        if event.token_id is None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id is not None]

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob | None]:
        return [e.logprob for e in self.events if e.token_id is not None]


def submit(engine: HFEngine, prompt: list[int], adapter: str | None, **params: Any) -> Run:
    run = Run()
    engine.submit(
        GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(**params), adapter), run
    )
    return run


def together(engine: HFEngine, asks: list[Ask]) -> list[Run]:
    """Submit `asks` while the engine thread is held, so all are prefilled in one forward
    pass and decode side by side."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait()

    busy = threading.Thread(target=engine._call, args=(hold,))
    busy.start()
    try:
        assert held.wait(60)
        runs = [submit(engine, prompt, adapter, **params) for prompt, adapter, params in asks]
    finally:
        release.set()
        busy.join()
    for run in runs:
        assert run.done.wait(60)
    return runs


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {
        "a@1": adapter_factory(tiny_base, rank=4, seed=11, targets=("q_proj", "v_proj")),
        "b@1": adapter_factory(
            tiny_base, rank=8, seed=12, targets=("q_proj", "o_proj", "down_proj")
        ),
    }


@pytest.fixture(scope="module")
def engine(tiny_base: Path, adapters: dict[str, Path]) -> Iterator[HFEngine]:
    engine = HFEngine(tiny_base, max_batch=8, max_len=128, adapter_slots=2, max_rank=8)
    for key, path in adapters.items():
        engine.load_adapter(key, path)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_base: Path, adapters: dict[str, Path]) -> Reference:
    """reference(adapter key | None, ids) -> raw fp32 logits (len(ids), vocab) of
    transformers + peft on one sequence."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[str | None, Any] = {}

    def logits(key: str | None, ids: list[int]) -> torch.Tensor:
        if key not in models:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
            models[key] = PeftModel.from_pretrained(model, str(adapters[key])) if key else model
        with torch.no_grad():
            out: torch.Tensor = models[key](torch.tensor([ids])).logits[0].float()
        return out

    return logits


@pytest.fixture(scope="module")
def prompts(tiny_base: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    texts = ("The customer sends a refund request", "Add: 3 + 4 =", "Review: the pizza was")
    return [tok(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def eos(tiny_base: Path) -> int:
    return int(AutoTokenizer.from_pretrained(str(tiny_base)).eos_token_id)


def assert_scored(got: TokenLogprob | None, logprobs: torch.Tensor, token: int, k: int) -> None:
    """`got` is token's log-probability in `logprobs` (vocab,) and its top k, best first."""
    assert got is not None
    assert abs(got.logprob - float(logprobs[token])) < TOLERANCE
    best = logprobs.topk(k)
    assert [t for t, _ in got.top] == best.indices.tolist()
    for (_, value), expected in zip(got.top, best.values.tolist(), strict=True):
        assert abs(value - expected) < TOLERANCE


def test_logprobs_in_a_mixed_batch_equal_peft(
    engine: HFEngine,
    tiny_base: Path,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    reference: Reference,
    peft_greedy: Callable[..., list[int]],
) -> None:
    """Rows for the base and two adapters ask for logprobs and prompt logprobs (various k)
    beside rows that ask for nothing and a sampled, penalized row, all in one batch."""
    n = 6
    scored: list[Ask] = [
        (prompts[0], None, {"logprobs": 3, "prompt_logprobs": 2}),
        (prompts[1], "a@1", {"logprobs": 5, "prompt_logprobs": 0}),
        (prompts[2], "b@1", {"logprobs": 0}),
        (prompts[2], "a@1", {"prompt_logprobs": 4}),
    ]
    plain: list[Ask] = [(prompts[0], "a@1", {}), (prompts[1], "b@1", {}), (prompts[2], None, {})]
    sampled: Ask = (prompts[1], None, {"temperature": 1.0, "seed": 3, "repetition_penalty": 1.3})
    asks = [(p, k, {"max_new_tokens": n, **params}) for p, k, params in [*scored, *plain, sampled]]
    runs = together(engine, asks)
    assert engine.max_batch_seen == len(asks)  # all decoded side by side

    for (prompt, key, params), run in zip(asks, runs, strict=True):
        expected = peft_greedy(tiny_base, adapters[key] if key else None, prompt, n)
        if "temperature" in params:
            assert run.finish in ("length", "stop") and run.logprobs == [None] * len(run.tokens)
            continue
        assert run.tokens == expected, (key, params)
        assert run.finish == ("length" if len(expected) == n else "stop")
        logprobs = torch.log_softmax(reference(key, prompt + run.tokens), dim=-1)
        k = params.get("logprobs")
        for t, (token, got) in enumerate(zip(run.tokens, run.logprobs, strict=True)):
            if k is None:
                assert got is None
            else:  # the logits at the position before token t
                assert_scored(got, logprobs[len(prompt) - 1 + t], token, k)
        k = params.get("prompt_logprobs")
        first, *later = run.events
        assert all(e.prompt_logprobs is None for e in later)
        if k is None:
            assert first.prompt_logprobs is None
            continue
        assert first.prompt_logprobs is not None
        assert len(first.prompt_logprobs) == len(prompt) and first.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert_scored(first.prompt_logprobs[i], logprobs[i - 1], prompt[i], k)


def test_scoring_a_prompt_generates_nothing(
    engine: HFEngine, prompts: list[list[int]], reference: Reference
) -> None:
    """max_new_tokens=0 with prompt_logprobs: one end event, 'length', with the prompt's
    logprobs; it shares the prefill with a generating request. Without prompt_logprobs,
    0 tokens is refused."""
    score, other = together(
        engine,
        [
            (prompts[1], "b@1", {"max_new_tokens": 0, "prompt_logprobs": 3}),
            (prompts[0], "a@1", {"max_new_tokens": 2}),
        ],
    )
    assert len(score.events) == 1 and score.finish == "length" and score.tokens == []
    got = score.events[0].prompt_logprobs
    assert got is not None and len(got) == len(prompts[1]) and got[0] is None
    logprobs = torch.log_softmax(reference("b@1", prompts[1]), dim=-1)
    for i in range(1, len(prompts[1])):
        assert_scored(got[i], logprobs[i - 1], prompts[1][i], 3)
    assert len(other.tokens) == 2 or other.finish == "stop"
    with pytest.raises(BadRequest, match="max_new_tokens is 0"):
        submit(engine, prompts[0], None, max_new_tokens=0)


def test_logit_bias_forces_a_token_and_logprobs_stay_raw(
    engine: HFEngine, prompts: list[list[int]], reference: Reference
) -> None:
    forced = 42
    (run,) = together(
        engine,
        [
            (
                prompts[0],
                "a@1",
                {"max_new_tokens": 3, "logit_bias": ((forced, 100.0),), "logprobs": 1},
            )
        ],
    )
    assert run.tokens == [forced] * 3
    logprobs = torch.log_softmax(reference("a@1", prompts[0] + run.tokens), dim=-1)
    for t, got in enumerate(run.logprobs):  # the model's own, not the biased distribution
        assert_scored(got, logprobs[len(prompts[0]) - 1 + t], forced, 1)
        assert got is not None and got.logprob < -1.0


def test_min_tokens_holds_back_eos_and_stop_tokens(
    engine: HFEngine, prompts: list[list[int]], eos: int
) -> None:
    """EOS (or a stop token) forced by logit_bias ends the request at once without
    min_tokens and exactly after min_tokens with it."""
    stop = 42
    runs = together(
        engine,
        [
            (prompts[0], None, {"logit_bias": ((eos, 100.0),)}),
            (prompts[0], None, {"logit_bias": ((eos, 100.0),), "min_tokens": 3}),
            (prompts[1], "a@1", {"logit_bias": ((stop, 100.0),), "stop_token_ids": (stop,)}),
            (
                prompts[1],
                "a@1",
                {"logit_bias": ((stop, 100.0),), "stop_token_ids": (stop,), "min_tokens": 2},
            ),
        ],
    )
    assert [len(r.tokens) for r in runs] == [0, 3, 0, 2]
    assert [r.finish for r in runs] == ["stop"] * 4
    assert eos not in runs[1].tokens and stop not in runs[3].tokens


def test_ignore_eos_keeps_generating(engine: HFEngine, prompts: list[list[int]], eos: int) -> None:
    (run,) = together(
        engine,
        [
            (
                prompts[2],
                "b@1",
                {"logit_bias": ((eos, 100.0),), "ignore_eos": True, "max_new_tokens": 4},
            )
        ],
    )
    assert run.tokens == [eos] * 4 and run.finish == "length"


def penalized_greedy(
    reference: Reference,
    key: str | None,
    prompt: list[int],
    n: int,
    eos: int,
    repetition: float = 1.0,
    frequency: float = 0.0,
    presence: float = 0.0,
) -> list[int]:
    """Greedy under the penalties, written from their definitions over reference logits."""
    out: list[int] = []
    for _ in range(n):
        logits = reference(key, prompt + out)[-1].tolist()
        for token in set(prompt + out):  # transformers' repetition penalty
            value = logits[token]
            logits[token] = value / repetition if value > 0 else value * repetition
        for token in set(out):  # OpenAI's frequency and presence penalties
            logits[token] -= out.count(token) * frequency + presence
        token = max(range(len(logits)), key=logits.__getitem__)
        if token == eos:
            break
        out.append(token)
    return out


@pytest.mark.parametrize(
    "penalty",
    [
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 1.0},
        # Small enough that the base still repeats token 210 on prompts[2]; its count of 2,
        # not its presence, then changes the 12th token.
        {"frequency_penalty": 0.1},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5},
    ],
)
def test_penalties_equal_their_definition(
    engine: HFEngine,
    tiny_base: Path,
    prompts: list[list[int]],
    reference: Reference,
    peft_greedy: Callable[..., list[int]],
    eos: int,
    penalty: dict[str, float],
) -> None:
    n = 12
    # The third prompt ends with the base's own greedy start on prompts[2] (210, 140), so
    # its next greedy token, 210, is a prompt token: the repetition penalty must see it.
    rows = [(prompts[1], "a@1"), (prompts[2], None), (prompts[2] + [210, 140], None)]
    runs = together(engine, [(p, k, {"max_new_tokens": n, **penalty}) for p, k in rows])
    for (prompt, key), run in zip(rows, runs, strict=True):
        expected = penalized_greedy(
            reference,
            key,
            prompt,
            n,
            eos,
            repetition=penalty.get("repetition_penalty", 1.0),
            frequency=penalty.get("frequency_penalty", 0.0),
            presence=penalty.get("presence_penalty", 0.0),
        )
        assert run.tokens == expected
    # The base repeats itself on prompts[2] (token 210 twice), so the penalty shows there.
    assert runs[1].tokens != peft_greedy(tiny_base, None, prompts[2], n)


def test_top_k_one_and_min_p_one_sample_the_greedy_tokens(
    engine: HFEngine,
    tiny_base: Path,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    peft_greedy: Callable[..., list[int]],
) -> None:
    n = 8
    sampled = {"max_new_tokens": n, "temperature": 1.0}
    runs = together(
        engine,
        [
            (prompts[0], "b@1", {**sampled, "top_k": 1, "seed": 1}),
            (prompts[0], "b@1", {**sampled, "min_p": 1.0, "seed": 2}),
            (prompts[0], "b@1", {**sampled, "seed": 3}),
        ],
    )
    greedy = peft_greedy(tiny_base, adapters["b@1"], prompts[0], n)
    assert runs[0].tokens == greedy and runs[1].tokens == greedy
    assert runs[2].tokens != greedy  # plain sampling at temperature 1 does leave greedy


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "n"],
}


def test_structured_rows_are_json_beside_free_rows(
    engine: HFEngine,
    tiny_base: Path,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    reference: Reference,
    peft_greedy: Callable[..., list[int]],
) -> None:
    """Greedy and sampled rows under a JSON schema, and one under json_object, end with
    'stop' on JSON their grammar allows; their logprobs are the model's own, not the masked
    distribution's; a free row in the same batch still equals peft's greedy."""
    schema = StructuredOutput("json_schema", json.dumps(SCHEMA))
    n = 60
    asks: list[Ask] = [
        (prompts[2], "a@1", {"structured": schema, "logprobs": 2}),
        (prompts[0], None, {"structured": schema, "temperature": 1.0, "seed": 5}),
        (prompts[2], "b@1", {"structured": StructuredOutput("json_object")}),
        (prompts[0], "a@1", {}),
    ]
    runs = together(engine, [(p, k, {"max_new_tokens": n, **params}) for p, k, params in asks])
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    for run in runs[:2]:
        value = json.loads(str(tok.decode(run.tokens)))
        assert run.finish == "stop" and list(value) == ["name", "n"]
        assert isinstance(value["name"], str) and len(value["name"]) <= 8
        assert isinstance(value["n"], int) and 0 <= value["n"] <= 99
    assert runs[2].finish == "stop" and isinstance(
        json.loads(str(tok.decode(runs[2].tokens))), dict
    )
    prompt = prompts[2]
    logprobs = torch.log_softmax(reference("a@1", prompt + runs[0].tokens), dim=-1)
    for t, (token, got) in enumerate(zip(runs[0].tokens, runs[0].logprobs, strict=True)):
        assert_scored(got, logprobs[len(prompt) - 1 + t], token, 2)
    assert runs[3].tokens == peft_greedy(tiny_base, adapters["a@1"], prompts[0], n)


def test_a_bad_schema_is_refused_at_submit(engine: HFEngine, prompts: list[list[int]]) -> None:
    bad = StructuredOutput("json_schema", '{"type": "nope"}')
    with pytest.raises(BadRequest, match=r"json_schema\.schema"):
        submit(engine, prompts[0], None, structured=bad)
