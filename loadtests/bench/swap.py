"""B4 hot-swap under load and B6 cold start, on one server.

B4: clients keep asking for `task0` (8 at a time, 8 streamed tokens each) while the bench
moves its production alias to version 2 and back (`promote` then `rollback`, through the
registry as another process would). The latency of a move is from the registry write
returning to the first token of the first response served by the new version; every request
must succeed.

B6: time to first token of a request for an adapter version never loaded (the load is in the
request's path: registry lookup, sha256 check, reading the file, writing the slot) / of a
request for a resident one, each sent alone on an idle server.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from loadtests.bench.common import (
    VERSION_HEADER,
    Figure,
    Setup,
    http_round,
    load_mean,
    make_adapters,
    percentile,
    prompts,
    register,
    serve_args,
    serving,
)

CYCLES = 50
CLIENTS = 8
COLD = 5


async def swap_cycles(url: str, home: Path, adapter: str, cycles: int) -> dict[str, Any]:
    import httpx

    from registry import Registry

    seen: list[tuple[float, str]] = []  # (first token's arrival, version that served it)
    failures: list[str] = []
    stop = asyncio.Event()
    texts = prompts(CLIENTS, offset=100)

    async def client(text: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            while not stop.is_set():
                body = {
                    "model": adapter,
                    "prompt": text,
                    "max_tokens": 8,
                    "temperature": 0,
                    "stream": True,
                }
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            failures.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                            continue
                        version, first = r.headers[VERSION_HEADER], None
                        async for line in r.aiter_lines():
                            if first is None and line.startswith("data: {"):
                                first = time.perf_counter()
                                seen.append((first, version))
                            if '"error"' in line:
                                failures.append(line[:200])
                except httpx.HTTPError as err:
                    failures.append(repr(err))

    async def first_response(version: str, since: float) -> float:
        deadline = since + 60
        while time.perf_counter() < deadline:
            for at, served in reversed(seen):
                if at < since:
                    break
                if served == version:
                    return at - since
            await asyncio.sleep(0.005)
        raise SystemExit(f"B4: no response from {version} within 60 s of the move")

    registry = Registry(home)
    tasks = [asyncio.create_task(client(t)) for t in texts]
    latencies: dict[str, list[float]] = {"promote": [], "rollback": []}
    try:
        await asyncio.sleep(2)  # traffic running, version 1 resident
        for _ in range(cycles):
            for move, version in (("promote", 2), ("rollback", 1)):
                if move == "promote":
                    await asyncio.to_thread(registry.promote, adapter, 2, reason="bench B4")
                else:
                    await asyncio.to_thread(registry.rollback, adapter, reason="bench B4")
                moved = time.perf_counter()
                latencies[move].append(await first_response(f"{adapter}@{version}", moved))
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        registry.close()
    return {"latencies": latencies, "failures": failures, "responses": len(seen)}


def swap_figures(work: Path, base: Path, home: Path, setup: Setup) -> list[Figure]:
    adapter = "task0"
    v2 = make_adapters(base, work / "swap", 1, setup.rank, first_seed=1000)[0]
    cold = make_adapters(base, work / "cold", COLD, setup.rank, first_seed=2000)
    from registry import Registry

    registry = Registry(home)
    try:
        registry.register(adapter, v2)  # version 2, not promoted yet
    finally:
        registry.close()
    with serving(base, home, *serve_args(setup)) as server:
        http_round(server.url, [adapter], prompts(1), 4)  # version 1 resident
        result = asyncio.run(swap_cycles(server.url, home, adapter, CYCLES))
        register(home, base, {f"cold{i}": path for i, path in enumerate(cold)}, setup.rank)
        time.sleep(2)  # the server's poller sees the new aliases (nothing is loaded yet)
        cold_ttft, warm_ttft = [], []
        for i in range(COLD):
            for ttfts in (cold_ttft, warm_ttft):  # first call loads, second finds it resident
                r = http_round(server.url, [f"cold{i}"], prompts(1, offset=200), 4, stream=True)
                ttfts.append(r.ttfts[0])
        load = load_mean(server.metrics())
    moves = result["latencies"]["promote"] + result["latencies"]["rollback"]
    p50, p99 = percentile(moves, 50), percentile(moves, 99)
    b4 = Figure(
        "B4",
        f"hot-swap under load ({CYCLES} promote/rollback cycles, {CLIENTS} clients)",
        setup.as_dict(cycles=CYCLES, clients=CLIENTS, max_tokens=8),
        "s",
        {"p50": [p50], "p99": [p99]},
        "p50 < 1 s, 0 failed",
        headline="p50",
        met=p50 < 1 and not result["failures"],
        note=f"{len(result['failures'])} failed, {result['responses']} answered",
        details={
            "responses": result["responses"],
            "failures": result["failures"][:10],
            "promote_p50_s": percentile(result["latencies"]["promote"], 50),
            "rollback_p50_s": percentile(result["latencies"]["rollback"], 50),
            "max_s": max(moves),
        },
    )
    b6 = Figure(
        "B6",
        "cold start: TTFT never-loaded / resident adapter",
        setup.as_dict(adapters=COLD, max_tokens=4),
        "s",
        {"cold": cold_ttft, "resident": warm_ttft},
        "<= 2x",
        "cold",
        "resident",
        details={"adapter_load_mean_s": load},
    )
    b6.met = (b6.ratio or float("inf")) <= 2
    return [b4, b6]
