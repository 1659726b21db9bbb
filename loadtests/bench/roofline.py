"""R1: how far the hf engine's decode step is from what this machine can do.

In one child process (no torch math in the bench's own process), on the bench's base:

- the machine's limits, measured: the GEMM rate at each of the decode step's shapes (batch
  `streams`, the weights hot in cache: AMX or AVX-512 kernels where the CPU has them) and
  the weight-streaming bandwidth (batch-1 products over every weight matrix of the model
  in turn, ~150 MiB in bf16, more than the caches hold);
- from them the step's lower bound: for each of its matmuls the larger of its FLOPs at the
  hot rate and its weight bytes at the streaming bandwidth, plus the KV the attention
  reads at the streaming bandwidth;
- the engine's own decode step (RowModel + AdapterSlots as the hf engine drives them, batch
  `streams`, base only and mixed over the adapters), timed without the profiler, and its
  time split by torch's profiler into matmuls, attention, the other ops and what is left
  (Python, dispatch and the profiler's own cost), the LoRA share as mixed minus base.

    python -m loadtests.bench.roofline --base DIR --adapters DIR... --dtype bf16 --out F.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtests.bench.common import ROOT, Figure, Setup, prompts

STEPS = 40  # decode steps per timing
ATTENTION_OPS = ("bmm", "softmax", "scaled_dot_product", "flash_attention", "baddbmm")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::linear")


def roofline_figure(work: Path, base: Path, adapters: list[Path], setup: Setup) -> Figure:
    out = work / "roofline.json"
    args = [f"--base={base}", f"--dtype={setup.dtype}", f"--streams={setup.streams}"]
    args += [f"--out={out}", f"--repeats={setup.repeats}", f"--rank={setup.rank}"]
    args += [f"--adapters={a}" for a in adapters]
    subprocess.run([sys.executable, "-m", "loadtests.bench.roofline", *args], check=True, cwd=ROOT)
    found = json.loads(out.read_text())
    bound = found["bound"]
    engine = [setup.streams / s for s in found["base_step_s"]]
    note = (
        f"bound {bound['step_ms']:.2f} ms/step ({bound['matmul_ms']:.2f} matmuls: "
        f"{bound['compute_ms']:.2f} at the hot GEMM rate, {bound['stream_ms']:.2f} streaming "
        f"weights; {bound['kv_ms']:.2f} KV); GEMM {found['gemm_tflops_median']:.2f} TFLOP/s "
        f"hot (median of the step's shapes), streaming {found['stream_gb_s']:.1f} GB/s; "
        f"engine step base {statistics.median(found['base_step_s']) * 1e3:.2f} ms, mixed "
        f"{statistics.median(found['mixed_step_s']) * 1e3:.2f} ms; split (ms): "
        + ", ".join(f"{k} {v:.2f}" for k, v in found["split_ms"].items())
    )
    return Figure(
        "R1",
        "engine base-only decode tok/s / the machine's bound for the step",
        setup.as_dict(),
        "tok/s",
        {"engine": engine, "bound": [setup.streams / (bound["step_ms"] / 1e3)]},
        "report",
        numerator="engine",
        denominator="bound",
        note=note,
        details=found,
    )


def decode_matmuls(config: Any) -> list[tuple[str, int, int]]:
    """(name, in, out) of every weight matmul of one decode step, layer by layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head_dim
    layer = [
        ("q_proj", hidden, heads * head_dim),
        ("k_proj", hidden, kv),
        ("v_proj", hidden, kv),
        ("o_proj", heads * head_dim, hidden),
        ("gate_proj", hidden, inter),
        ("up_proj", hidden, inter),
        ("down_proj", inter, hidden),
    ]
    return [*(layer * config.num_hidden_layers), ("lm_head", hidden, config.vocab_size)]


