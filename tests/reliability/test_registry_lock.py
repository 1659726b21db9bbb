"""Another process holds the registry database locked (`BEGIN EXCLUSIVE`) for seconds:
requests keep being served from the server's in-memory alias map; writes through the admin
API and the CLI either wait for the lock and succeed, or give up after the busy timeout
($LORAFLEET_BUSY_TIMEOUT_S) with an error naming the database and the fix, writing nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry import Registry

Server = Any  # conftest's Server
LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
SERVER_BUSY_TIMEOUT_S = 5.0
# Holds a write lock until a line arrives on stdin. (In WAL mode readers are never blocked.)
LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@contextmanager
def locked(db: Path) -> Iterator[Callable[[], None]]:
    """Hold `db` locked by another process; yields `release`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "locked"

    def release() -> None:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0

    try:
        yield release
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def cli_promote(home: Path, version: int, reason: str, timeout_s: str | None) -> Any:
    env = {**os.environ, "LORAFLEET_HOME": str(home)}
    env.pop("LORAFLEET_BUSY_TIMEOUT_S", None)
    if timeout_s is not None:
        env["LORAFLEET_BUSY_TIMEOUT_S"] = timeout_s
    args = ["registry", "promote", "alpha", str(version), "--reason", reason]
    return subprocess.Popen(
        [LORAFLEET, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_writes_wait_or_fail_clearly_while_requests_are_served(
    tmp_path: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    launch: Callable[..., Server],
    start_clients: Callable[..., Any],
    history_consistent: Callable[[Registry], None],
    cli: Callable[..., Any],
) -> None:
    home = tmp_path / "home"
    registry = Registry.create(home, tiny_base)
    registry.register("alpha", adapter_factory(tiny_base, seed=41))
    registry.register("alpha", adapter_factory(tiny_base, seed=42))
    registry.register("beta", adapter_factory(tiny_base, seed=43))
    registry.promote("alpha", 1)
    registry.promote("beta", 1)
    events_before = len(registry.history(all_events=True))
    registry.close()
    db = home / "registry.db"
    server = launch(home, env={"LORAFLEET_BUSY_TIMEOUT_S": str(SERVER_BUSY_TIMEOUT_S)})
    for model in ("alpha", "beta"):  # resident before the lock: serving needs no registry
        assert server.complete(model).status_code == 200

    figures: dict[str, Any] = {}
    clients = start_clients(server.url, ["alpha", "beta"])
    with locked(db) as release:
        held = time.monotonic()
        ok_at_lock = clients.successes()
        # The admin API gives up after the server's busy timeout: 503, the database, the fix.
        answers: list[Any] = []
        body = {"adapter": "alpha", "version": 2, "reason": "failed-admin"}
        started = time.monotonic()
        sender = threading.Thread(
            target=lambda: answers.append(server.admin("/admin/promote", body))
        )
        sender.start()
        # While the admin call waits for the lock, other requests are still answered.
        time.sleep(1.0)
        # A version's first request reads the registry, beside the write that waits.
        first = server.complete("alpha@2")
        assert first.status_code == 200 and sender.is_alive(), first.text
        ok_while_waiting = clients.successes()
        time.sleep(max(0.0, SERVER_BUSY_TIMEOUT_S - 2.0 - (time.monotonic() - started)))
        assert sender.is_alive(), "the admin call gave up before its busy timeout"
        figures["served_while_admin_waited"] = clients.successes() - ok_while_waiting
        assert figures["served_while_admin_waited"] >= 3, clients.outcomes
        sender.join(timeout=60)
        figures["admin_503_after_s"] = round(time.monotonic() - started, 2)
        (refused,) = answers
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "RegistryBusy"
        assert str(db) in error["message"] and "LORAFLEET_BUSY_TIMEOUT_S" in error["message"]
        assert figures["admin_503_after_s"] >= SERVER_BUSY_TIMEOUT_S - 0.1
        # The CLI with a short busy timeout: exit 2, one line, no traceback.
        short = cli_promote(home, 2, "failed-cli", "0.5")
        out, err = short.communicate(timeout=60)
        assert short.returncode == 2, (out, err)
        assert err.startswith(f"lorafleet: error: registry database {db} stayed locked")
        assert "LORAFLEET_BUSY_TIMEOUT_S" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        # The CLI with the default busy timeout (30 s) waits for the lock.
        waiting = cli_promote(home, 2, "waited-cli", None)
        clients.wait_for(lambda: clients.successes() >= ok_at_lock + 20)
        assert waiting.poll() is None, waiting.communicate()
        figures["served_during_lock"] = clients.successes() - ok_at_lock
        figures["lock_held_s"] = round(time.monotonic() - held, 1)
        assert clients.failures == 0, clients.outcomes
        release()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    clients.wait_for(lambda: clients.outcomes["alpha -> alpha@2"] > 0)  # the poller saw it

    # The admin API waits too, when the lock goes within its busy timeout.
    answers = []
    with locked(db) as release:
        body = {"adapter": "alpha", "version": 1, "reason": "waited-admin"}
        sender = threading.Thread(
            target=lambda: answers.append(server.admin("/admin/promote", body))
        )
        sender.start()
        time.sleep(0.5)
        release()
        sender.join(timeout=60)
    assert answers and answers[0].status_code == 200, answers
    clients.wait_for(lambda: clients.outcomes["alpha -> alpha@1"] > 0)
    outcomes = clients.stop()
    assert clients.failures == 0, outcomes
    figures["requests_total"] = sum(outcomes.values())

    registry = Registry(home)
    new_events = registry.history(all_events=True)[events_before:]
    assert [e.reason for e in new_events] == ["waited-cli", "waited-admin"]  # nothing else
    assert registry.resolve("alpha").version == 1
    history_consistent(registry)
    registry.close()
    assert cli("registry", "fsck", "--verify", home=home).returncode == 0
    log = server.log_text()
    statuses = Counter(re.findall(r"\(status=(\d+),", log))
    assert set(statuses) == {"200", "503"} and statuses["503"] == 1, statuses  # the refusal
    assert "Traceback" not in log, log[-3000:]
    print(f"registry lock: {json.dumps(figures)}")
