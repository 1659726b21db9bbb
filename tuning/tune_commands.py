"""`lorafleet base ...`: build offline base models (entry point of the lorafleet command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuning.tinymodel import (
    ARCHITECTURES,
    SHAPES,
    TIED_FAMILIES,
    build_base_model,
    build_random_adapter,
)

TUNE_HELP = """Fine-tune a LoRA adapter: CONFIG.yaml plus KEY.SUB=VALUE overrides (values parsed
as YAML, e.g. training.lr=3e-4 method.target_modules=[q_proj,v_proj]). Writes
OUTPUT.DIR/adapter (PEFT files, lorafleet.json with metrics against the base, profile.json,
loss.png) and registers it with --register. Several processes: torchrun --nproc_per_node N
-m tuning CONFIG.yaml (or accelerate launch -m tuning ...)."""


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
        help="build a random model of a supported family with its own tokenizer",
        description="Build a causal LM of one of the families the hf engine serves (--arch), "
        "with random weights, a byte-level BPE tokenizer trained on generated text, a ChatML "
        "chat template, eos and pad tokens. Each family gets the fields that make its own "
        "code matter at this size: sliding windows shorter than a test prompt, softcapping, "
        "multipliers, layers without RoPE, experts. The same seed writes byte-identical "
        "files. Sizes: tiny (~0.75M parameters, for tests), small (~80M, for benchmarks).",
    )
    tiny.add_argument("--out", type=Path, required=True, help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    tiny.add_argument("--size", choices=sorted(SHAPES), default="tiny", help="model size")
    tiny.add_argument(
        "--arch",
        choices=ARCHITECTURES,
        default="llama",
        metavar="NAME",
        help=f"model type: {', '.join(ARCHITECTURES)} (default llama)",
    )
    tied = tiny.add_mutually_exclusive_group()
    tied.add_argument(
        "--tied",
        dest="tied",
        action="store_const",
        const=True,
        default=None,
        help="tie lm_head to the input embeddings (default: as the family's small "
        f"checkpoints: tied for {', '.join(sorted(TIED_FAMILIES))})",
    )
    tied.add_argument(
        "--untied", dest="tied", action="store_const", const=False, help="a separate lm_head"
    )
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
        "--targets",
        help="comma-separated target modules (default: the base family's attention "
        "projections, q_proj,v_proj or phi3's qkv_proj)",
    )
    adapter.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    adapter.set_defaults(handler=cmd_base_adapter)

    fetch = sub.add_parser(
        "fetch",
        help="copy a base model directory from an object store, checked against the registry",
        description="Copy the base model at URL (s3://BUCKET/PATH, gs://, az://, file://) to "
        "DIR, as each replica of a shared registry needs it on local disk; its fingerprint "
        "must be the registry's base (the registry of --home / --registry, when there is one). "
        "A DIR that already holds that base is kept.",
    )
    fetch.add_argument("url", help="where the base model directory is")
    fetch.add_argument("--out", type=Path, required=True, help="local directory to fill")
    fetch.add_argument("--home", type=Path, help="registry directory (default $LORAFLEET_HOME)")
    from registry.arguments import add_store_options

    add_store_options(fetch)
    fetch.add_argument(
        "--no-registry",
        action="store_true",
        help="copy without checking the fingerprint against a registry",
    )
    fetch.set_defaults(handler=cmd_base_fetch)


def cmd_base_tiny(args: argparse.Namespace) -> int:
    out = build_base_model(
        args.out, size=args.size, seed=args.seed, arch=args.arch, tie_word_embeddings=args.tied
    )
    print(f"wrote {args.size} {args.arch} base model to {out}")
    return 0


def cmd_base_adapter(args: argparse.Namespace) -> int:
    targets = None
    if args.targets is not None:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    out = build_random_adapter(
        args.base,
        args.out,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=targets,
        seed=args.seed,
    )
    print(f"wrote rank-{args.rank} adapter for {args.base} to {out}")
    return 0


def cmd_base_fetch(args: argparse.Namespace) -> int:
    from registry.basemodel import fetch_base
    from registry.registry import Registry

    expected = None
    if not args.no_registry:
        registry = Registry(args.home)
        expected = registry.base.fingerprint
        registry.close()
    info = fetch_base(args.url, args.out, expected)
    checked = "the registry's base" if expected else "not checked against a registry"
    print(f"base {info.fingerprint[:12]} ({info.model_type}) in {info.path}: {checked}")
    return 0


def add_tune_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet tune`."""
    tune = commands.add_parser(
        "tune", help="fine-tune a LoRA adapter from a YAML config", description=TUNE_HELP
    )
    add_tune_arguments(tune)
    tune.set_defaults(handler=cmd_tune)


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE", help="config overrides")
    parser.add_argument(
        "--print-defaults", action="store_true", help="print a complete commented config and exit"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        help="training.dtype (default auto: bf16 where the CPU has AMX or AVX512-BF16, else fp32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="training.threads: torch threads (default: every core, fewer while other "
        "processes keep one busy)",
    )
    parser.add_argument("--register", metavar="NAME", help="register the adapter as NAME")
    parser.add_argument("--alias", help="with --register: also point this alias at it")
    parser.add_argument("--home", type=Path, help="registry directory (default $LORAFLEET_HOME)")
    from registry.arguments import add_store_options

    add_store_options(parser)


def cmd_tune(args: argparse.Namespace) -> int:
    from tuning.config import default_yaml, load_config
    from tuning.errors import ConfigError

    if args.print_defaults:
        print(default_yaml(), end="")
        return 0
    if args.config is None:
        raise ConfigError("give a CONFIG.yaml (see `lorafleet tune --print-defaults`)")
    overrides = list(args.overrides)
    for key, value in (("dtype", args.dtype), ("threads", args.threads)):
        if value is not None:
            overrides.append(f"training.{key}={value}")
    for key, value in (("name", args.register), ("alias", args.alias), ("home", args.home)):
        if value is not None:
            overrides.append(f"register.{key}={value}")
    config = load_config(args.config, overrides)

    from tuning.train import run

    result = run(config, source=str(args.config))
    if result.registered is None and not result.metadata.metrics:
        return 0  # not the process that reports (torchrun rank > 0)
    metrics = result.metadata.metrics
    base = metrics.get("base", {})
    lines = [f"adapter: {result.adapter_dir}"]
    if "baselines" in metrics:  # a classifier
        majority, probe = metrics["baselines"]["majority"], metrics["baselines"]["linear_probe"]
        lines.append(f"  labels         {', '.join(result.metadata.labels or [])}")
        lines.append(f"  eval_loss      {metrics['eval_loss']:.4f}")
        for key in ("accuracy", "macro_f1"):
            lines.append(
                f"  {key:<14} {metrics[key]:.4f}   linear probe {probe[key]:.4f}   "
                f"majority class {majority[key]:.4f}"
            )
        lines.append(f"  confusion      {result.adapter_dir / 'confusion.png'}")
    for key in ("eval_loss", "perplexity", "exact_match", "token_f1"):
        if key in metrics and "baselines" not in metrics:
            lines.append(f"  {key:<14} {metrics[key]:.4f}   base {base.get(key, float('nan')):.4f}")
    if "forgetting" in metrics:
        f = metrics["forgetting"]
        lines.append(
            f"  reference ppl  {f['reference_perplexity']:.2f}   base "
            f"{f['base_reference_perplexity']:.2f} ({f['change_pct']:+.1f}%)"
        )
    lines.append(f"  loss curve     {result.adapter_dir / 'loss.png'}")
    if result.registered:
        lines.append(f"registered {result.registered}")
    print("\n".join(lines))
    return 0
