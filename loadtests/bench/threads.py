"""T1, T2: torch threads on a shared machine. With one and with two busy processes beside
it (a CPU hog per core: a Python loop that never sleeps), the server's base-only tok/s and
a `lorafleet tune` run's wall time, with the default threads (every core, fewer while
other processes keep one busy: registry/hardware.py's ThreadTuner) and with
`--threads` fixed at every core (what torch does by itself).

The server is warmed with rounds for WARM_S before it is measured, so the default has had
its trials (one every 10 s); a tuning run that passes TUNE_LIMIT_S is stopped and counts
as that long.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtests.bench.common import (
    LORAFLEET,
    ROOT,
    Figure,
    Setup,
    http_round,
    prompts,
    ratio_figure,
    serve_args,
    serving,
)
from loadtests.bench.tuning import (
    SENTIMENT,
    TuneSettings,
    child_env,
    packed_batch_rows,
    write_config,
    write_rows,
)

WARM_S = 35.0
NEW_TOKENS = 32
TUNE_LIMIT_S = 240.0


@contextmanager
def hogs(count: int) -> Iterator[None]:
    """`count` processes that each keep one core busy, stopped with their groups."""
    spin = [sys.executable, "-c", "while True: pass"]
    children = [subprocess.Popen(spin, start_new_session=True) for _ in range(count)]
    try:
        time.sleep(1)
        yield
    finally:
        for child in children:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def serve_tok_s(base: Path, home: Path, setup: Setup, threads: list[str]) -> list[float]:
    texts = prompts(setup.streams)
    models = ["base"] * setup.streams
    with serving(base, home, *serve_args(setup), *threads) as server:
        started = time.monotonic()
        while time.monotonic() - started < WARM_S:
            http_round(server.url, models, texts, NEW_TOKENS)
        extras = [{"ignore_eos": True}] * setup.streams
        return [
            http_round(server.url, models, texts, NEW_TOKENS, extras=extras).tokens_per_s
            for _ in range(2)
        ]


def tune_s(config: Path, out: Path, env: dict[str, str], threads: list[str]) -> float:
    """Wall seconds of one `lorafleet tune` run (TUNE_LIMIT_S if stopped there)."""
    argv = [LORAFLEET, "tune", *threads, str(config), f"output.dir={out}"]
    started = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as log:
        child = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            child.wait(timeout=TUNE_LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return TUNE_LIMIT_S
    if child.returncode:
        raise SystemExit(f"T2: lorafleet tune exited with {child.returncode}: see {log.name}")
    return time.perf_counter() - started


def threads_figures(work: Path, base: Path, home: Path, setup: Setup) -> list[Figure]:
    cores = os.cpu_count() or 1
    fixed = ["--threads", str(cores)]
    root = work / "threads"
    root.mkdir(parents=True, exist_ok=True)
    settings = TuneSettings()
    train = write_rows(SENTIMENT / "train.jsonl", root / "train.jsonl", settings.train_examples)
    held_out = write_rows(SENTIMENT / "eval.jsonl", root / "eval.jsonl", settings.eval_examples)
    rows_per_batch, _ = packed_batch_rows(base, train, settings)
    config = write_config(root, base, train, held_out, setup, settings, rows_per_batch)
    env = child_env(cores, root / "datasets-cache")
    env.pop("OMP_NUM_THREADS")  # the threads are what is measured
    env.pop("MKL_NUM_THREADS")
    served: dict[str, list[float]] = {}
    tuned: dict[str, list[float]] = {}
    for count in (1, 2):
        with hogs(count):
            for side, flags in (("default", []), (f"--threads {cores}", fixed)):
                key = f"{side}, {count} hog{'s' if count > 1 else ''}"
                served[key] = serve_tok_s(base, home, setup, flags)
                print(f"T1 {key}: {served[key]}", flush=True)
                out = root / f"tune-{count}-{len(flags)}"
                tuned[key] = [tune_s(config, out, env, flags)]
                print(f"T2 {key}: {tuned[key]} s", flush=True)
    load = setup.as_dict(new_tokens=NEW_TOKENS, warm_s=WARM_S, base_only=True)
    figures = []
    for count in (1, 2):
        hog = f"{count} hog{'s' if count > 1 else ''}"
        default, pinned = f"default, {hog}", f"--threads {cores}, {hog}"
        figures.append(
            ratio_figure(
                f"T1{'ab'[count - 1]}",
                f"served tok/s beside {hog}: default threads / --threads {cores}",
                load,
                "tok/s",
                {default: served[default], pinned: served[pinned]},
                default,
                pinned,
                1.0,
            )
        )
        figure = ratio_figure(
            f"T2{'ab'[count - 1]}",
            f"`lorafleet tune` wall time beside {hog}: --threads {cores} / default threads",
            {"steps": "B7's lorafleet run", "limit_s": TUNE_LIMIT_S, "dtype": setup.dtype},
            "s",
            {pinned: tuned[pinned], default: tuned[default]},
            pinned,
            default,
            1.0,
        )
        if TUNE_LIMIT_S in tuned[pinned]:
            figure.note = f"--threads {cores} stopped at {TUNE_LIMIT_S:g} s"
        figures.append(figure)
    return figures
