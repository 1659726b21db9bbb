"""B7 and the tuning half of M1: `lorafleet tune` against the LoRA fine-tuning script a
careful user writes with transformers + peft alone (`plain_trainer.py` beside this file).

Both sides train the same base model on the same rows (the first unique rows of the
sentiment example, prompt + completion, loss on the completion and eos), with the same LoRA
(rank, alpha, target modules, no dropout), AdamW at the same lr with cosine decay and no
warmup, gradient clipping, seed, dtype and 2 threads, for one epoch, each in its own process
started from the repository root. The plain side pads every batch to its longest example;
lorafleet packs examples into rows (no attention across them, checked by lorafleet), with
the rows per batch chosen so that a step takes about as many examples as the plain side's
batch (so the step counts differ by about one). Evaluation is the same on both sides:
token-weighted mean cross-entropy over the completion tokens of the same held-out rows,
after training.

What is timed, on each side, inside the training process:
  plain      Trainer.train() from on_train_begin to on_train_end (the Trainer runs no
             evaluation, checkpoints or logging in between);
  lorafleet  tuning.train.train_loop, less the time of its eval-loss steps
             (tuning.train._evaluate_step, held to one, at the last step).
Model loading, tokenization, lorafleet's packing check and the final evaluations are outside
both clocks. Training tokens are the real (non-padding) tokens of the batches each side
consumed: the Trainer's `num_input_tokens_seen` (non_padding), and for lorafleet the
non-padding tokens of every micro-batch its stream handed to the loop. lorafleet runs through
its CLI entry point (`registry.cli.main(["tune", ...])`) with those functions wrapped by
timers; nothing else changes.

Repeats alternate which side runs first; a repeat starts only while the ones before project
the whole B7 to end within `TuneSettings.budget_s` (4 minutes), so a loaded machine gets
fewer than `Setup.repeats` (the figure records how many).

M1t: peak resident set of each training process (ru_maxrss from wait4), same runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.bench.common import ROOT, TARGET_MODULES, Figure, Setup, build_base, ratio_figure

SENTIMENT = ROOT / "examples" / "data" / "sentiment"
PLAIN_SCRIPT = Path(__file__).with_name("plain_trainer.py")
MIB = 1024 * 1024
PLAIN, LORAFLEET_SIDE = "plain Trainer", "lorafleet tune"

# Runs `lorafleet tune` through its CLI entry point with the training loop, its eval-loss
# steps and its micro-batch stream wrapped: argv is RESULT.json CONFIG.yaml [KEY=VALUE ...].
TIMED_TUNE = """
import json, sys, time
from pathlib import Path
from registry.cli import main
from tuning import train

clock = {"train_s": 0.0, "eval_s": 0.0, "tokens": 0}
loop, evaluate_step, stream = train.train_loop, train._evaluate_step, train.micro_batch_stream

def timed(function, key):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - started
    return wrapper

def counted(*args, **kwargs):
    pad_id = kwargs["pad_id"] if "pad_id" in kwargs else args[2]  # (train, config, pad_id, ...)
    for batch in stream(*args, **kwargs):
        mask = batch.get("attention_mask")
        real = mask.sum() if mask is not None else (batch["input_ids"] != pad_id).sum()
        clock["tokens"] += int(real)
        yield batch

