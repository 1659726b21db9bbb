"""`lorafleet serve`: validate the server config, then run the BentoML service."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

SERVE_HELP = """Serve one base model and the registry's adapters over an OpenAI-compatible
HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /v1/feedback), with an admin
API behind --api-key and Prometheus metrics at /metrics. Alias changes in the registry (from
any process) take effect within a second."""


def add_serve_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet serve`."""
    p = commands.add_parser(
        "serve", help="serve the base model and its adapters over HTTP", description=SERVE_HELP
    )
    p.add_argument("--base", type=Path, required=True, help="base model directory")
    p.add_argument("--home", type=Path, help="registry directory (default $LORAFLEET_HOME)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000, help="listen port (default 3000)")
    p.add_argument(
        "--engine",
        choices=["auto", "hf", "vllm"],
        default="auto",
        help="auto: vllm with CUDA, else hf",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="base weights dtype")
    p.add_argument("--max-adapters", type=int, default=8, help="adapter versions resident at once")
    p.add_argument("--max-rank", type=int, default=16, help="largest LoRA rank served")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-len", type=int, default=1024, help="prompt + completion tokens")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body in bytes; larger gets 413 (default 4194304)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=512,
        help="requests to /v1/ in flight at once, streams included; more get 503 (default 512)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAFLEET_API_KEY"),
        help="admin API key (default $LORAFLEET_API_KEY; admin is off without one)",
    )
    p.add_argument(
        "--inference-key",
        default=os.environ.get("LORAFLEET_INFERENCE_KEY"),
        help="require Authorization: Bearer KEY on /v1/* (default $LORAFLEET_INFERENCE_KEY; "
        "open without one); /metrics, /readyz and /livez stay open",
    )
    p.add_argument(
        "--max-adapter-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="largest adapter (decoded files) POST /admin/adapters/NAME accepts "
        "(default 268435456); the body is also bounded by --max-body-bytes",
    )
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="NAME",
        help="keep this adapter's production and canary versions resident",
    )
    drift = p.add_argument_group("drift (serving/drift.py)")
    drift.add_argument(
        "--drift-window", type=int, default=500, help="requests per version in its drift window"
    )
    drift.add_argument(
        "--drift-window-s",
        type=float,
        default=3600.0,
        help="seconds a request stays in the drift window (default 3600)",
    )
    drift.add_argument(
        "--drift-min-samples",
        type=int,
        default=50,
        help="requests in a window before its scores are exported (default 50)",
    )
    drift.add_argument(
        "--drift-min-feedback",
        type=int,
        default=20,
        help="feedback ratings in a window before the feedback score is exported (default 20)",
    )
    drift.add_argument(
        "--drift-threshold",
        action="append",
        default=[],
        metavar="SIGNAL=VALUE",
        help="replace a signal's threshold, e.g. prompt_tokens=0.3 (repeatable)",
    )
    drift.add_argument(
        "--no-drift", action="store_true", help="keep no drift windows and export no scores"
    )
    loop = p.add_argument_group("request log and canary verdicts")
    loop.add_argument(
        "--no-request-log",
        action="store_true",
        help="log no requests (adapters also opt out one by one: setting request_log=false)",
    )
    loop.add_argument(
        "--request-log-max-rows",
        type=int,
        default=100_000,
        help="logged requests kept per adapter (default 100000)",
    )
    loop.add_argument(
        "--request-log-max-age-days",
        type=float,
        default=30.0,
        help="days a logged request is kept (default 30)",
    )
    loop.add_argument(
        "--no-canary-verdicts",
        action="store_true",
        help="never promote or roll back canaries automatically (manual verdicts still work)",
    )
    loop.add_argument(
        "--canary-interval-s",
        type=float,
        default=1.0,
        help="seconds between canary checks (default 1)",
    )
    p.set_defaults(handler=cmd_serve)


DRIFT_REPORT_HELP = """Fetch the drift of one adapter version from a running server (GET
/admin/drift, admin key needed) and write one self-contained HTML page: per signal the
baseline and live distributions as a plot, the score, the threshold and whether it drifted.
NAME alone means NAME:production as the server resolves it."""


def add_drift_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Entry point: add `lorafleet drift report`."""
    drift = commands.add_parser("drift", help="look at the drift of served adapter versions")
    sub = drift.add_subparsers(dest="drift_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "report",
        help="render baseline vs live distributions as HTML",
        description=DRIFT_REPORT_HELP,
    )
    p.add_argument("model", metavar="NAME[@V]", help="NAME, NAME:ALIAS or NAME@VERSION")
    p.add_argument("--out", type=Path, required=True, help="HTML file to write")
    p.add_argument(
        "--url",
        default="http://127.0.0.1:3000",
        help="the server's base URL (default http://127.0.0.1:3000)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LORAFLEET_API_KEY"),
        help="the server's admin key (default $LORAFLEET_API_KEY)",
    )
    p.set_defaults(handler=cmd_drift_report)


def cmd_drift_report(args: argparse.Namespace) -> int:
    from serving.drift_report import write_report

    report = write_report(args.model, args.out, url=args.url, api_key=args.api_key)
    drifted = [n for n, s in report["signals"].items() if s["status"] == "drifted"]
    print(
        f"{args.out}: {report['model']}, {report['samples']} requests in the window; "
        f"drifted: {', '.join(drifted) or 'none'}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from registry.errors import LorafleetError
    from registry.registry import Registry
    from serving.config import CONFIG_ENV, ServeConfig

    try:
        config = ServeConfig(
            base=args.base.resolve(),
            home=args.home.resolve() if args.home else None,
            engine=args.engine,
            dtype=args.dtype,
            max_adapters=args.max_adapters,
            max_rank=args.max_rank,
            max_batch=args.max_batch,
            max_len=args.max_len,
            max_tokens_limit=args.max_tokens_limit,
            max_body_bytes=args.max_body_bytes,
            max_concurrent_requests=args.max_concurrent_requests,
            api_key=args.api_key,
            inference_key=args.inference_key,
            max_adapter_bytes=args.max_adapter_bytes,
            pinned=args.pin,
            drift=not args.no_drift,
            drift_window=args.drift_window,
            drift_window_s=args.drift_window_s,
            drift_min_samples=args.drift_min_samples,
            drift_min_feedback=args.drift_min_feedback,
            drift_thresholds=_thresholds(args.drift_threshold),
            request_log=not args.no_request_log,
            request_log_max_rows=args.request_log_max_rows,
            request_log_max_age_days=args.request_log_max_age_days,
            canary_verdicts=not args.no_canary_verdicts,
            canary_interval_s=args.canary_interval_s,
        )
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise LorafleetError(f"invalid serve options: {problems}") from err
    Registry(config.home).close()  # a missing registry is a one-line error here, not in a worker
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"
    os.environ[CONFIG_ENV] = config.to_env()
    os.execv(
        bentoml,
        [
            bentoml,
            "serve",
            "serving.service:LoraFleet",
            "--host",
            args.host,
            "--port",
            str(args.port),
        ],
    )


def _thresholds(pairs: list[str]) -> dict[str, float]:
    """--drift-threshold SIGNAL=VALUE pairs; the signal names are checked by ServeConfig."""
    from registry.errors import LorafleetError

    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise LorafleetError(
                f"--drift-threshold {pair!r} is not SIGNAL=NUMBER; e.g. prompt_tokens=0.3"
            )
    return out
