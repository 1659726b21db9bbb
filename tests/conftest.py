"""Shared fixtures: tiny base models and adapters are built once per session and reused.

Everything is real: base models built by `tuning.tinymodel`, adapters written by peft,
registries in SQLite under tmp_path, the CLI run as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, home: Path | None = None, env: dict[str, str] | None = None) -> Result:
    """Run the installed `lorafleet` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    if home is not None:
        full_env["LORAFLEET_HOME"] = str(home)
    proc = subprocess.run(
        [LORAFLEET, *args], capture_output=True, text=True, env=full_env, timeout=300
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    return run_cli


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuning.tinymodel import build_base_model

    return build_base_model(tmp_path_factory.mktemp("bases") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and shapes as `tiny_base`, other weights: another fingerprint."""
    from tuning.tinymodel import build_base_model

    return build_base_model(tmp_path_factory.mktemp("bases") / "other", size="tiny", seed=1)


@pytest.fixture(scope="session")
def adapter_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., Path]:
    """make(base, rank=4, seed=0, targets=...) -> a peft adapter directory (cached)."""
    from tuning.tinymodel import build_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    cache: dict[tuple[object, ...], Path] = {}

    def make(
        base: Path, *, rank: int = 4, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")
    ) -> Path:
        key = (str(base), rank, seed, targets)
        if key not in cache:
            out = root / f"a{len(cache)}"
            cache[key] = build_random_adapter(
                base, out, rank=rank, alpha=2.0 * rank, target_modules=targets, seed=seed
            )
        return cache[key]

    return make


@pytest.fixture
def copy_adapter(tmp_path: Path) -> Callable[[Path], Path]:
    """A private, editable copy of an adapter directory."""
    counter = iter(range(1000))

    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy{next(counter)}"
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def home(tmp_path: Path, tiny_base: Path) -> Path:
    """A new registry bound to `tiny_base`."""
    from registry import Registry

    path = tmp_path / "home"
    Registry.create(path, tiny_base, max_rank=16, actor="tests").close()
    return path


@pytest.fixture(scope="session")
def peft_greedy() -> Callable[..., list[int]]:
    """greedy(base, adapter | None, prompt_ids, n) -> new token ids from transformers + peft,
    one request at a time: the reference the engines are held to (eos not included)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models: dict[tuple[str, str | None], object] = {}

    def greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
        key = (str(base), str(adapter) if adapter else None)
        if key not in models:
            model = AutoModelForCausalLM.from_pretrained(str(base))
            models[key] = PeftModel.from_pretrained(model, str(adapter)) if adapter else model
        tok = AutoTokenizer.from_pretrained(str(base))
        with torch.no_grad():
            out = models[key].generate(  # type: ignore[attr-defined]
                torch.tensor([prompt]),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        tokens: list[int] = out[0, len(prompt) :].tolist()
        return tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens

    return greedy