train.train_loop = timed(loop, "train_s")
train._evaluate_step = timed(evaluate_step, "eval_s")
train.micro_batch_stream = counted
code = main(["tune", *sys.argv[2:]])
Path(sys.argv[1]).write_text(json.dumps(clock))
sys.exit(code)
"""


@dataclass(frozen=True)
class TuneSettings:
    """What both sides train with (rank, alpha, targets and dtype come from the Setup)."""

    train_examples: int = 160
    """First unique rows of the sentiment training file."""
    eval_examples: int = 64
    """First rows of the sentiment eval file."""
    batch_size: int = 16
    """Examples per optimizer step (lorafleet: packed rows holding about as many)."""
    epochs: int = 1
    lr: float = 3e-3
    warmup_steps: int = 0
    """Both schedules agree from step 0 only without warmup (the Trainer's first warmup step
    has lr 0, lorafleet's lr / warmup_steps)."""
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_batch_size: int = 16
    pack_length: int = 256
    """lorafleet's packed row length in tokens (data.max_length)."""
    threads: int = 2
    budget_s: float = 240.0
    """Another repeat starts only if the repeats so far project it to end within this."""
    eval_loss_tolerance: float = 0.01
    """lorafleet's eval loss counts as not worse up to this relative excess."""


@dataclass
class Run:
    """One training process: what it reported, its peak RSS and its whole wall time."""

    tokens_per_s: float
    train_s: float
    tokens: int
    steps: int
    eval_loss: float
    peak_rss: int  # bytes
    wall_s: float


def tuning_figures(work: Path, base: Path, setup: Setup) -> list[Figure]:
    """B7 and the tuning half of M1."""
    settings = TuneSettings()
    if setup.dtype not in ("fp32", "bf16"):
        raise SystemExit(f"B7: dtype {setup.dtype!r} cannot be trained; use fp32 or bf16")
    root = work / "tuning"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train = write_rows(SENTIMENT / "train.jsonl", root / "train.jsonl", settings.train_examples)
    held_out = write_rows(SENTIMENT / "eval.jsonl", root / "eval.jsonl", settings.eval_examples)
    rows_per_batch, examples_per_row = packed_batch_rows(base, train, settings)
    config = write_config(root, base, train, held_out, setup, settings, rows_per_batch)
    env = child_env(settings.threads, root / "datasets-cache")

    runs: dict[str, list[Run]] = {PLAIN: [], LORAFLEET_SIDE: []}
    started = time.perf_counter()
    while len(runs[PLAIN]) < setup.repeats:
        i = len(runs[PLAIN])
        # Alternate which side goes first, so drift in the machine's load hits both alike.
        order = (PLAIN, LORAFLEET_SIDE) if i % 2 == 0 else (LORAFLEET_SIDE, PLAIN)
        for side in order:
            out = root / f"{'plain' if side == PLAIN else 'lorafleet'}-{i}"
            if side == PLAIN:
                runs[side].append(run_plain(out, env, base, train, held_out, setup, settings))
            else:
                runs[side].append(run_lorafleet(out, env, config))
        elapsed = time.perf_counter() - started
        if elapsed * (i + 2) / (i + 1) > settings.budget_s:
            break
    b7_wall_s = time.perf_counter() - started
    return [
        speed_figure(runs, setup, settings, rows_per_batch, examples_per_row, b7_wall_s),
        memory_figure(runs, setup, settings),
    ]


def speed_figure(
    runs: dict[str, list[Run]],
    setup: Setup,
    settings: TuneSettings,
    rows_per_batch: int,
    examples_per_row: float,
    wall_s: float,
) -> Figure:
    eval_loss = {side: statistics.median(r.eval_loss for r in rs) for side, rs in runs.items()}
    limit = eval_loss[PLAIN] * (1 + settings.eval_loss_tolerance)
    return ratio_figure(
        "B7",
        "tuning tokens/s, lorafleet tune / Trainer + peft",
        trained_setup(setup, settings, len(runs[PLAIN])),
        "tok/s",
        {side: [r.tokens_per_s for r in rs] for side, rs in runs.items()},
        LORAFLEET_SIDE,
        PLAIN,
        at_least=1.5,
        eval_loss=eval_loss,
        eval_loss_not_worse=eval_loss[LORAFLEET_SIDE] <= limit,
        eval_losses={side: [r.eval_loss for r in rs] for side, rs in runs.items()},
        train_s={side: [round(r.train_s, 2) for r in rs] for side, rs in runs.items()},
        train_tokens={side: [r.tokens for r in rs] for side, rs in runs.items()},
        steps={side: [r.steps for r in rs] for side, rs in runs.items()},
        process_wall_s={side: [round(r.wall_s, 1) for r in rs] for side, rs in runs.items()},
        repeats=len(runs[PLAIN]),
        b7_wall_s=round(wall_s, 1),
        lorafleet_packing={
            "row_tokens": settings.pack_length,
            "rows_per_batch": rows_per_batch,
            "examples_per_row": round(examples_per_row, 2),
        },
        timed="plain: Trainer on_train_begin..on_train_end; lorafleet: train_loop less its "
        "eval-loss steps; tokens: non-padding tokens of the consumed batches",
    )


def memory_figure(runs: dict[str, list[Run]], setup: Setup, settings: TuneSettings) -> Figure:
    figure = Figure(
        "M1t",
        "tuning peak RSS, lorafleet tune / Trainer + peft",
        trained_setup(setup, settings, len(runs[PLAIN])),
        "MiB",
        {side: [r.peak_rss / MIB for r in rs] for side, rs in runs.items()},
        "report (no target)",
        LORAFLEET_SIDE,
        PLAIN,
        details={"measured": "ru_maxrss of each training process (wait4), same runs as B7"},
    )
    return figure


def trained_setup(setup: Setup, settings: TuneSettings, repeats: int) -> dict[str, Any]:
    """The Setup fields training uses (the serving load does not apply) and the settings."""
    return {
        "model": setup.model,
        "dtype": setup.dtype,
        "rank": setup.rank,
        "alpha": 2 * setup.rank,
        "target_modules": list(TARGET_MODULES),
        "repeats": repeats,
        **asdict(settings),
    }


def write_rows(source: Path, target: Path, count: int) -> Path:
    """The first `count` unique rows of a JSONL file (lorafleet drops duplicates; the plain
    script would not, so neither side gets any)."""
    seen: set[str] = set()
    rows: list[str] = []
    for line in source.read_text().splitlines():
        key = json.dumps(json.loads(line), sort_keys=True) if line.strip() else ""
        if key and key not in seen:
            seen.add(key)
            rows.append(line)
        if len(rows) == count:
            break
    if len(rows) < count:
        raise SystemExit(f"B7: {source} has {len(rows)} unique rows, fewer than {count}")
    target.write_text("\n".join(rows) + "\n")
    return target


def packed_batch_rows(base: Path, train: Path, settings: TuneSettings) -> tuple[int, float]:
    """Packed rows per lorafleet batch that hold about `batch_size` examples, from a greedy
    packing of the rows in file order (lorafleet packs them shuffled: about as many rows)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    lengths = []
    for line in train.read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer.encode(row["prompt"]).ids
        answer = tokenizer.encode(row["completion"], add_special_tokens=False).ids
        lengths.append(len(prompt) + len(answer) + 1)  # + eos
    rows, used = 1, 0
    for n in lengths:
        if used + n > settings.pack_length and used:
            rows, used = rows + 1, 0
        used += n
    per_row = len(lengths) / rows
    return max(1, round(settings.batch_size / per_row)), per_row


def write_config(
    root: Path,
    base: Path,
    train: Path,
    held_out: Path,
    setup: Setup,
    settings: TuneSettings,
    rows_per_batch: int,
) -> Path:
    import yaml

    config = {
        "base": str(base),
        "data": {
            "train": [str(train)],
            "eval": [str(held_out)],
            "format": "completion",
            "max_length": settings.pack_length,
            "packing": True,
        },
        "method": {
            "r": setup.rank,
            "alpha": 2 * setup.rank,
            "dropout": 0.0,
            "target_modules": list(TARGET_MODULES),
        },
        "training": {
            "lr": settings.lr,
            "schedule": settings.schedule,
            "warmup_steps": settings.warmup_steps,
            "batch_size": rows_per_batch,
            "epochs": settings.epochs,
            "max_grad_norm": settings.max_grad_norm,
            "eval_every": 1_000_000,  # one eval-loss step, at the end
            "seed": settings.seed,
            "dtype": setup.dtype,
            "resume": False,
        },
        "evaluation": {
            "generate": False,
            "forgetting": False,
            "batch_size": settings.eval_batch_size,
        },
        "output": {"dir": str(root / "lorafleet"), "overwrite": True},
    }
    path = root / "lorafleet.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def child_env(threads: int, datasets_cache: Path) -> dict[str, str]:
    """Offline, `threads` OpenMP threads, and lorafleet's dataset cache in the work dir."""
    return {
        **os.environ,
        "HF_DATASETS_CACHE": str(datasets_cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def run_child(name: str, argv: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run to the end from the repository root; return its peak RSS (bytes) and wall time."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall_s = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"B7: {name} exited with {process.returncode} (log {log}):\n{tail}")
    return usage.ru_maxrss * 1024, wall_s  # ru_maxrss is in KiB on Linux


def run_plain(
    out: Path,
    env: dict[str, str],
    base: Path,
    train: Path,
    held_out: Path,
    setup: Setup,
    settings: TuneSettings,
) -> Run:
    out.mkdir()
    result = out / "result.json"
    argv = [
        sys.executable,
        str(PLAIN_SCRIPT),
        str(base),
        str(train),
        str(held_out),
        str(result),
        "--output-dir",
        str(out / "trainer"),
        "--dtype",
        setup.dtype,
        "--threads",
        str(settings.threads),
        "--r",
        str(setup.rank),
        "--alpha",
        str(2 * setup.rank),
        "--targets",
        ",".join(TARGET_MODULES),
        "--lr",
        str(settings.lr),
        "--schedule",
        settings.schedule,
        "--warmup-steps",
        str(settings.warmup_steps),
        "--batch-size",
        str(settings.batch_size),
        "--epochs",
        str(settings.epochs),
        "--max-grad-norm",
        str(settings.max_grad_norm),
        "--eval-batch-size",
        str(settings.eval_batch_size),
        "--seed",
        str(settings.seed),
    ]
    peak, wall_s = run_child("the plain Trainer script", argv, env, out / "log.txt")
    r = json.loads(result.read_text())
    return Run(
        r["tokens_per_s"], r["train_s"], r["train_tokens"], r["steps"], r["eval_loss"], peak, wall_s
    )


def run_lorafleet(out: Path, env: dict[str, str], config: Path) -> Run:
    clock_file = out / "clock.json"
    out.mkdir()
    argv = [sys.executable, "-c", TIMED_TUNE, str(clock_file), str(config), f"output.dir={out}"]
    peak, wall_s = run_child("lorafleet tune", argv, env, out / "log.txt")
    clock = json.loads(clock_file.read_text())
    metadata = json.loads((out / "adapter" / "lorafleet.json").read_text())
    train_s = clock["train_s"] - clock["eval_s"]
    return Run(
        clock["tokens"] / train_s,
        train_s,
        clock["tokens"],
        int(metadata["metrics"]["train"]["steps"]),
        float(metadata["metrics"]["eval_loss"]),
        peak,
        wall_s,
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-tuning-") as tmp:
        work = Path(tmp)
        setup = Setup()
        base = build_base(work, setup.model)
        for figure in tuning_figures(work, base, setup):
            print(figure.line())
            print(json.dumps(figure.details, indent=1))


if __name__ == "__main__":
    main()
