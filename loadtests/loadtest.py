"""`make loadtest`: a bounded locust run against a local lorafleet server.

Builds the tiny base model and --adapters random adapters (a0, a1, ...) in a temporary
directory, registers them (a0 also gets a version 2, not promoted, for the alias churn),
serves them on a free loopback port with fewer adapter slots than adapter versions (so
requests load and evict adapters), runs loadtests/locustfile.py headless against it for
--duration, stops the server and prints a summary: requests, failures, p50/p95/p99 latency
and requests/s, from locust's CSV files in loadtests/results/locust-<UTC time>_*.csv. Exits 1
if any request failed.

    python -m loadtests.loadtest --duration 30s --shape bursty --churn 5
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import secrets
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from loadtests.bench.common import RESULTS, ROOT, build_base, make_adapters, register, serving

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
RANK = 8
CHURNED = "a0"
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


def seconds_of(text: str) -> int:
    """Seconds of a locust time span: 90, 90s, 2m, 1h30m."""
    match = DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"duration {text!r}: use e.g. 60s, 2m or 1h30m")
    hours, minutes, secs = (int(g or 0) for g in match.groups())
    total = 3600 * hours + 60 * minutes + secs
    if total < 1:
        raise argparse.ArgumentTypeError(f"duration {text!r} is zero; use e.g. 60s")
    return total


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Bounded locust run against a local lorafleet server (loopback only)."
    )
    p.add_argument("--users", type=int, default=16, help="concurrent locust users (default 16)")
    p.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    p.add_argument("--duration", default="60s", help="run time, e.g. 60s, 2m (default 60s)")
    p.add_argument(
        "--shape", choices=["uniform", "zipf", "bursty"], default="zipf", help="traffic shape"
    )
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    p.add_argument(
        "--churn", type=float, default=10.0, help="seconds between alias moves of a0 (0: off)"
    )
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request")
    p.add_argument("--adapters", type=int, default=6, help="adapters registered (default 6)")
    p.add_argument("--slots", type=int, default=3, help="the server's --max-adapters (default 3)")
    p.add_argument(
        "--omp-threads",
        type=int,
        help="OMP_NUM_THREADS of the server (default: torch's own); 1 keeps its OpenMP team "
        "from fighting other processes for the cores",
    )
    args = p.parse_args()
    found = []
    try:
        args.duration_s = seconds_of(args.duration)
    except argparse.ArgumentTypeError as err:
        found.append(str(err))
    if args.users < 1 or args.spawn_rate <= 0:
        found.append(f"--users {args.users} / --spawn-rate {args.spawn_rate}: need >= 1 / > 0")
    if args.adapters < 1 or args.slots < 1:
        found.append(f"--adapters {args.adapters} / --slots {args.slots}: need >= 1 each")
    if args.max_tokens < 1 or args.churn < 0:
        found.append(f"--max-tokens {args.max_tokens} / --churn {args.churn}: need >= 1 / >= 0")
    if args.omp_threads is not None and args.omp_threads < 1:
        found.append(f"--omp-threads {args.omp_threads} < 1")
    if found:
        p.error("; ".join(found))
    return args


def prepare(work: Path, count: int) -> tuple[Path, Path]:
    """Base model, adapters a0..a{count-1} at version 1 (production) and a0 version 2."""
    from registry import Registry

    base = build_base(work, "tiny")
    paths = make_adapters(base, work / "adapters", count, RANK)
    (second,) = make_adapters(base, work / "second", 1, RANK, first_seed=count)
    home = work / "home"
    register(home, base, {f"a{i}": path for i, path in enumerate(paths)}, max_rank=RANK)
    registry = Registry(home)
    try:
        registry.register(CHURNED, second, reason="load test churn target")
    finally:
        registry.close()
    return base, home


def run_locust(args: argparse.Namespace, url: str, key: str, prefix: Path) -> int:
    models = [f"a{i}" for i in range(args.adapters)] + ["base"]
    command = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
        *("-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.duration),
        *("--host", url, "--csv", str(prefix), "--only-summary"),
        *("--stop-timeout", "60", "--loglevel", "WARNING"),
        *("--adapters", ",".join(models), "--shape", args.shape, "--zipf-s", str(args.zipf_s)),
        *("--max-tokens", str(args.max_tokens), "--churn-s", str(args.churn)),
        *("--churn-adapter", CHURNED),
    ]
    print("$ locust " + " ".join(command[3:]), flush=True)
    log = prefix.with_name(prefix.name + ".log")
    with log.open("w") as out:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, "LORAFLEET_API_KEY": key},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=args.duration_s + 300,  # start-up and the users' last requests
            check=False,
        )
    if done.returncode not in (0, 1):  # 1: the run had failures, reported below
        print(log.read_text()[-4000:], file=sys.stderr)
    return done.returncode


def cache_events(metrics: str) -> dict[str, float]:
    """Residency hits, misses and evictions from the server's /metrics."""
    found = re.findall(
        r'^lorafleet_adapter_cache_events_total\{event="(\w+)"\} (\S+)', metrics, re.M
    )
    return {event: float(value) for event, value in found}


