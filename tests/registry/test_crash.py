"""SIGKILL in the middle of register and of alias moves: nothing partial is ever visible,
and `fsck --repair` leaves the registry clean."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import Registry
from registry.errors import NotFound

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))


def run_until_paused(args: list[str], home: Path, point: str) -> None:
    """Start `lorafleet ARGS` with a pause point, wait until it pauses there, SIGKILL it."""
    env = {**os.environ, "LORAFLEET_HOME": str(home), "LORAFLEET_PAUSE_AT": point}
    proc = subprocess.Popen(
        [LORAFLEET, *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.strip() == f"lorafleet: paused at {point}", line
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("point", "leftover"),
    [
        ("register.validated", None),
        ("register.copying", "unfinished registration"),
        ("register.copied", "unfinished registration"),
        ("register.stored", "orphan artifact"),
        ("register.committing", "orphan artifact"),
    ],
)
def test_kill_during_register(
    point: str,
    leftover: str | None,
    home: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
) -> None:
    adapter = adapter_factory(tiny_base)
    before = Registry(home).revision()
    run_until_paused(["registry", "register", "support", str(adapter)], home, point)

    registry = Registry(home)
    with pytest.raises(NotFound):
        registry.list_versions("support")
    assert registry.revision() == before
    report = registry.fsck()
    if leftover is None:
        assert report.clean, report.problems
    else:
        assert [p for p in report.problems if leftover in p], report.problems
        repaired = registry.fsck(repair=True)
        assert repaired.repaired
    assert registry.fsck(verify=True).clean
    # The registration can simply be run again.
    assert registry.register("support", adapter).ref == "support@1"
    assert registry.fsck(verify=True).clean


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_kill_during_alias_move(
    command: str, home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    registry = Registry(home)
    for seed in range(3):
        registry.register("support", adapter_factory(tiny_base, seed=seed))
    registry.promote("support", 1)
    registry.promote("support", 2)
    history, revision = registry.history(all_events=True), registry.revision()

    args = (
        ["registry", "promote", "support", "3"]
        if command == "promote"
        else ["registry", "rollback", "support"]
    )
    run_until_paused(args, home, "alias.committing")

    registry = Registry(home)
    assert registry.resolve("support").version == 2
    assert registry.history(all_events=True) == history
    assert registry.revision() == revision
    assert registry.fsck(verify=True).clean
    assert registry.promote("support", 3).previous == 2


def test_repeated_kills_leave_fsck_clean(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    """Kills at every point in turn, one registry: after repair, only finished work remains."""
    points = ["register.copying", "register.stored", "register.committing", "alias.committing"]
    registry = Registry(home)
    registry.register("support", adapter_factory(tiny_base, seed=0))
    registry.promote("support", 1)
    for i, point in enumerate(points * 2):
        adapter = adapter_factory(tiny_base, seed=10 + i)
        if point == "alias.committing":
            run_until_paused(
                ["registry", "promote", "support", "1", "--to", "staging"], home, point
            )
        else:
            run_until_paused(["registry", "register", "support", str(adapter)], home, point)
    registry = Registry(home)
    registry.fsck(repair=True)
    assert registry.fsck(verify=True).clean
    assert [v.version for v in registry.list_versions("support")] == [1]
    assert {a.alias for a in registry.aliases("support")} == {"production"}


# ---- many kills in a row at random points: `test_kills_in_a_row` (20, part of make test)
# and its `make chaos` variant (LORAFLEET_CHAOS_KILLS, default 200). A third of the kills hit
# a random moment of a real CLI run instead of a pause point.

REGISTER_POINTS = [
    "register.validated",
    "register.copying",
    "register.copied",
    "register.stored",
    "register.committing",
]
# What `fsck --repair` removes, as docs/registry.md's Safety paragraph promises: unreferenced files.
REPAIRABLE = ("orphan artifact", "unfinished registration")
POOL = 10  # adapters with distinct content; a killed registration can be retried with its own


def assert_history_consistent(registry: Registry) -> None:
    """Every alias holds the version of its last history event; a removed alias is gone."""
    current = {(a.adapter, a.alias): a.version for a in registry.aliases()}
    last: dict[tuple[str, str], int | None] = {}
    for event in registry.history(all_events=True):
        if event.action.startswith("alias.") and event.adapter and event.alias:
            removed = event.action == "alias.remove"
            last[(event.adapter, event.alias)] = None if removed else event.version
    assert current == {key: v for key, v in last.items() if v is not None}


def can_roll_back(registry: Registry) -> bool:
    """support:production's last move has a holder before it (what rollback returns to)."""
    rows = registry.db.query(
        "SELECT below FROM events WHERE adapter = 'support' AND alias = 'production'"
        " AND action LIKE 'alias.%' ORDER BY id DESC LIMIT 1"
    )
    return bool(rows) and rows[0]["below"] is not None