def best_s(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def limits(model: Any, batch: int, dtype: Any) -> dict[str, Any]:
    """Hot GEMM rates per decode shape and the weight-streaming bandwidth."""
    import torch

    shapes = sorted({(k, n) for _, k, n in decode_matmuls(model.config)})
    rates = {}
    for k, n in shapes:
        x, w = torch.randn(batch, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        seconds = best_s(lambda x=x, w=w: [x @ w for _ in range(10)], 5) / 10
        rates[f"{k}x{n}"] = 2 * batch * k * n / seconds
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() * w.element_size() for w in weights)
    ones = {w.shape[1]: torch.ones(1, w.shape[1], dtype=dtype) for w in weights}
    seconds = best_s(lambda: [ones[w.shape[1]] @ w.t() for w in weights], 5)
    return {"gemm_flops": rates, "stream_bytes_s": total / seconds, "weight_bytes": total}


def bound(model: Any, batch: int, span: int, found: dict[str, Any], dtype: Any) -> dict[str, float]:
    config, size = model.config, dtype.itemsize
    compute = stream = matmul = 0.0
    for _, k, n in decode_matmuls(config):
        flops = 2 * batch * k * n
        c, s = flops / found["gemm_flops"][f"{k}x{n}"], k * n * size / found["stream_bytes_s"]
        compute, stream, matmul = compute + c, stream + s, matmul + max(c, s)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_bytes = 2 * config.num_hidden_layers * batch * span * config.num_key_value_heads * head_dim
    kv = kv_bytes * size / found["stream_bytes_s"]
    return {
        "step_ms": (matmul + kv) * 1e3,
        "matmul_ms": matmul * 1e3,
        "compute_ms": compute * 1e3,
        "stream_ms": stream * 1e3,
        "kv_ms": kv * 1e3,
    }


def category(name: str) -> str:
    if any(op in name for op in ATTENTION_OPS):
        return "attention"
    if name in MATMUL_OPS:
        return "matmuls"
    return "other ops"


def split(profile: Any, steps: int) -> dict[str, float]:
    """Self CPU time per step (ms) of each category of aten op."""
    totals: dict[str, float] = {"matmuls": 0.0, "attention": 0.0, "other ops": 0.0}
    for event in profile.key_averages():
        if event.key.startswith("aten::"):
            totals[category(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return totals


def top_ops(profile: Any, steps: int, count: int = 12) -> list[tuple[str, float, int]]:
    """The aten ops of most self CPU time: (name, ms per step, calls per step)."""
    events = [e for e in profile.key_averages() if e.key.startswith("aten::")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in events[:count]]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.engines.lora_slots import AdapterSlots, read_adapter
    from serving.engines.row_model import RowModel

    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapters", type=Path, action="append", default=[])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8, help="the engine's max rank")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=dtype).eval()
    batch = args.streams
    found: dict[str, Any] = limits(model, batch, dtype)

    slots = AdapterSlots(model, max(1, len(args.adapters)), args.rank)
    for i, path in enumerate(args.adapters):
        slots.load(i, read_adapter(path))
    rows = RowModel(model, batch, 512)
    tokenizer = AutoTokenizer.from_pretrained(str(args.base))
    ids = [tokenizer(t)["input_ids"] for t in prompts(batch)]
    lengths = torch.tensor([len(i) for i in ids])
    padded = torch.zeros((batch, int(lengths.max())), dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = torch.tensor(row)
    # Row i: the base when i % (adapters + 1) is 0, else adapter slot i % (adapters + 1) - 1.
    cycle = len(args.adapters) + 1
    mixed = [None if i % cycle == 0 else i % cycle - 1 for i in range(batch)]

    def steps(routing: list[int | None], count: int, profile: Any = None) -> float:
        """Prefill, then `count` decode steps (under `profile` when given); seconds per
        decode step."""
        slots.set_rows(routing, dtype)
        width = padded.shape[1]
        rows.forward(padded, torch.arange(width).expand(batch, width), (0, lengths))
        tokens = torch.ones((batch, 1), dtype=torch.long)
        if profile is not None:
            profile.start()
        start = time.perf_counter()
        for t in range(count):
            slots.set_rows(routing, dtype)
            rows.forward(tokens, (lengths + t)[:, None], None)
        seconds = (time.perf_counter() - start) / count
        if profile is not None:
            profile.stop()
        return seconds

    base_only: list[int | None] = [None] * batch
    steps(base_only, 4)  # warm-up
    found["base_step_s"], found["mixed_step_s"] = [], []
    for _ in range(args.repeats):  # interleaved: the machine's load drifts
        found["base_step_s"].append(steps(base_only, STEPS))
        found["mixed_step_s"].append(steps(mixed, STEPS))
    # Limits again, keeping the better of each: a limit is what the machine can do.
    again = limits(model, batch, dtype)
    found["gemm_flops"] = {
        k: max(v, again["gemm_flops"][k]) for k, v in found["gemm_flops"].items()
    }
    found["stream_bytes_s"] = max(found["stream_bytes_s"], again["stream_bytes_s"])
    span = int(lengths.float().mean()) + STEPS // 2
    found["bound"] = bound(model, batch, span, found, dtype)
    parts = {}
    for name, routing in (("base", base_only), ("mixed", mixed)):
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiled = steps(routing, STEPS // 2, prof)
        parts[name] = split(prof, STEPS // 2)
        if name == "base":
            found["top_ops_ms"] = top_ops(prof, STEPS // 2)
        parts[name]["left"] = profiled * 1e3 - sum(parts[name].values())
    base_ms = statistics.median(found["base_step_s"]) * 1e3
    # The profiled step runs slower (the profiler's cost); shares are scaled to the real one.
    scale = base_ms / sum(parts["base"].values())
    found["split_ms"] = {k: v * scale for k, v in parts["base"].items()}
    found["split_ms"]["lora (mixed - base)"] = (
        statistics.median(found["mixed_step_s"]) * 1e3 - base_ms
    )
    found["profiled_ms"] = parts
    rates = list(found["gemm_flops"].values())
    found["gemm_tflops_median"] = statistics.median(rates) / 1e12
    found["stream_gb_s"] = found["stream_bytes_s"] / 1e9
    args.out.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
