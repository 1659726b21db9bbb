"""Tiny bases of every family the hf engine serves: each loads in transformers, decodes
greedily with its cache as it does without one, takes a random adapter on its attention
projections, and carries its family's distinctive features in config.json, features that
change its outputs (a sliding window shorter than the prompt, softcapping, multipliers,
layers without RoPE, experts)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuning.tinymodel import (
    ARCHITECTURES,
    SHAPES,
    build_base_model,
    build_random_adapter,
    default_targets,
)

# 41 tokens: longer than the tiny sliding window (16), as a prompt plus completion is.
TEXT = (
    "The customer sends a refund request for the order that arrived broken and asks the "
    "shop to call back tomorrow before noon."
)
WINDOW = SHAPES["tiny"].sliding_window
ALTERNATING = ["sliding_attention", "full_attention"]
# What config.json holds for each family beyond the shape (tiny: head_dim 32).
SAVED: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"sliding_window": WINDOW, "tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 32, "tie_word_embeddings": True},
    # Qwen3MoeConfig maps num_experts to num_local_experts, and saves it under that name.
    "qwen3_moe": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64},
    "gemma": {"head_dim": 32, "tie_word_embeddings": True},
    "gemma2": {
        "head_dim": 32,
        "query_pre_attn_scalar": 64,
        "sliding_window": WINDOW,
        "layer_types": ALTERNATING,
        "attn_logit_softcapping": 3.0,
        "final_logit_softcapping": 5.0,
    },
    "gemma3_text": {
        "head_dim": 32,
        "query_pre_attn_scalar": 64,
        "sliding_window": WINDOW,
        "layer_types": ALTERNATING,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    },
    "phi3": {"tie_word_embeddings": False},
    "granite": {
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 1 / 32,
        "logits_scaling": 2.0,
    },
    "olmo2": {"tie_word_embeddings": False},
    # 1 means the layer has RoPE: layer 1 has none.
    "smollm3": {"no_rope_layers": [1, 0], "tie_word_embeddings": True},
}
# Weights that only the family's layout has (names end in these, in layer 0). Experts are
# saved one by one under their checkpoint names, though transformers fuses them in memory.
WEIGHTS: dict[str, tuple[str, ...]] = {
    "qwen2": ("self_attn.q_proj.bias", "self_attn.v_proj.bias"),
    "qwen3": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    "olmo2": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    "phi3": ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"),
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.3.gate_proj.weight"),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.3.w1.weight"),
    "gemma2": ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"),
    "gemma3_text": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
}
# Loading a base with one of these switches a feature off: the logits must move.
SWITCHED_OFF: list[tuple[str, dict[str, Any]]] = [
    ("mistral", {"sliding_window": None}),
    ("gemma2", {"sliding_window": 4096}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": 32}),
    ("gemma3_text", {"sliding_window": 4096}),
    (
        "gemma3_text",
        {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 1e6} for t in ALTERNATING}},
    ),
    ("granite", {"embedding_multiplier": 1.0}),
    ("granite", {"residual_multiplier": 1.0}),
    ("granite", {"attention_multiplier": 32**-0.5}),
    ("granite", {"logits_scaling": 1.0}),
    ("smollm3", {"no_rope_layers": [1, 1]}),
    ("qwen3_moe", {"num_experts_per_tok": 1}),
    ("mixtral", {"num_experts_per_tok": 1}),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny models' matmuls are too small to split, and on a busy 2-core host two
    # threads' spin-waits made each test 20x slower (0.8 s vs 0.04 s for 6 forward passes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt_ids(base: Path) -> torch.Tensor:
    return torch.tensor([AutoTokenizer.from_pretrained(str(base))(TEXT)["input_ids"]])


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def greedy_without_cache(model: Any, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens, each from a full forward pass over the whole sequence so far."""
    with torch.no_grad():
        for _ in range(n):
            next_id = model(ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return list(ids[0, -n:].tolist())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_family_base_loads_decodes_and_takes_an_adapter(
    arch: str, family_base: Callable[..., Path], tmp_path: Path
) -> None:
    base = family_base(arch)
    saved = json.loads((base / "config.json").read_text())
    model: Any = AutoModelForCausalLM.from_pretrained(str(base))
    model.eval()
    assert model.config.model_type == saved["model_type"] == arch
    assert saved["architectures"] == [type(model).__name__]
    ids = prompt_ids(base)
    assert ids.shape[1] > WINDOW + 16
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
        base_logits = model(ids).logits
    # The cache (a sliding one where layers slide) decodes as full recomputation does.
    assert out.tolist() == greedy_without_cache(model, ids, len(out))

    adapter = build_random_adapter(base, tmp_path / "adapter", rank=4, seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(default_targets(arch))
    fresh = AutoModelForCausalLM.from_pretrained(str(base))
    tuned: Any = PeftModel.from_pretrained(fresh, str(adapter))
    tuned.eval()
    with torch.no_grad():
        new = tuned.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
        assert not torch.allclose(tuned(ids).logits, base_logits, atol=1e-4)
    assert new.tolist() == greedy_without_cache(tuned, ids, len(new))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_and_weights_carry_the_family_features(
    arch: str, family_base: Callable[..., Path]
) -> None:
    base = family_base(arch)
    saved = json.loads((base / "config.json").read_text())
    assert {key: saved.get(key) for key in SAVED[arch]} == SAVED[arch]
    names = set(load_file(base / "model.safetensors"))
    for suffix in WEIGHTS.get(arch, ()):
        assert f"model.layers.0.{suffix}" in names, (suffix, sorted(names)[:12])
    assert ("lm_head.weight" in names) == (not saved["tie_word_embeddings"])
    if arch == "phi3":
        assert not any("q_proj" in name for name in names)
    if arch in ("qwen3_moe", "mixtral"):
        experts = {n.split("experts.")[1].split(".")[0] for n in names if ".experts." in n}
        assert experts == {"0", "1", "2", "3"}


@pytest.mark.parametrize(("arch", "override"), SWITCHED_OFF, ids=lambda v: str(v)[:40])
def test_each_feature_changes_the_outputs(
    arch: str, override: dict[str, Any], family_base: Callable[..., Path]
) -> None:
    """The base against itself loaded with one feature switched off. Eager attention:
    transformers' sdpa path drops attn_logit_softcapping."""
    base = family_base(arch)
    ids = prompt_ids(base)
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager")
        plain = AutoModelForCausalLM.from_pretrained(
            str(base), attn_implementation="eager", **override
        )
        a, b = ours(ids).logits[0], plain(ids).logits[0]
    assert (a[-1] - b[-1]).abs().max() > 1e-3
    if "sliding_window" in override:  # the window changes nothing until it is full
        assert torch.allclose(a[:WINDOW], b[:WINDOW], atol=1e-5)


def test_tied_and_untied_force_the_choice(family_base: Callable[..., Path]) -> None:
    for arch, tied in (("llama", True), ("gemma", False)):
        base = family_base(arch, tied=tied)
        assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is tied
        assert ("lm_head.weight" in load_file(base / "model.safetensors")) is not tied
        model: Any = AutoModelForCausalLM.from_pretrained(str(base))
        same = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert same is tied


def test_same_seed_gives_byte_identical_files(
    family_base: Callable[..., Path], tmp_path: Path
) -> None:
    again = build_base_model(tmp_path / "again", arch="gemma2", seed=0)
    other = build_base_model(tmp_path / "other", arch="gemma2", seed=1)
    assert digests(again) == digests(family_base("gemma2"))
    assert digests(other)["model.safetensors"] != digests(again)["model.safetensors"]
    assert digests(other)["tokenizer.json"] == digests(again)["tokenizer.json"]


def test_cli_builds_a_family_base(
    cli: Callable[..., Any], family_base: Callable[..., Path], tmp_path: Path
) -> None:
    """`lorafleet base tiny --arch qwen3 --untied` writes, in a fresh process (its own
    tokenizer training), the files the builder writes here."""
    out = tmp_path / "qwen3"
    made = cli("base", "tiny", "--arch", "qwen3", "--untied", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert "qwen3" in made.stdout
    assert digests(out) == digests(family_base("qwen3", tied=False))
    refused = cli("base", "tiny", "--arch", "gpt2", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2 and "gpt2" in refused.stderr


def test_default_targets_name_attention_projections() -> None:
    assert default_targets("phi3") == ("qkv_proj",)
    assert default_targets("llama") == default_targets("gemma3_text") == ("q_proj", "v_proj")
    assert default_targets("starcoder2") == ("q_proj", "v_proj")  # a family not built here
