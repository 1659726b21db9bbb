"""Record what a canary verdict reads, from a real server, for the A/A test of the canary
criteria (tests/serving/test_canary_criteria.py): seconds per completion token and finish
reasons of an adapter's production and canary versions serving the same traffic in the same
batches, on a quiet machine and with a CPU hog spinning on one core.

    python -m loadtests.canary_samples --out tests/serving/data/canary_samples.json

The server is `lorafleet serve` on the tiny base; two random adapters of the same rank are
versions 1 (production) and 2 (canary at weight 0.5, never judged: canary_min_requests is
out of reach). Requests are the demo's: greedy, up to 16 tokens, topic and sentiment
prompts, one after another from one client (or `--clients` at once). The hog is a
process spinning on core 0 (its affinity), like tests/serving/test_canary_service.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench.common import LORAFLEET, ROOT, serving

HOG = (
    "import os, time\nos.sched_setaffinity(0, {{0}})\nend = time.monotonic() + {s}\n"
    "while time.monotonic() < end:\n    pass\n"
)


def lorafleet(*args: str, env: dict[str, str]) -> None:
    subprocess.run([LORAFLEET, *args], env=env, check=True, stdout=subprocess.DEVNULL)


def prompts() -> list[str]:
    out = []
    for task in ("topic", "sentiment"):
        path = ROOT / "examples" / "data" / task / "eval.jsonl"
        out += [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    return out


def phase(url: str, n: int, clients: int, seed: int) -> dict[str, list[Any]]:
    """`n` requests: {version: [[seconds per completion token or None, finish reason]]}."""
    texts = prompts()
    rng = random.Random(seed)
    picks = [rng.choice(texts) for _ in range(n)]
    out: dict[str, list[Any]] = {}

    def one(prompt: str) -> tuple[str, float | None, str]:
        body = {"model": "topic", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        with httpx.Client(base_url=url, timeout=60) as http:
            started = time.perf_counter()
            r = http.post("/v1/completions", json=body)
            seconds = time.perf_counter() - started
        r.raise_for_status()
        choice = r.json()["choices"][0]
        tokens = r.json()["usage"]["completion_tokens"]
        per_token = seconds / tokens if tokens else None
        return r.headers["X-Lorafleet-Adapter-Version"], per_token, choice["finish_reason"]

    with ThreadPoolExecutor(clients) as pool:
        for served, per_token, finish in pool.map(one, picks):
            out.setdefault(served.split("@")[1], []).append([per_token, finish])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=300, help="per phase")
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    from tuning.tinymodel import build_random_adapter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "LORAFLEET_HOME": str(root / "home"), "LORAFLEET_ACTOR": "bench"}
        lorafleet("base", "tiny", "--out", str(root / "base"), env=env)
        lorafleet("registry", "init", "--base", str(root / "base"), env=env)
        for seed in (1, 2):
            adapter = build_random_adapter(
                root / "base", root / f"a{seed}", rank=8, alpha=16, seed=seed
            )
            lorafleet("registry", "register", "topic", str(adapter), env=env)
        lorafleet("registry", "promote", "topic", "1", env=env)
        lorafleet("registry", "settings", "topic", "canary_min_requests=1000000", env=env)
        lorafleet("registry", "promote", "topic", "2", "--to", "canary", "--weight", "0.5", env=env)
        with serving(root / "base", root / "home") as server:
            phase(server.url, 20, args.clients, seed=99)  # warm-up, not recorded
            load = {"quiet": os.getloadavg()[0]}
            quiet = phase(server.url, args.requests, args.clients, seed=1)
            hog = subprocess.Popen([sys.executable, "-c", HOG.format(s=1800)])
            try:
                load["cpu_hog_on_one_core"] = os.getloadavg()[0]
                loaded = phase(server.url, args.requests, args.clients, seed=2)
            finally:
                hog.kill()
                hog.wait()
    record = {
        "how": f"python -m loadtests.canary_samples --requests {args.requests} "
        f"--clients {args.clients}",
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "columns": ["seconds per completion token", "finish reason"],
        "load_average_1m_at_start": load,
        "phases": {"quiet": quiet, "cpu_hog_on_one_core": loaded},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for name, found in record["phases"].items():
        counts = {v: len(s) for v, s in found.items()}
        print(f"{name}: requests per version {counts}")


if __name__ == "__main__":
    main()
