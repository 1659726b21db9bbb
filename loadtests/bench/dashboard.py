"""B10, B11: what one poll of the operator dashboard (GET /admin/dashboard) costs the server.

B10: the traffic series of 200 versions with requests in every 5-s step of the 15-minute
window. A steady poll (the default: charts for the 8 busiest versions, an ended step's
percentiles computed once) against drawing every version with every step's percentiles
computed, as the first version of the dashboard did on every poll.

B11: the fleet snapshot (registry/storage/fleet.py) of a registry of 1,000 adapters with 3
versions each and 100,000 history events: the rows are copied in SQL from one real
registration, so building it takes seconds, not a thousand registrations.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from pathlib import Path

from loadtests.bench.common import Figure, Setup, make_adapters, ratio_figure

VERSIONS = 200
ADAPTERS, PER_ADAPTER, EVENTS = 1000, 3, 100_000
POLLS = 5  # steady polls timed per repeat


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def busy_traffic() -> object:
    """A Traffic whose window is full: VERSIONS versions, 3 requests in every step."""
    from serving.watch.samples import Traffic

    clock = Clock()
    traffic = Traffic(clock=clock)
    start = clock.now
    for step in range(traffic.steps):
        clock.now = start + step * traffic.step_s
        for v in range(VERSIONS):
            for r in range(3):
                traffic.record(f"a{v}", "1", seconds=0.01 * (r + 1), completion_tokens=8)
    clock.now += traffic.step_s / 2
    return traffic


def series_figure(setup: Setup) -> Figure:
    values: dict[str, list[float]] = {"every version, cold": [], "steady poll": []}
    for _ in range(setup.repeats):
        traffic = busy_traffic()
        started = time.perf_counter()
        traffic.series(limit=VERSIONS)  # type: ignore[attr-defined]
        values["every version, cold"].append((time.perf_counter() - started) * 1000)
        timings = []
        for _ in range(POLLS):
            started = time.perf_counter()
            traffic.series()  # type: ignore[attr-defined]
            timings.append((time.perf_counter() - started) * 1000)
        values["steady poll"].append(statistics.median(timings))
    return ratio_figure(
        "B10",
        f"dashboard traffic series, {VERSIONS} busy versions: every version cold / steady poll",
        setup.as_dict(versions=VERSIONS, steps=180),
        "ms",
        values,
        "every version, cold",
        "steady poll",
        at_least=10.0,
    )


def synthetic_registry(work: Path, base: Path, setup: Setup) -> Path:
    """ADAPTERS adapters x PER_ADAPTER versions and EVENTS alias events, copied from one
    real registration and promotion."""
    from registry import Registry

    home = work / "fleet-home"
    (adapter,) = make_adapters(base, work / "fleet-adapter", 1, setup.rank, 700)
    registry = Registry.create(home, base, max_rank=setup.rank)
    registry.register("x0", adapter)
    registry.promote("x0", 1)
    registry.close()
    conn = sqlite3.connect(home / "registry.db")
    conn.row_factory = sqlite3.Row
    version = dict(conn.execute("SELECT * FROM versions").fetchone())
    alias = dict(conn.execute("SELECT * FROM aliases").fetchone())
    event = dict(conn.execute("SELECT * FROM events WHERE action = 'alias.set'").fetchone())
    event.pop("id")

    def insert(table: str, row: dict[str, object]) -> None:
        marks = ", ".join("?" * len(row))
        conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({marks})", list(row.values()))

    with conn:
        for i in range(1, ADAPTERS):
            for v in range(1, PER_ADAPTER + 1):
                insert(
                    "versions", {**version, "adapter": f"x{i}", "version": v, "digest": f"{i}-{v}"}
                )
            insert("aliases", {**alias, "adapter": f"x{i}"})
        for j in range(EVENTS):
            insert("events", {**event, "adapter": f"x{j % ADAPTERS}"})
    conn.close()
    return home


def snapshot_figure(work: Path, base: Path, setup: Setup) -> Figure:
    from registry import Registry

    registry = Registry(synthetic_registry(work, base, setup))
    registry.fleet_snapshot()  # warm the page cache
    values: dict[str, list[float]] = {"snapshot": []}
    for _ in range(setup.repeats):
        timings = []
        for _ in range(POLLS):
            started = time.perf_counter()
            registry.fleet_snapshot()
            timings.append((time.perf_counter() - started) * 1000)
        values["snapshot"].append(statistics.median(timings))
    registry.close()
    figure = Figure(
        "B11",
        f"dashboard fleet snapshot, {ADAPTERS} adapters x {PER_ADAPTER} versions, {EVENTS} events",
        setup.as_dict(adapters=ADAPTERS, versions=ADAPTERS * PER_ADAPTER, events=EVENTS),
        "ms",
        values,
        "<= 100 ms (a 2-s poll)",
        headline="snapshot",
    )
    figure.met = statistics.median(values["snapshot"]) <= 100
    return figure


def dashboard_figures(work: Path, base: Path, setup: Setup) -> list[Figure]:
    return [series_figure(setup), snapshot_figure(work, base, setup)]
