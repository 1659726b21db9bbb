"""The hf engine with a compiled decode step (`--compile`): greedy output equals
transformers + peft for each routing kind of the adapter layers (base only, some slots,
every slot) and for a batch of one, and once each kind has run, other batch sizes and spans
run without compiling again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch._dynamo.utils import counters
from transformers import AutoTokenizer

from serving.engines.hf import HFEngine
from tests.serving.test_hf_engine import submit

TEXTS = (
    "The customer sends a refund request",
    "Add: 3 + 4 =",
    "Review: the pizza was great",
    "We talked about the song",
    "Which is larger, 12 or 40?",
)


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    return {
        "a@1": adapter_factory(tiny_base, rank=4, seed=21, targets=("q_proj", "v_proj")),
        "b@1": adapter_factory(tiny_base, rank=8, seed=22, targets=("q_proj", "o_proj")),
    }


def test_compiled_step_equals_peft_for_every_routing_and_compiles_once_per_routing(
    tiny_base: Path, adapters: dict[str, Path], peft_greedy: Callable[..., list[int]]
) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    # Fixed threads: a thread count the tuner tries is one more compile of each kind.
    engine = HFEngine(
        tiny_base,
        dtype="fp32",
        max_batch=8,
        max_len=128,
        adapter_slots=2,
        max_rank=8,
        threads=1,
        compile=True,
    )
    try:
        for key, path in adapters.items():
            engine.load_adapter(key, path)

        def check(keys: list[str | None], n: int) -> None:
            texts = prompts[: len(keys)]
            collectors = [
                submit(engine, p, k, max_new_tokens=n) for p, k in zip(texts, keys, strict=True)
            ]
            for collector in collectors:
                assert collector.done.wait(300)
            for prompt, key, got in zip(texts, keys, collectors, strict=True):
                assert got.tokens == peft_greedy(
                    tiny_base, adapters[key] if key else None, prompt, n
                ), (keys, key)

        check([None], 10)  # one row, padded to two: the graph compiled at load
        check([None, "a@1", "a@1"], 10)  # one of two slots: gathered rows
        check(["a@1", "b@1", None, "b@1"], 10)  # every slot: A_all in the base matmul
        check(["b@1"], 6)
        compiled = counters["stats"]["unique_graphs"]
        assert compiled >= 3  # the step did go through dynamo: one graph per kind at least
        # Other batch sizes and spans, every kind: nothing compiles again.
        check([None, None, None, None, None], 14)
        check(["b@1", None, "b@1", None], 12)
        check(["b@1", "a@1", "a@1", "b@1", "a@1"], 8)
        check(["a@1", "a@1"], 16)
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        engine.shutdown()
