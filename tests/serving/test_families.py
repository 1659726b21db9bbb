"""Every family the hf engine serves (registry/families.py HF_FAMILIES), token for token
against transformers + peft run one request at a time: a tiny random base of each family
(sliding-window and global layers, soft-capping, q/k norms, fused projections, NoPE
layers, multipliers and experts as its config has them), two adapters (one on the
family's attention projections, one adding an MLP projection, fused where the family
fuses them), and one mixed batch of the base and both adapters, streamed token by token,
with prompts longer than the sliding window."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.families import HF_FAMILIES, hf_verdict
from serving.engines.hf import HFEngine
from serving.engines.seam import GenerationRequest, SamplingParams, TokenEvent
from serving.errors import NotServable
from tuning.tinymodel import build_random_adapter, default_targets

MOE = ("qwen3_moe", "mixtral")
CASES = [(arch, None) for arch in HF_FAMILIES] + [("llama", True)]
NEW_TOKENS = 16


class Stream:
    """One request's streamed tokens."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.events = 0
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, event: TokenEvent) -> None:
        self.events += 1
        if event.token_id is not None:
            self.tokens.append(event.token_id)
        else:
            self.finish = event.finish_reason
            self.done.set()


def eager_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    """transformers + peft greedy with the eager attention (the model as defined)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos
        )
    tokens: list[int] = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def second_targets(arch: str) -> tuple[str, ...]:
    """The attention projections plus one more: the MLP's (fused gate_up in phi3), or
    o_proj where the MLP is a mixture of experts."""
    extra = "o_proj" if arch in MOE else "gate_up_proj" if arch == "phi3" else "down_proj"
    return (*default_targets(arch), extra)


@pytest.mark.parametrize(
    ("arch", "tied"), CASES, ids=[f"{a}{'-tied' if t else ''}" for a, t in CASES]
)
def test_family_greedy_equals_transformers_and_peft(
    arch: str,
    tied: bool | None,
    family_base: Callable[..., Path],
    peft_greedy: Callable[..., list[int]],
    tmp_path: Path,
) -> None:
    base = family_base(arch, tied)
    adapters = {
        "a@1": build_random_adapter(base, tmp_path / "a", rank=4, seed=1),
        "b@1": build_random_adapter(
            base, tmp_path / "b", rank=8, seed=2, target_modules=second_targets(arch)
        ),
    }
    # Token ids of the project tokenizer's ordinary range; 24 of them exceed the tiny
    # bases' sliding window (16) before the first new token.
    prompts = [[(7 * i + 13 * j) % 3000 + 100 for j in range(24 + 3 * i)] for i in range(4)]
    keys: list[str | None] = [None, "a@1", "b@1", "a@1"]
    engine = HFEngine(base, max_batch=8, max_len=128, adapter_slots=2, max_rank=8)
    try:
        for key, path in adapters.items():
            engine.load_adapter(key, path)
        streams = []
        for prompt, key in zip(prompts, keys, strict=True):
            stream = Stream()
            params = SamplingParams(max_new_tokens=NEW_TOKENS)
            engine.submit(GenerationRequest(uuid.uuid4().hex, prompt, params, key), stream)
            streams.append(stream)
        for stream in streams:
            assert stream.done.wait(120), f"{arch}: a request did not finish"
        assert engine.max_batch_seen >= 2, "the requests never shared a decode step"
    finally:
        engine.shutdown()
    for prompt, key, stream in zip(prompts, keys, streams, strict=True):
        adapter = adapters[key] if key else None
        if arch == "gemma2":  # SDPA drops gemma2's attention soft-capping; eager keeps it
            expected = eager_greedy(base, adapter, prompt, NEW_TOKENS)
        else:
            expected = peft_greedy(base, adapter, prompt, NEW_TOKENS)
        assert stream.tokens == expected, f"{arch} {key or 'base'}"
        assert stream.events == len(stream.tokens) + 1  # one event per token, then the end
    assert hf_verdict({"model_type": arch}).ok


def test_an_unserved_family_is_refused_with_the_families(tiny_base: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "base"
    shutil.copytree(tiny_base, other)
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(
        config.replace('"model_type": "llama"', '"model_type": "gpt2"')
    )
    with pytest.raises(NotServable, match=r"model type 'gpt2'.*--engine vllm"):
        HFEngine(other, max_batch=2, max_len=32)
