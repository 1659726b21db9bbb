"""The offline base model: deterministic build, offline load, generation, chat template."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from registry.basemodel import inspect_base
from tuning.tinymodel import build_base_model


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_gives_byte_identical_files(tiny_base: Path, tmp_path: Path) -> None:
    again = build_base_model(tmp_path / "again", size="tiny", seed=0)
    assert digests(again) == digests(tiny_base)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(digests(again))


def test_other_seed_changes_weights_not_tokenizer(tiny_base: Path, other_base: Path) -> None:
    ours, theirs = digests(tiny_base), digests(other_base)
    assert ours["model.safetensors"] != theirs["model.safetensors"]
    assert ours["tokenizer.json"] == theirs["tokenizer.json"]
    assert inspect_base(tiny_base).fingerprint != inspect_base(other_base).fingerprint
    assert inspect_base(tiny_base).fingerprint == inspect_base(tiny_base).fingerprint


def test_loads_offline_and_generates(tiny_base: Path) -> None:
    # A fresh interpreter with the hub switched off proves nothing is fetched.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = tok('The customer sends a refund request', return_tensors='pt')\n"
        "out = model.generate(**ids, max_new_tokens=8, do_sample=False)\n"
        "print(out.shape[1] - ids['input_ids'].shape[1])\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": "/nonexistent",
    }
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_base)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] in {str(n) for n in range(1, 9)}


def test_tokenizer_round_trips_and_has_chat_template(tiny_base: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    text = "Which is larger, 12 or 40? 40 is larger. Ünïcode ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert len(tok("The customer sends a refund request")["input_ids"]) < 12  # real merges


def test_model_config_and_weights(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (128, 2)
    assert config.eos_token_id == AutoTokenizer.from_pretrained(str(tiny_base)).eos_token_id
    weights = load_file(tiny_base / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
