"""Fixtures of the tuning tests: a small addition task and a config for runs on it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tuning.config import TuneConfig, load_config


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train and eval JSONL files of a completion task: 52 and 12 additions."""
    root = tmp_path_factory.mktemp("task")
    rows = [
        {"prompt": f"Add: {a} + {b} =", "completion": f" {a + b}"}
        for a in range(8)
        for b in range(8)
    ]
    train, held_out = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:52]))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[52:]))
    return train, held_out


def make_config(base: Path, files: tuple[Path, Path], out: Path, **overrides: object) -> TuneConfig:
    raw = [
        f"base={base}",
        f"data.train=[{files[0]}]",
        f"data.eval=[{files[1]}]",
        "data.max_length=32",
        f"output.dir={out}",
        "method.r=4",
        "training.batch_size=8",
        "training.max_steps=12",
        "training.eval_every=4",
        "training.lr=3e-3",
        "evaluation.max_new_tokens=4",
        "evaluation.max_examples=12",
    ]
    raw += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, raw)


@pytest.fixture(scope="session")
def tune_config() -> Callable[..., TuneConfig]:
    """tune_config(base, files, out, **{"training.lr": ...}) -> a short run's config."""
    return make_config
