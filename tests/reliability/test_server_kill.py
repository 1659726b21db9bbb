"""SIGKILL of the whole server process group under load, right after an alias move, then a
restart on the same registry: the same aliases, no registry damage, serving again with no
failed request. `make chaos` repeats the kill/restart cycle (LORAFLEET_CHAOS_RESTARTS).

A killed retraining job is covered by tests/tuning/test_retrain.py
(test_runner_killed_midway_changes_no_alias_and_is_failed_next_run)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import Registry, RequestLog

Server = Any  # conftest's Server
MODELS = ["alpha", "beta"]


@pytest.fixture
def fleet(tmp_path: Path, tiny_base: Path, adapter_factory: Callable[..., Path]) -> Path:
    """A registry with alpha@1, alpha@2, beta@1; production alpha@1, beta@1."""
    home = tmp_path / "home"
    registry = Registry.create(home, tiny_base)
    registry.register("alpha", adapter_factory(tiny_base, seed=31))
    registry.register("alpha", adapter_factory(tiny_base, seed=32))
    registry.register("beta", adapter_factory(tiny_base, seed=33))
    registry.promote("alpha", 1)
    registry.promote("beta", 1)
    registry.close()
    return home


def kill_under_load(
    home: Path, server: Server, start_clients: Callable[..., Any], version: int
) -> dict[str, int]:
    """Clients on alpha and beta; promote alpha to `version` through the admin API; SIGKILL
    the server while the clients keep sending. Returns what the clients saw."""
    clients = start_clients(server.url, MODELS)
    clients.wait_for(lambda: clients.successes() >= 20)
    move = server.admin("/admin/promote", {"adapter": "alpha", "version": version})
    assert move.status_code == 200, move.text
    served = f"alpha -> alpha@{version}"
    clients.wait_for(lambda: clients.outcomes[served] >= 4)
    log = RequestLog(home)
    clients.wait_for(lambda: len(log.read("alpha")) > 0)  # a batch of the log is committed
    logged = len(log.read("alpha"))
    log.close()
    before_kill = clients.successes()
    gone_s = server.kill()
    errors_before = clients.failures
    clients.wait_for(lambda: clients.failures >= errors_before + 4)  # they saw it die
    outcomes = clients.stop()
    return {
        "ok_before_kill": before_kill,
        "failed_during_kill": clients.failures,
        "served_new_version": outcomes[served],
        "ms_until_port_closed": round(gone_s * 1000),
        "logged_before_kill": logged,
    }


def check_registry(
    home: Path,
    aliases: set[tuple[str, str, int]],
    logged: int,
    cli: Callable[..., Any],
    history_consistent: Callable[[Registry], None],
    sound: Callable[[Path], bool],
) -> None:
    registry = Registry(home)
    assert {(a.adapter, a.alias, a.version) for a in registry.aliases()} == aliases
    history_consistent(registry)
    assert len(registry.request_log.read("alpha")) >= logged, "the request log lost rows"
    assert registry.feedback("alpha"), "feedback lost"
    registry.close()
    fsck = cli("registry", "fsck", "--verify", home=home)
    assert fsck.returncode == 0 and fsck.stdout.strip().endswith("clean"), fsck.stdout
    for name in ("registry.db", "requests.db"):
        assert sound(home / name), name


def serve_again(server: Server, start_clients: Callable[..., Any], alpha: int) -> int:
    """After a restart: 40 requests from 4 clients, none failed, each on the alias target."""
    clients = start_clients(server.url, MODELS)
    clients.wait_for(lambda: clients.successes() >= 40 or clients.failures > 0)
    outcomes = clients.stop()
    assert clients.failures == 0, outcomes
    assert set(outcomes) == {f"alpha -> alpha@{alpha}", "beta -> beta@1"}, outcomes
    return sum(outcomes.values())


def restart_cycles(
    cycles: int,
    home: Path,
    launch: Callable[..., Server],
    start_clients: Callable[..., Any],
    cli: Callable[..., Any],
    history_consistent: Callable[[Registry], None],
    sound: Callable[[Path], bool],
) -> list[dict[str, int]]:
    server = launch(home)
    response = server.complete("alpha")
    assert response.status_code == 200, response.text
    feedback = {"response_id": response.json()["id"], "score": 1.0}
    assert server.http.post("/v1/feedback", json=feedback).status_code == 200
    figures = []
    for cycle in range(cycles):
        version = 2 if cycle % 2 == 0 else 1  # alternate, so every cycle moves the alias
        seen = kill_under_load(home, server, start_clients, version)
        expected = {("alpha", "production", version), ("beta", "production", 1)}
        check_registry(home, expected, seen["logged_before_kill"], cli, history_consistent, sound)
        server = launch(home)
        seen["ok_after_restart"] = serve_again(server, start_clients, version)
        figures.append(seen)
    return figures


def test_sigkill_under_load_then_restart(
    fleet: Path,
    launch: Callable[..., Server],
    start_clients: Callable[..., Any],
    cli: Callable[..., Any],
    history_consistent: Callable[[Registry], None],
    sound: Callable[[Path], bool],
) -> None:
    figures = restart_cycles(1, fleet, launch, start_clients, cli, history_consistent, sound)
    print(f"server kill/restart: {figures}")


@pytest.mark.chaos
def test_sigkill_restart_cycles_chaos(
    fleet: Path,
    launch: Callable[..., Server],
    start_clients: Callable[..., Any],
    cli: Callable[..., Any],
    history_consistent: Callable[[Registry], None],
    sound: Callable[[Path], bool],
) -> None:
    cycles = int(os.environ.get("LORAFLEET_CHAOS_RESTARTS", "10"))
    figures = restart_cycles(cycles, fleet, launch, start_clients, cli, history_consistent, sound)
    assert len(figures) == cycles
    print(f"server kill/restart x{cycles}: {figures}")