def reachable_points(registry: Registry, adapter_dir: str) -> list[str]:
    """Register's pause points that a run will pass: one whose files an earlier killed run
    already stored (an orphan) skips the copy."""
    digest, _ = registry.artifacts.digest_of(Path(adapter_dir))
    if registry.artifacts.exists(digest):
        return [p for p in REGISTER_POINTS if p not in ("register.copying", "register.copied")]
    return REGISTER_POINTS


def kill_at_random_time(args: list[str], home: Path, delay_s: float) -> None:
    """Start `lorafleet ARGS` and SIGKILL it after `delay_s`, finished or not."""
    env = {**os.environ, "LORAFLEET_HOME": str(home)}
    proc = subprocess.Popen(
        [LORAFLEET, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        proc.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def kill_in_a_row(
    kills: int, seed: int, home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> dict[str, int]:
    """`kills` SIGKILLs of register/promote/rollback; after each, the registry shows exactly
    the finished work. Returns counts for the report."""
    rng = random.Random(seed)
    pool = [adapter_factory(tiny_base, seed=100 + i) for i in range(POOL)]
    registry = Registry(home)
    registry.register("support", pool[0])
    registry.register("support", pool[1])
    registry.promote("support", 1)
    counts = {"kills": 0, "paused_kills": 0, "timed_kills": 0, "finished_before_kill": 0}
    for _ in range(kills):
        versions = [v.version for v in registry.list_versions("support")]
        history, revision = registry.history(all_events=True), registry.revision()
        aliases = {(a.alias, a.version) for a in registry.aliases("support")}
        register_args = ["registry", "register", "support", str(pool[len(versions) % POOL])]
        production = registry.resolve("support").version
        others = [v for v in versions if v != production]
        move_args = (
            ["registry", "rollback", "support"]
            if can_roll_back(registry) and (not others or rng.random() < 0.4)
            else ["registry", "promote", "support", str(rng.choice(others))]
        )
        can_register = len(versions) < POOL
        if rng.random() < 1 / 3:
            args = register_args if can_register and rng.random() < 0.5 else move_args
            kill_at_random_time(args, home, rng.uniform(0.05, 1.5))
            counts["timed_kills"] += 1
            registry.close()
            registry = Registry(home)
            if registry.revision() != revision:
                counts["finished_before_kill"] += 1  # the whole write, never a part of it
                assert len(registry.history(all_events=True)) == len(history) + 1
        else:
            if can_register and rng.random() < 0.6:
                point = rng.choice(reachable_points(registry, register_args[-1]))
                run_until_paused(register_args, home, point)
            else:
                run_until_paused(move_args, home, "alias.committing")
            counts["paused_kills"] += 1
            registry.close()
            registry = Registry(home)
            assert registry.revision() == revision
            assert registry.history(all_events=True) == history
            assert [v.version for v in registry.list_versions("support")] == versions
            assert {(a.alias, a.version) for a in registry.aliases("support")} == aliases
        counts["kills"] += 1
        problems = registry.fsck().problems
        assert all(any(kind in p for kind in REPAIRABLE) for p in problems), problems
        assert_history_consistent(registry)
        if rng.random() < 0.25 and others:  # finished work between kills: varied states
            registry.promote("support", rng.choice(others), actor="tests")
    registry.close()
    return counts


def check_after_kills(home: Path, cli: Callable[..., Any]) -> int:
    """`fsck` finds only what --repair removes; after it `fsck --verify` is clean; every
    version's files verify. Returns the number of problems repaired."""
    import json

    found = json.loads(cli("registry", "fsck", "--json", home=home).stdout)
    assert all(any(kind in p for kind in REPAIRABLE) for p in found["problems"]), found
    repair = cli("registry", "fsck", "--repair", "--json", home=home)
    assert repair.returncode == 0, repair.stderr
    assert len(json.loads(repair.stdout)["repaired"]) == len(found["problems"])
    verify = cli("registry", "fsck", "--verify", home=home)
    assert verify.returncode == 0 and verify.stdout.strip().endswith("clean"), verify.stdout
    registry = Registry(home)
    assert_history_consistent(registry)
    for record in registry.list_versions("support"):
        registry.artifact_path(record, verify=True)
    registry.close()
    return len(found["problems"])


def test_kills_in_a_row(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    counts = kill_in_a_row(20, 7, home, tiny_base, adapter_factory)
    repaired = check_after_kills(home, cli)
    assert counts["kills"] == 20
    print(f"kills in a row: {counts}, repaired {repaired}")


@pytest.mark.chaos
def test_kills_in_a_row_chaos(
    home: Path, tiny_base: Path, adapter_factory: Callable[..., Path], cli: Callable[..., Any]
) -> None:
    kills = int(os.environ.get("LORAFLEET_CHAOS_KILLS", "200"))
    seed = int(os.environ.get("LORAFLEET_CHAOS_SEED") or time.time())
    print(f"chaos kills: LORAFLEET_CHAOS_SEED={seed} repeats this run")
    counts = kill_in_a_row(kills, seed, home, tiny_base, adapter_factory)
    repaired = check_after_kills(home, cli)
    assert counts["kills"] == kills
    print(f"chaos kills in a row: {counts}, repaired {repaired}")
