"""The hf engine on the tiny model: greedy output per adapter equals transformers + peft
run one request at a time, also when requests for several adapters and the base share
decode steps; queue bound, cancel, unload while in use, seeded sampling."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.engines.hf import HFEngine
from serving.engines.seam import GenerationRequest, SamplingParams, TokenEvent
from serving.errors import NoFreeSlot, NotServable, Overloaded


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, event: TokenEvent) -> None:
        if event.token_id is not None:
            self.tokens.append(event.token_id)
        else:
            self.finish = event.finish_reason
            self.done.set()


def submit(
    engine: HFEngine, prompt: list[int], adapter: str | None = None, **params: object
) -> Collector:
    collector = Collector()
    request = GenerationRequest(uuid.uuid4().hex, prompt, SamplingParams(**params), adapter)  # type: ignore[arg-type]
    engine.submit(request, collector)
    return collector


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {
        "a@1": adapter_factory(tiny_base, rank=4, seed=11, targets=("q_proj", "v_proj")),
        "b@1": adapter_factory(
            tiny_base, rank=8, seed=12, targets=("q_proj", "o_proj", "down_proj")
        ),
    }


@pytest.fixture(scope="module")
def engine(tiny_base: Path, adapters: dict[str, Path]):  # type: ignore[no-untyped-def]
    engine = HFEngine(tiny_base, max_batch=8, max_len=128, adapter_slots=3, max_rank=8)
    for key, path in adapters.items():
        engine.load_adapter(key, path)
    yield engine
    engine.shutdown()


def test_mixed_batches_equal_peft_one_request_at_a_time(
    engine: HFEngine,
    tiny_base: Path,
    adapters: dict[str, Path],
    peft_greedy: Callable[..., list[int]],
) -> None:
    reference = peft_greedy
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    prompts = [
        tok(t)["input_ids"]
        for t in (
            "The customer sends a refund request",
            "Add: 3 + 4 =",
            "Review: the pizza was great",
            "We talked about the song",
            "Which is larger, 12 or 40?",
            "The server",
        )
    ]
    keys: list[str | None] = [None, "a@1", "b@1", "a@1", None, "b@1"]
    collectors = [
        submit(engine, p, k, max_new_tokens=12) for p, k in zip(prompts, keys, strict=True)
    ]
    for c in collectors:
        assert c.done.wait(60)
    assert engine.max_batch_seen > 1  # requests really shared decode steps
    for prompt, key, got in zip(prompts, keys, collectors, strict=True):
        expected = reference(tiny_base, adapters[key] if key else None, prompt, 12)
        assert got.tokens == expected, key
        assert got.finish == ("length" if len(expected) == 12 else "stop")
    # Adapters do change the output.
    assert collectors[0].tokens != reference(tiny_base, adapters["a@1"], prompts[0], 12)


def test_seeded_sampling_repeats(engine: HFEngine) -> None:
    """A seed repeats its tokens, another seed gives others (so the seed is used)."""

    def sample(seed: int) -> Collector:
        return submit(
            engine, [5, 6, 7], "a@1", max_new_tokens=16, temperature=0.9, top_p=0.9, seed=seed
        )

    runs = [sample(3), sample(3), sample(4)]
    for r in runs:
        assert r.done.wait(60)
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) > 0
    assert runs[0].tokens != runs[2].tokens


def test_temperature_shapes_the_distribution(engine: HFEngine) -> None:
    """Over many seeds, the first sampled token stays on the greedy token at a low
    temperature and spreads over many tokens at a high one (so temperature is applied)."""
    greedy = submit(engine, [5, 6, 7], max_new_tokens=1)
    assert greedy.done.wait(60)

    def first_tokens(temperature: float) -> list[int]:
        runs = [
            submit(engine, [5, 6, 7], max_new_tokens=1, temperature=temperature, seed=seed)
            for seed in range(24)
        ]
        for r in runs:
            assert r.done.wait(60)
        return [r.tokens[0] if r.tokens else -1 for r in runs]  # -1: eos came first

    cold, hot = first_tokens(0.05), first_tokens(5.0)
    assert cold.count(greedy.tokens[0]) >= 22, cold
    assert hot.count(greedy.tokens[0]) <= 12 and len(set(hot)) >= 6, hot


def test_cancel_frees_the_row(engine: HFEngine) -> None:
    long = Collector()
    request = GenerationRequest("long", [5, 6, 7], SamplingParams(max_new_tokens=100), None)
    engine.submit(request, long)
    engine.cancel("long")
    assert long.done.wait(60) and long.finish == "cancelled"
    after = submit(engine, [8, 9], max_new_tokens=3)
    assert after.done.wait(60) and after.finish in ("length", "stop")


def test_queue_bound_and_slots(tiny_base: Path, adapters: dict[str, Path]) -> None:
    engine = HFEngine(tiny_base, max_batch=1, max_len=64, adapter_slots=1, max_rank=8, max_queue=1)
    try:
        hold = threading.Event()
        busy = threading.Thread(target=engine._call, args=(hold.wait,))
        busy.start()  # the engine thread now waits on `hold`
        first = submit(engine, [5, 6], max_new_tokens=2)
        with pytest.raises(Overloaded, match="queue is full"):
            submit(engine, [5, 6], max_new_tokens=2)
        hold.set()
        busy.join()
        assert first.done.wait(60)

        engine.load_adapter("a@1", adapters["a@1"])
        with pytest.raises(NoFreeSlot):
            engine.load_adapter("b@1", adapters["b@1"])
        with pytest.raises(NotServable, match="not loaded"):
            submit(engine, [5], "b@1")
        running = submit(engine, [5, 6, 7], "a@1", max_new_tokens=30)
        engine.unload_adapter("a@1")  # deferred until the running request ends
        assert running.done.wait(60) and running.finish in ("length", "stop")
        engine.load_adapter("b@1", adapters["b@1"])  # the slot was freed
        assert engine.resident() == ["b@1"]
    finally:
        engine.shutdown()


def test_prefill_groups_split_prompts_of_unlike_lengths() -> None:
    from serving.engines.row_model import prefill_groups

    lengths = [40, 3, 3, 41, 3, 39]
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[3, 3, 3], [39, 40, 41]]
    assert prefill_groups([30] * 10) == [list(range(10))]  # equal lengths: one pass
    assert prefill_groups([30, 31], pass_cost=16) == [[0, 1]]  # a pass costs more than 1 pad
    assert prefill_groups([]) == []
