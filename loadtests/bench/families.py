"""B14 and B15: the hf engine running transformers' own model code, measured side by side.

- B14: in-process tokens/s of the hf engine on the bench's Llama base, this tree against
  the engine as it was before (the forward pass written out for Llama, commit BEFORE,
  checked out into a temporary git worktree and run from there), in one run, same batch:
  the mixed load (8 adapters + base, B1's mix) and base only. Goal: not slower (>= 0.95,
  inside the repeats' noise on 2 cores).
- B15: the same on a Qwen3 base of the same size (`lorafleet base tiny --size small --arch
  qwen3`): mixed / base only, as B1 measures it for Llama, and its tokens/s beside Llama's.

Each side runs in its own process (`throughput.in_process`, loadtests/bench/inprocess.py).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtests.bench.common import (
    ROOT,
    Figure,
    Setup,
    make_adapters,
    ratio_figure,
    register,
    run_python,
)
from loadtests.bench.throughput import in_process

# The last commit whose hf engine ran the forward pass written out for Llama.
BEFORE = "28103f1"


def mixes(names: list[str], streams: int) -> dict[str, list[str]]:
    every = [*names, "base"]
    return {
        "mixed": [every[i % len(every)] for i in range(streams)],
        "base": ["base"] * streams,
    }


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lorafleet-before-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(path), commit], cwd=ROOT, check=True
        )
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT)


def families_figures(
    work: Path, base: Path, home: Path, names: list[str], setup: Setup
) -> list[Figure]:
    figures = []
    loads = mixes(names, setup.streams)
    values: dict[str, list[float]] = {}
    with worktree(BEFORE) as before:
        for load, models in loads.items():
            for side, tree in (("after", ROOT), ("before", before)):
                values[f"{load} {side}"] = in_process("engine", base, home, setup, models, tree)
    for load in loads:
        figures.append(
            ratio_figure(
                "B14",
                f"hf engine {load}: transformers' own modules / the forward pass written for "
                f"Llama ({BEFORE}), in-process",
                setup.as_dict(),
                "tok/s",
                {k: v for k, v in values.items() if k.startswith(load)},
                f"{load} after",
                f"{load} before",
                0.95,
            )
        )
    qwen = work / "qwen3-base"
    run_python(
        "from pathlib import Path; from tuning.tinymodel import build_base_model; "
        f"build_base_model(Path({str(qwen)!r}), size={setup.model!r}, seed=0, arch='qwen3')"
    )
    qwen_home = work / "qwen3-home"
    adapters = make_adapters(qwen, work / "qwen3-adapters", setup.adapters, setup.rank)
    register(qwen_home, qwen, dict(zip(names, adapters, strict=True)), setup.rank)
    qwen_values = {
        load: in_process("engine", qwen, qwen_home, setup, models) for load, models in loads.items()
    }
    figures.append(
        ratio_figure(
            "B15",
            "hf engine on a Qwen3 base of the same size: mixed adapters / base only, in-process",
            setup.as_dict(arch="qwen3"),
            "tok/s",
            qwen_values,
            "mixed",
            "base",
            0.9,
            llama_mixed_tok_s=values["mixed after"],
        )
    )
    return figures
