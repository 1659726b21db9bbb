"""The example tasks: committed data equals its generator's output, and each example
config trains an adapter with exact match >= 0.9 where the base scores < 0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tuning.config import load_config
from tuning.train import run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TASKS = ["sentiment", "topic", "arithmetic"]
DATA = [*TASKS, "sentiment-classes"]  # the classification example: tests/tuning/test_classify.py


def test_committed_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(EXAMPLES / "tasks.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for task in DATA:
        for split in ("train", "eval"):
            committed = (EXAMPLES / "data" / task / f"{split}.jsonl").read_bytes()
            assert (tmp_path / task / f"{split}.jsonl").read_bytes() == committed


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_example_task_learns(task: str, tiny_base: Path, tmp_path: Path) -> None:
    # The configs build the tiny base with seed 0: the session's tiny_base is that model.
    config = load_config(
        EXAMPLES / f"{task}.yaml",
        [f"base={tiny_base}", f"output.dir={tmp_path}", "evaluation.forgetting=false"],
    )
    metrics = run(config, source=f"examples/{task}.yaml").metadata.metrics
    assert metrics["exact_match"] >= 0.9, metrics
    assert metrics["base"]["exact_match"] < 0.1, metrics
