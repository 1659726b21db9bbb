"""SIGKILL in the middle of register and of alias moves: nothing partial is ever visible,
and `fsck --repair` leaves the registry clean."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
