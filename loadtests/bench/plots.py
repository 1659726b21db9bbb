"""PNG plots of a bench run: throughput vs concurrency, throughput vs adapters in the
traffic, latency percentiles. Each states its setup under its title."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtests.bench.common import Figure, percentile
from loadtests.bench.throughput import Sweeps


def _setup_line(setup: dict[str, Any], **extra: Any) -> str:
    keys = ("model", "dtype", "engine", "new_tokens", "rank", "streams")
    parts = [f"{k} {setup[k]}" for k in keys if k in setup]
    parts += [f"{k} {v}" for k, v in extra.items()]
    return ", ".join(parts) + ", 2 CPU cores"


def write_plots(prefix: Path, sweeps: Sweeps, figures: list[Figure]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {f.name: f for f in figures}
    setup = by_name["B1"].setup
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = sorted(sweeps.concurrency)
    ax.plot(xs, [sweeps.concurrency[x] for x in xs], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent streams (mixed: 8 adapters + base, round robin)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Throughput vs concurrency (HTTP, hf engine)\n" + _setup_line(setup), fontsize=9)
    ax.grid(alpha=0.3)
    written.append(_save(fig, prefix, "throughput-concurrency"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = sorted(sweeps.adapters)
    ax.plot(xs, [sweeps.adapters[x] for x in xs], marker="o", label="k adapters + base")
    if "B5" in by_name:
        b5 = by_name["B5"]
        for side, marker in (("uniform", "s"), ("zipf", "^")):
            ax.scatter(
                [b5.setup["active"]], [b5.median(side)], marker=marker, label=f"100 active, {side}"
            )
        ax.scatter([1], [b5.median("one adapter")], marker="x", label="one adapter (B5 server)")
    ax.set_xscale("symlog", linthresh=1)
    ticks = [*xs, *([by_name["B5"].setup["active"]] if "B5" in by_name else [])]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("adapters in the traffic (0: base only)")
    ax.set_ylabel("generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs adapters in the traffic (HTTP)\n" + _setup_line(setup), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    written.append(_save(fig, prefix, "throughput-adapters"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    qs = (50, 90, 99)
    sides = list(sweeps.latencies)
    width = 0.8 / max(1, len(sides))
    for i, side in enumerate(sides):
        values = [percentile(sweeps.latencies[side], q) for q in qs]
        ax.bar([j + i * width for j in range(len(qs))], values, width, label=f"B1 {side}")
    ax.set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(qs))], [f"p{q}" for q in qs])
    ax.set_ylabel("request latency, s (64 tokens)")
    title = "Request latency percentiles (HTTP, all requests at once)"
    if "B4" in by_name:
        b4 = by_name["B4"]
        title += f"\nhot-swap B4: p50 {b4.median('p50'):.2f} s, p99 {b4.median('p99'):.2f} s"
    ax.set_title(title + "\n" + _setup_line(setup), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    written.append(_save(fig, prefix, "latency"))
    return written


def _save(fig: Any, prefix: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = prefix.with_name(f"{prefix.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