def summarize(prefix: Path) -> tuple[int, int]:
    """Print the per-name and total rows of the stats CSV; return (requests, failures)."""
    stats = prefix.with_name(prefix.name + "_stats.csv")
    rows = list(csv.DictReader(stats.read_text().splitlines())) if stats.exists() else []
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    if total is None:
        print(f"no stats in {stats}: locust did not run (see its log)")
        return 0, 0
    rows = sorted((r for r in rows if r is not total), key=lambda r: -int(r["Request Count"]))
    print(f"{'request':<44} {'count':>6} {'fail':>5} {'p50':>6} {'p95':>6} {'p99':>6} {'req/s':>6}")
    for row in [*rows, total]:
        name = f"{row['Type']} {row['Name']}" if row is not total else "total"
        print(
            f"{name[:44]:<44} {row['Request Count']:>6} {row['Failure Count']:>5} "
            f"{row['50%']:>6} {row['95%']:>6} {row['99%']:>6} {float(row['Requests/s']):>6.2f}"
        )
    print("(latencies in ms)")
    failures = prefix.with_name(prefix.name + "_failures.csv")
    for row in csv.DictReader(failures.read_text().splitlines() if failures.exists() else []):
        print(f"FAILED {row['Occurrences']}x {row['Method']} {row['Name']}: {row['Error']}")
    return int(total["Request Count"]), int(total["Failure Count"])


def main() -> int:
    args = parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = RESULTS / f"locust-{stamp}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    serve_args = [
        *("--engine", "hf", "--max-adapters", str(args.slots), "--max-rank", str(RANK)),
        *("--max-len", "256", "--max-tokens-limit", str(max(64, args.max_tokens))),
    ]
    env = {"LORAFLEET_API_KEY": key, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    with tempfile.TemporaryDirectory(prefix="lorafleet-loadtest-") as tmp:
        base, home = prepare(Path(tmp), args.adapters)
        versions = args.adapters + 1
        print(
            f"serving {args.adapters} adapters ({versions} versions) and base in "
            f"{args.slots} slots; {args.users} users, {args.shape}, churn "
            f"{f'{args.churn:g} s' if args.churn else 'off'}, {args.duration}"
            + (f", server OMP_NUM_THREADS={args.omp_threads}" if args.omp_threads else ""),
            flush=True,
        )
        with serving(base, home, *serve_args, env=env) as server:
            print(f"server ready at {server.url} after {server.ready_after:.1f} s", flush=True)
            code = run_locust(args, server.url, key, prefix)
            events = cache_events(server.metrics())
    requests, failed = summarize(prefix)
    print(
        "adapter residency: "
        + ", ".join(f"{events.get(e, 0):.0f} {e}" for e in ("hit", "miss", "evict"))
    )
    print(f"results: {prefix}_stats.csv (locust log: {prefix}.log)")
    if failed or requests == 0 or code not in (0, 1):
        print(f"FAILED: {failed} of {requests} requests failed (locust exit {code})")
        return 1
    print(f"ok: {requests} requests, no failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
