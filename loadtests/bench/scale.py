"""B5 scale in adapters and M1 memory: a registry of 1000 adapters.

The 1000 adapters are random rank-8 LoRA on the attention projections of the bench's base:
one built with PEFT, the other 999 with the same tensors' names and shapes and fresh random
values (numpy, so building them takes seconds, not a model load each).

B5: a server with fewer slots (64) than active adapters (100); rounds of `streams` requests
whose adapters are drawn from the active 100 uniformly or by Zipf (s = 1.1), against rounds
where all requests ask for one adapter. Misses load the adapter in the request's path and
evict the least recently used one. Reported: tokens/s each way, the ratios, the cache hit
rate over the measured rounds and the mean load time.

M1: a server with 100 slots; its resident set before any adapter is loaded and after each
batch of 10, the growth per adapter over the adapter file size, and the peak.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from loadtests.bench.common import (
    Figure,
    Setup,
    http_round,
    load_mean,
    make_adapters,
    prompts,
    ratio_figure,
    serve_args,
    serving,
)

REGISTERED = 1000
ACTIVE = 100
SLOTS = 64
ZIPF_S = 1.1
WEIGHTS = "adapter_model.safetensors"


def clone_adapters(template: Path, out: Path, count: int, seed: int) -> list[Path]:
    """`count` adapters shaped like `template`, with fresh random values."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(template / WEIGHTS)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = out / f"c{i:04d}"
        path.mkdir(parents=True, exist_ok=True)
        shutil.copy(template / "adapter_config.json", path / "adapter_config.json")
        fresh = {
            name: (rng.standard_normal(value.shape) * value.std()).astype(value.dtype)
            for name, value in tensors.items()
        }
        save_file(fresh, str(path / WEIGHTS), metadata={"format": "pt"})
        paths.append(path)
    return paths


def build_registry(work: Path, base: Path, setup: Setup) -> tuple[Path, list[str], dict[str, Any]]:
    from registry import Registry

    template = make_adapters(base, work / "scale-template", 1, setup.rank, first_seed=5000)[0]
    started = time.perf_counter()
    adapters = [template, *clone_adapters(template, work / "scale", REGISTERED - 1, seed=0)]
    built = time.perf_counter() - started
    home = work / "home-scale"
    registry = Registry.create(home, base, max_rank=setup.rank)
    names = [f"m{i:04d}" for i in range(REGISTERED)]
    started = time.perf_counter()
    try:
        for name, path in zip(names, adapters, strict=True):
            registry.register(name, path)
            registry.promote(name, 1)
    finally:
        registry.close()
    info = {
        "build_s": round(built, 1),
        "register_s_each": round((time.perf_counter() - started) / REGISTERED, 4),
        "adapter_file_bytes": (template / WEIGHTS).stat().st_size,
    }
    return home, names, info


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


def cache_counts(metrics: str) -> dict[str, float]:
    counts = {}
    for match in re.finditer(
        r'^lorafleet_adapter_cache_events_total\{event="(\w+)"\} (\S+)$', metrics, re.M
    ):
        counts[match[1]] = float(match[2])
    return counts


def scale_figure(
    base: Path, home: Path, names: list[str], setup: Setup, info: dict[str, Any]
) -> Figure:
    rng = random.Random(0)
    active = rng.sample(names, ACTIVE)
    texts = prompts(setup.streams)
    draws = {
        "uniform": lambda: rng.choices(active, k=setup.streams),
        "zipf": lambda: rng.choices(active, weights=zipf_weights(ACTIVE, ZIPF_S), k=setup.streams),
        "one adapter": lambda: [active[0]] * setup.streams,
    }
    values: dict[str, list[float]] = {side: [] for side in draws}
    hit_rate: dict[str, float] = {}
    with serving(base, home, *serve_args(setup, slots=SLOTS)) as server:
        for side in ("uniform", "zipf"):  # warm-up: fill the slots the way each side will
            http_round(server.url, draws[side](), texts, 8)
        for side, draw in draws.items():
            before = cache_counts(server.metrics())
            for _ in range(setup.repeats):
                values[side].append(
                    http_round(server.url, draw(), texts, setup.new_tokens).tokens_per_s
                )
            after = cache_counts(server.metrics())
            hits = after.get("hit", 0) - before.get("hit", 0)
            misses = after.get("miss", 0) - before.get("miss", 0)
            hit_rate[side] = round(hits / (hits + misses), 3) if hits + misses else float("nan")
        load = load_mean(server.metrics())
    figure = ratio_figure(
        "B5",
        f"{REGISTERED} registered, {ACTIVE} active, {SLOTS} slots: uniform / one adapter",
        setup.as_dict(registered=REGISTERED, active=ACTIVE, slots=SLOTS, zipf_s=ZIPF_S),
        "tok/s",
        values,
        "uniform",
        "one adapter",
        0.8,
        zipf_ratio=statistics_ratio(values, "zipf", "one adapter"),
        hit_rate=hit_rate,
        adapter_load_mean_s=load,
        **info,
    )
    zipf_ok = figure.details["zipf_ratio"] >= 0.8
    figure.met = bool(figure.met and zipf_ok)
    figure.target = ">= 0.8 (uniform and zipf)"
    return figure


def statistics_ratio(values: dict[str, list[float]], a: str, b: str) -> float:
    import statistics

    return statistics.median(values[a]) / statistics.median(values[b])


def memory_figure(
    base: Path, home: Path, names: list[str], setup: Setup, info: dict[str, Any]
) -> Figure:
    """M1: resident-set growth per resident adapter / adapter file size, with 100 resident."""
    texts = prompts(10)
    steps: list[tuple[int, int]] = []  # (adapters resident, RSS bytes)
    with serving(base, home, *serve_args(setup, slots=ACTIVE)) as server:
        http_round(server.url, ["base"] * 4, texts[:4], 4)
        steps.append((0, server.rss()["rss"]))
        for first in range(0, ACTIVE, 10):
            http_round(server.url, names[first : first + 10], texts, 2)
            steps.append((first + 10, server.rss()["rss"]))
        peak = server.rss()["peak"]
    growth = (steps[-1][1] - steps[0][1]) / ACTIVE
    size = info["adapter_file_bytes"]
    ratio = growth / size
    mib = 1024 * 1024
    return Figure(
        "M1",
        f"server RSS growth per resident adapter / adapter file size ({ACTIVE} resident)",
        setup.as_dict(slots=ACTIVE),
        "MiB",
        {
            "growth per adapter": [growth / mib],
            "file size": [size / mib],
            "peak RSS": [peak / mib],
        },
        "<= 1.5",
        "growth per adapter",
        "file size",
        met=ratio <= 1.5,
        details={
            "rss_steps_mib": json.loads(json.dumps([(n, round(r / mib, 1)) for n, r in steps]))
        },
    )
