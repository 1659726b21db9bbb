"""`lorafleet base ...`: build offline base models (entry point of the lorafleet command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuning.tinymodel import SHAPES, build_base_model, build_random_adapter


def add_base_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet base ...`."""
    base = commands.add_parser(
        "base",
        help="build offline base models and synthetic adapters",
        description="Build base models locally (any Hugging Face model directory works as a "
        "base too), and adapters with random weights for tests, demos and benchmarks.",
    )
    sub = base.add_subparsers(title="base commands", metavar="COMMAND", required=True)
    tiny = sub.add_parser(
        "tiny",
        help="build a Llama-architecture model with its own tokenizer from a config",
        description="Build a Llama-architecture causal LM with a byte-level BPE tokenizer "
        "trained on generated text, a ChatML chat template, eos and pad tokens. The same "
        "seed writes byte-identical files. Sizes: tiny (~0.6M parameters, for tests), "
        "small (~83M, for benchmarks).",
    )
    tiny.add_argument("--out", type=Path, required=True, help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    tiny.add_argument("--size", choices=sorted(SHAPES), default="tiny", help="model size")
    tiny.set_defaults(handler=cmd_base_tiny)

    adapter = sub.add_parser(
        "adapter",
        help="write a PEFT LoRA adapter with seeded random weights for a base",
        description="Write a PEFT LoRA adapter (adapter_config.json + safetensors) whose A and "
        "B matrices are drawn from a seeded generator, so it changes the base's outputs: a "
        "stand-in for a trained adapter.",
    )
    adapter.add_argument("--base", type=Path, required=True, help="base model directory")
    adapter.add_argument("--out", type=Path, required=True, help="output directory")
    adapter.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    adapter.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (default 16)")
    adapter.add_argument(
        "--targets", default="q_proj,v_proj", help="comma-separated target modules"
    )
    adapter.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    adapter.set_defaults(handler=cmd_base_adapter)


def cmd_base_tiny(args: argparse.Namespace) -> int:
    out = build_base_model(args.out, size=args.size, seed=args.seed)
    print(f"wrote {args.size} base model to {out}")
    return 0


def cmd_base_adapter(args: argparse.Namespace) -> int:
    out = build_random_adapter(
        args.base,
        args.out,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        seed=args.seed,
    )
    print(f"wrote rank-{args.rank} adapter for {args.base} to {out}")
    return 0
