"""Load with churn: 32 concurrent clients for a bounded time against a server with fewer
engine slots than adapters (loads and evictions all along), while production aliases are
promoted and rolled back every second. Zero failed requests; every response's version is
the one its adapter's production alias named at the registry revision the server resolved
it at (header X-Lorafleet-Revision); the server worker's RSS and open file descriptors stay
bounded. `make test` runs it for 20 s; `make chaos` for LORAFLEET_CHURN_S (default 120 s).

It found that requests waiting for a slot filled the event loop's default executor (6
threads on 2 cores) and stalled every other miss past 60 s; loads now wait on threads of
their own (serving/runtime/admission.py LOADER_THREADS)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import Registry

ADAPTERS = [f"task{i}" for i in range(6)]
# Uniform traffic over 6 adapters in 3 engine slots: the worst case for residency, about
# every other request a miss that evicts another version.
CLIENTS = 32
CHAOS_SECONDS = float(os.environ.get("LORAFLEET_CHURN_S", "120"))
PROMPTS = ["Review: the pizza was great.\nSentiment:", "Add: 3 + 4 =", "The customer sends"]


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _worker_usage(pid: int) -> tuple[float, int]:
    """(RSS MiB, open fds) of the engine worker below `pid` (the largest process)."""
    best = (0.0, 0)
    for proc in _descendants(pid):
        try:
            status = Path(f"/proc/{proc}/status").read_text()
            fds = len(os.listdir(f"/proc/{proc}/fd"))
        except OSError:
            continue
        rss = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS")), 0)
        best = max(best, (rss / 1024, fds))
    return best


def _production_at(registry: Registry) -> Callable[[str, int], int]:
    """version_at(adapter, revision): production's version after the registry's revision."""
    moves: dict[str, list[tuple[int, int]]] = {}
    for event in registry.history(alias="production"):
        assert event.adapter is not None and event.version is not None
        moves.setdefault(event.adapter, []).append((event.revision, event.version))

    def version_at(adapter: str, revision: int) -> int:
        held = [v for r, v in moves[adapter] if r <= revision]
        assert held, f"{adapter}:production had no holder at revision {revision}"
        return held[-1]

    return version_at


def test_32_clients_under_alias_churn_and_evictions(
    tmp_path: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Any]],
) -> None:
    churn(tmp_path, tiny_base, adapter_factory, serve, seconds=20)


@pytest.mark.chaos
def test_32_clients_under_alias_churn_for_longer(
    tmp_path: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Any]],
) -> None:
    churn(tmp_path, tiny_base, adapter_factory, serve, seconds=CHAOS_SECONDS)


def churn(
    tmp_path: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Any]],
    *,
    seconds: float,
) -> None:
    home = tmp_path / "home"
    registry = Registry.create(home, tiny_base)
    for i, name in enumerate(ADAPTERS):
        for version in (1, 2):
            registry.register(name, adapter_factory(tiny_base, seed=100 + 2 * i + version))
        registry.promote(name, 1, actor="churn")
    options = ("--max-adapters", "3", "--max-len", "128", "--max-tokens-limit", "8")
    results: list[tuple[str, int, str, int]] = []  # adapter, status, served, revision
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    with serve(home, tiny_base, {}, *options) as service:
        before = _worker_usage(service.pid)

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=service.url, timeout=60) as http:
                while not stop.is_set():
                    name = rng.choice(ADAPTERS)
                    body = {
                        "model": name,
                        "prompt": rng.choice(PROMPTS),
                        "max_tokens": rng.randint(1, 8),
                        "temperature": 0,
                    }
                    try:
                        r = http.post("/v1/completions", json=body)
                    except httpx.HTTPError as err:
                        with lock:
                            errors.append(f"{name}: {type(err).__name__}: {err}")
                        continue
                    row = (
                        name,
                        r.status_code,
                        r.headers.get("X-Lorafleet-Adapter-Version", ""),
                        int(r.headers.get("X-Lorafleet-Revision", "-1")),
                    )
                    with lock:
                        results.append(row)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        moves = 0
        rng = random.Random(7)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(1.0)
            name = rng.choice(ADAPTERS)
            last = registry.history(name, "production")[-1]
            if last.action == "alias.set" and last.previous is not None:
                registry.rollback(name, actor="churn", reason="undo the last promote")
            else:
                assert last.version is not None
                registry.promote(name, 3 - last.version, actor="churn", reason="churn")
            moves += 1
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        after = _worker_usage(service.pid)
        residency = service.admin("/admin/residency").json()
    failed = [r for r in results if r[1] != 200]
    print(
        f"\nchurn: {len(results)} requests from {CLIENTS} clients in {seconds:g} s, "
        f"{moves} alias moves, {len(failed)} failed, {len(errors)} transport errors; "
        f"worker RSS {before[0]:.0f} -> {after[0]:.0f} MiB, fds {before[1]} -> {after[1]}"
    )
    assert errors == [] and failed == [], (errors[:5], failed[:5])
    assert len(results) >= CLIENTS * 5
    version_at = _production_at(registry)
    wrong = [
        (name, served, revision)
        for name, _, served, revision in results
        if served != f"{name}@{version_at(name, revision)}"
    ]
    assert wrong == [], wrong[:10]
    assert len(residency["resident"]) <= 3
    assert after[0] < before[0] + 300, (before, after)  # MiB
    assert after[1] < before[1] + 50, (before, after)  # open file descriptors
    registry.close()
