"""What the fault tests share: a `lorafleet serve` process they can SIGKILL (its whole
process group) and restart on the same registry, client threads that count what they got,
and the registry's invariants after a fault."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from registry import Registry

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
ADMIN_KEY = "reliability-admin-key"
PROMPT = "Review: the pizza was great.\nSentiment:"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `lorafleet serve`: its process group, URL and the log it writes."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    http: httpx.Client

    def admin(self, path: str, body: dict[str, object]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Lorafleet-Actor": "faults"}
        return self.http.post(path, json=body, headers=headers)

    def complete(self, model: str) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        return self.http.post("/v1/completions", json=body)

    def kill(self) -> float:
        """SIGKILL the process group of `lorafleet serve`; returns the seconds until nothing
        answers on its port. (BentoML starts its worker in a session of its own, outside the
        group: the worker notices its supervisor is gone and stops itself.)"""
        killed = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        while True:
            try:
                httpx.get(f"{self.url}/livez", timeout=1)
            except httpx.ConnectError:
                return time.monotonic() - killed
            except httpx.HTTPError:
                pass
            gone = time.monotonic() - killed
            assert gone < 60, f"something still answers on {self.url} {gone:.0f} s after SIGKILL"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.http.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def launch(tiny_base: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """launch(home, env={...}) -> a ready Server; every one is stopped at the end."""
    started: list[Server] = []

    def start(home: Path, env: dict[str, str] | None = None) -> Server:
        port = free_port()
        log = tmp_path / f"server{len(started)}.log"
        args = ["--base", str(tiny_base), "--port", str(port), "--api-key", ADMIN_KEY]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [LORAFLEET, "serve", *args, "--max-len", "256", "--max-tokens-limit", "16"],
                env={**os.environ, "LORAFLEET_HOME": str(home), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        server = Server(proc, url, log, httpx.Client(base_url=url, timeout=60))
        started.append(server)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, f"server exited: {server.log_text()[-3000:]}"
            assert time.monotonic() < deadline, "server not ready in 180 s"
            time.sleep(0.25)

    yield start
    for server in started:
        server.stop()


@dataclass
class Clients:
    """Threads sending completions round-robin over `models` until stopped; they count
    outcomes: "MODEL -> VERSION" per success, "HTTP n" or the exception name per failure."""

    url: str
    models: list[str]
    threads: int = 4
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Clients:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = i
            while not self._stop.is_set():
                model = self.models[n % len(self.models)]
                n += 1
                body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
                try:
                    response = http.post("/v1/completions", json=body)
                    ok = response.status_code == 200
                    outcome = (
                        f"{model} -> {response.headers['X-Lorafleet-Adapter-Version']}"
                        if ok
                        else f"HTTP {response.status_code}"
                    )
                except httpx.HTTPError as err:
                    ok, outcome = False, type(err).__name__
                    time.sleep(0.05)  # the server is gone: do not spin
                with self._lock:
                    self.outcomes[outcome] += 1
                    self.failures += not ok

    def successes(self) -> int:
        with self._lock:
            return sum(self.outcomes.values()) - self.failures

    def wait_for(self, done: Callable[[], bool], timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out; outcomes so far {self.outcomes}"
            time.sleep(0.05)

    def stop(self) -> Counter[str]:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)
        return self.outcomes


def assert_history_consistent(registry: Registry) -> None:
    """Every alias holds the version of its last history event; a removed alias is gone."""
    current = {(a.adapter, a.alias): a.version for a in registry.aliases()}
    last: dict[tuple[str, str], int | None] = {}
    for event in registry.history(all_events=True):
        if event.action.startswith("alias.") and event.adapter and event.alias:
            last[(event.adapter, event.alias)] = (
                None if event.action == "alias.remove" else event.version
            )
    assert current == {key: v for key, v in last.items() if v is not None}


def sqlite_sound(path: Path) -> bool:
    """SQLite's integrity check of one database file passes."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


@pytest.fixture
def start_clients() -> Iterator[Callable[..., Clients]]:
    """start_clients(url, models, threads=4) -> running Clients; stopped at the end."""
    running: list[Clients] = []

    def start(url: str, models: list[str], threads: int = 4) -> Clients:
        clients = Clients(url, models, threads).start()
        running.append(clients)
        return clients

    yield start
    for clients in running:
        clients.stop()


@pytest.fixture
def history_consistent() -> Callable[[Registry], None]:
    return assert_history_consistent


@pytest.fixture
def sound() -> Callable[[Path], bool]:
    return sqlite_sound
