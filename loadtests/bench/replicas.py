"""B16 adapter-affinity routing / round robin, B17 promote-to-served on PostgreSQL + NOTIFY /
SQLite polling (`--only replicas`).

B16: three replicas share one registry (Debian's PostgreSQL and moto's S3 server, started
here as tests/stores.py starts them) with ADAPTERS adapters and SLOTS adapter slots each;
CLIENTS clients send Zipf-distributed traffic (s = 1.1, the same sequence on both sides)
through Debian's HAProxy, once with deploy/haproxy/haproxy.cfg (consistent hashing on the
model, bounded load) and once with the same file balanced round robin. Per side: generated
tokens/s and the replicas' adapter-cache hit rate (lorafleet_adapter_cache_events).

B17: seconds from a promote's commit to the server's alias map at its revision
(/admin/residency), MOVES moves each: a server on that PostgreSQL registry (woken by NOTIFY)
and a server on an embedded SQLite registry (polling every 0.25 s).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtests.bench.common import Figure, Setup, make_adapters, prompts, serve_args, serving

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ADAPTERS = 300
SLOTS = 32
CLIENTS = 32
REQUESTS = 640
NEW_TOKENS = 16
ZIPF_S = 1.1
MOVES = 20


def _stores() -> Any:
    """tests/stores.py: the PostgreSQL and S3 servers the tests start (no package)."""
    spec = importlib.util.spec_from_file_location(
        "lorafleet_bench_stores", ROOT / "tests" / "stores.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def zipf_models(names: list[str], count: int, seed: int = 0) -> list[str]:
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def round_robin(config: str) -> str:
    """deploy/haproxy/haproxy.cfg balanced round robin, nothing else changed."""
    changed = config.replace("    balance hash var(txn.model)\n", "    balance roundrobin\n")
    changed = changed.replace("    hash-type consistent\n", "").replace(
        "    hash-balance-factor 150\n", ""
    )
    assert changed.count("balance roundrobin") == 1 and "hash-type" not in changed
    return changed


def cache_events(metrics: str) -> dict[str, float]:
    found = re.findall(
        r'^lorafleet_adapter_cache_events_total\{event="(\w+)"\} (\S+)$', metrics, re.M
    )
    return {event: float(value) for event, value in found}


def traffic(url: str, models: list[str], texts: list[str]) -> float:
    """Send `models` (one request each, CLIENTS at a time); generated tokens per second."""
    import httpx

    def one(i: int) -> int:
        body = {
            "model": models[i],
            "prompt": texts[i % len(texts)],
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        with httpx.Client(base_url=url, timeout=300) as http:
            r = http.post("/v1/completions", json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(one, range(len(models))))
    return tokens / (time.perf_counter() - started)


def haproxy(config: Path, replicas: list[Any], port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LORAFLEET_HAPROXY_BIND": f"127.0.0.1:{port}",
        **{
            f"LORAFLEET_REPLICA_{i + 1}": r.url.removeprefix("http://")
            for i, r in enumerate(replicas)
        },
    }
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(2.5)  # two health checks
    assert proc.poll() is None, "HAProxy did not start"
    return proc


def follow_seconds(server: Any, registry: Any, name: str) -> list[float]:
    import httpx

    seconds = []
    headers = {"Authorization": "Bearer bench-admin-key"}
    for move in range(MOVES):
        if move % 2 == 0:
            registry.promote(name, 2, actor="bench")
        else:
            registry.rollback(name, actor="bench")
        wanted, moved = registry.revision(), time.perf_counter()
        while (
            httpx.get(f"{server.url}/admin/residency", headers=headers).json()["revision"] < wanted
        ):
            time.sleep(0.002)
        seconds.append(time.perf_counter() - moved)
        time.sleep(0.3)
    return seconds


def replicas_figures(work: Path, base: Path, setup: Setup) -> list[Figure]:
    from registry import Registry

    stores = _stores()
    names = [f"r{i}" for i in range(ADAPTERS)]
    adapters = make_adapters(base, work / "replica-adapters", ADAPTERS, setup.rank, first_seed=500)
    texts = prompts(64, offset=300)
    args = [*serve_args(setup, slots=SLOTS), "--api-key", "bench-admin-key"]
    values: dict[str, list[float]] = {"affinity": [], "round robin": []}
    hits: dict[str, list[float]] = {"affinity": [], "round robin": []}
    follow: dict[str, list[float]] = {"postgres": [], "sqlite": []}
    with ExitStack() as stack:
        postgres = stack.enter_context(stores.postgres_server())
        s3 = stack.enter_context(stores.s3_server())
        env = {
            "LORAFLEET_REGISTRY_URL": postgres.new_database(),
            "LORAFLEET_ARTIFACTS_URL": s3.new_bucket(),
            **s3.env(),
        }
        os.environ.update(env)
        try:
            registry = Registry.create(work / "replicas-admin", base, max_rank=setup.rank)
            for name, path in zip(names, adapters, strict=True):
                registry.register(name, path)
                registry.promote(name, 1)
            registry.register(names[0], adapters[1])  # a version 2 for B17
        finally:
            for key in env:
                os.environ.pop(key)
        replicas = [
            stack.enter_context(serving(base, work / f"replica{i}", *args, env=env))
            for i in range(3)
        ]
        configs = {"affinity": HAPROXY_CONFIG, "round robin": work / "haproxy-rr.cfg"}
        configs["round robin"].write_text(round_robin(HAPROXY_CONFIG.read_text()))
        for repeat in range(setup.repeats):
            models = zipf_models(names, REQUESTS, seed=repeat)
            for side, config in configs.items():
                before = [cache_events(r.metrics()) for r in replicas]
                port = stores.free_port()
                proxy = haproxy(config, replicas, port)
                try:
                    values[side].append(traffic(f"http://127.0.0.1:{port}", models, texts))
                finally:
                    proxy.kill()
                    proxy.wait()
                after = [cache_events(r.metrics()) for r in replicas]
                got = {
                    e: sum(a.get(e, 0) - b.get(e, 0) for a, b in zip(after, before, strict=True))
                    for e in ("hit", "miss")
                }
                hits[side].append(got["hit"] / max(1.0, got["hit"] + got["miss"]))
                print(
                    f"  B16 {side}: {values[side][-1]:.1f} tok/s, hit rate {hits[side][-1]:.3f}",
                    flush=True,
                )
        follow["postgres"] = follow_seconds(replicas[0], registry, names[0])
        registry.close()
        sqlite_home = Path(tempfile.mkdtemp(dir=work))
        local = Registry.create(sqlite_home, base, max_rank=setup.rank)
        local.register(names[0], adapters[0])
        local.promote(names[0], 1)
        local.register(names[0], adapters[1])
        with serving(base, sqlite_home, *args) as server:
            follow["sqlite"] = follow_seconds(server, local, names[0])
        local.close()
    b16 = Figure(
        name="B16",
        title="3 replicas behind HAProxy, Zipf traffic: affinity routing / round robin",
        setup=setup.as_dict(
            adapters=ADAPTERS,
            slots=SLOTS,
            streams=CLIENTS,
            new_tokens=NEW_TOKENS,
            requests=REQUESTS,
            zipf_s=ZIPF_S,
        ),
        unit="tok/s",
        values=values,
        numerator="affinity",
        denominator="round robin",
        target="affinity >= round robin",
        details={"hit_rate": hits},
        note=f"cache hit rate {statistics.median(hits['affinity']):.3f} vs "
        f"{statistics.median(hits['round robin']):.3f}",
    )
    b16.met = b16.ratio is not None and b16.ratio >= 1.0
    b17 = Figure(
        name="B17",
        title="promote to served: SQLite polling / PostgreSQL NOTIFY (lower is better)",
        setup={"moves": MOVES, "poll_interval_s": 0.25},
        unit="s",
        values={"sqlite": follow["sqlite"], "postgres": follow["postgres"]},
        numerator="sqlite",
        denominator="postgres",
        target="postgres faster than sqlite",
    )
    b17.met = b17.ratio is not None and b17.ratio > 1.0
    return [b16, b17]
