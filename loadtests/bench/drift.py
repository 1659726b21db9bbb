"""B9: what the drift statistics cost: B1's mixed traffic against two servers started side
by side from the same registry, one keeping drift windows and scores, one with --no-drift.

So that the drift side does all of its work, its adapters are registered with a baseline
profile (of the bench prompts) and it runs with --drift-min-samples 1: every window is
scored from its first request, so the background thread recomputes every changed window
about once a second while the load runs. Only one server has traffic at a time; rounds
alternate between them, the order flipped every repeat, so slow drifts of the machine fall
on both sides. Beside tokens/s it reports each side's server CPU time per generated token,
which other load on the machine disturbs less than wall time.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from loadtests.bench.common import (
    Figure,
    ServerProcess,
    Setup,
    http_round,
    make_adapters,
    prompts,
    register,
    serve_args,
    serving,
)
from loadtests.bench.throughput import mixed_models

FIRST_SEED = 900  # other weights than the adapters of the other figures


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU time of the server's processes so far."""
    import psutil

    times = [psutil.Process(pid).cpu_times() for pid in server.worker_pids()]
    return sum(t.user + t.system for t in times)


def profiled_adapters(work: Path, base: Path, home: Path, setup: Setup) -> list[str]:
    """Register `setup.adapters` adapters as drift0.. with a profile of the bench prompts."""
    from tokenizers import Tokenizer

    from registry.profile import build_profile

    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    texts = prompts(256, offset=10_000)
    profile = build_profile(
        [tokenizer.encode(t).ids for t in texts],
        vocab_size=tokenizer.get_vocab_size(),
        completion_lengths=[setup.new_tokens] * len(texts),
    )
    paths = make_adapters(base, work / "drift-adapters", setup.adapters, setup.rank, FIRST_SEED)
    for path in paths:
        profile.save(path)
        (path / "lorafleet.json").write_text(json.dumps({"drift_profile": "profile.json"}))
    names = [f"drift{i}" for i in range(len(paths))]
    register(home, base, dict(zip(names, paths, strict=True)), setup.rank)
    return names


def drift_figure(work: Path, base: Path, home: Path, setup: Setup) -> Figure:
    names = profiled_adapters(work, base, home, setup)
    texts = prompts(setup.streams)
    models = mixed_models(names, setup.streams)
    values: dict[str, list[float]] = {"drift-on": [], "drift-off": []}
    cpu_ms: dict[str, list[float]] = {"drift-on": [], "drift-off": []}
    args = serve_args(setup)
    with (
        serving(base, home, *args, "--drift-min-samples", "1") as on,
        serving(base, home, *args, "--no-drift") as off,
    ):
        servers = {"drift-on": on, "drift-off": off}
        for server in servers.values():
            # warm-up: every adapter loaded, the KV buffers grown to the rounds' length
            http_round(server.url, models, texts, setup.new_tokens)
        for repeat in range(setup.repeats):
            order = list(servers) if repeat % 2 == 0 else list(reversed(servers))
            for side in order:
                cpu, started = cpu_seconds(servers[side]), time.perf_counter()
                r = http_round(servers[side].url, models, texts, setup.new_tokens)
                tokens = r.tokens_per_s * (time.perf_counter() - started)
                values[side].append(r.tokens_per_s)
                cpu_ms[side].append(1000 * (cpu_seconds(servers[side]) - cpu) / tokens)
        scored = sum(
            1 for line in on.metrics().splitlines() if line.startswith("lorafleet_drift_score{")
        )
        unscored = sum(
            1 for line in off.metrics().splitlines() if line.startswith("lorafleet_drift_")
        )
    # Each repeat's two rounds ran back to back: their ratio cancels load that other
    # processes put on the machine for a while, which a ratio of medians does not.
    pairs = [a / b for a, b in zip(values["drift-on"], values["drift-off"], strict=True)]
    figure = Figure(
        "B9",
        "drift on / drift off, HTTP, B1 mixed load, tok/s of back-to-back rounds",
        setup.as_dict(),
        "x",
        {"on/off": pairs},
        ">= 0.98 (median)",
        headline="on/off",
        details={
            "tokens_per_s": values,
            "server_cpu_ms_per_token": cpu_ms,
            "drift_scores_exported": scored,
            "drift_series_without_drift": unscored,
        },
    )
    figure.met = statistics.median(pairs) >= 0.98
    on_cpu, off_cpu = (statistics.median(cpu_ms[s]) for s in ("drift-on", "drift-off"))
    figure.note = (
        f"each {', '.join(f'{r:.3f}' for r in pairs)}; tok/s {_spread(values['drift-on'])} vs "
        f"{_spread(values['drift-off'])}; server CPU per token {on_cpu:.2f} vs {off_cpu:.2f} ms; "
        f"{scored} drift scores exported"
    )
    return figure


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4g} ({min(values):.3g}-{max(values):.3g})"
