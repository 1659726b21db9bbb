"""What every comparison of `make bench` shares: the setup, the result record, the server
process, traffic rounds over HTTP, and the registry the benchmarks serve from."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
RESULTS = ROOT / "loadtests" / "results"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
VERSION_HEADER = "x-lorafleet-adapter-version"


@dataclass
class Setup:
    """The load every throughput figure runs unless its own setup says otherwise."""

    model: str = "small"
    dtype: str = "bf16"  # main() sets what --dtype (default auto) resolved to
    streams: int = 32
    new_tokens: int = 64
    adapters: int = 8
    rank: int = 8
    repeats: int = 3
    engine: str = "hf"
    compile: bool = False  # the hf engine compiles its decode step (serve --compile
    # --threads CORES)

    def as_dict(self, **changes: Any) -> dict[str, Any]:
        return {**asdict(self), **changes}


@dataclass
class Figure:
    """One comparison: the measured values of each side (one per repeat), and either their
    ratio (numerator / denominator medians) or a headline side, checked against a target."""

    name: str
    title: str
    setup: dict[str, Any]
    unit: str
    values: dict[str, list[float]]
    target: str
    numerator: str | None = None
    denominator: str | None = None
    headline: str | None = None  # the side reported when there is no ratio
    met: bool | None = None  # None: not measured here
    note: str = ""  # printed after the values
    details: dict[str, Any] = field(default_factory=dict)

    def median(self, side: str) -> float:
        return statistics.median(self.values[side])

    @property
    def ratio(self) -> float | None:
        if self.numerator is None or self.denominator is None:
            return None
        return self.median(self.numerator) / self.median(self.denominator)

    def side(self, name: str) -> str:
        v = self.values[name]
        if not v:
            return f"{name} not measured"
        spread = f" ({min(v):.3g}-{max(v):.3g})" if len(v) > 1 else ""
        return f"{name} {statistics.median(v):.4g} {self.unit}{spread}"

    def line(self) -> str:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[self.met]
        if self.ratio is not None:
            assert self.numerator and self.denominator
            head = f"{self.ratio:6.2f}x"
            body = f"{self.side(self.numerator)}  vs  {self.side(self.denominator)}"
        else:
            head = "      "
            body = "; ".join(self.side(s) for s in self.values)
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.name:<3} {head}  {self.title}: {body}{note}   target {self.target} [{verdict}]"
        )

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def ratio_figure(
    name: str,
    title: str,
    setup: dict[str, Any],
    unit: str,
    values: dict[str, list[float]],
    numerator: str,
    denominator: str,
    at_least: float,
    **details: Any,
) -> Figure:
    figure = Figure(
        name,
        title,
        setup,
        unit,
        values,
        f">= {at_least:g}",
        numerator,
        denominator,
        details=details,
    )
    figure.met = (figure.ratio or 0) >= at_least
    return figure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompts(count: int, offset: int = 0) -> list[str]:
    from tuning.corpus import sentences

    return [" ".join(sentences(3, seed=offset + i)) for i in range(count)]


def build_base(work: Path, model: str) -> Path:
    """The base model, built once per bench run in a subprocess (no torch math in this
    process: see serving.engines.hf on OpenMP teams)."""
    base = work / "base"
    if not (base / "config.json").exists():
        run_python(
            "from pathlib import Path; from tuning.tinymodel import build_base_model; "
            f"build_base_model(Path({str(base)!r}), size={model!r}, seed=0)"
        )
    return base


def make_adapters(base: Path, out: Path, count: int, rank: int, first_seed: int = 0) -> list[Path]:
    """`count` random PEFT adapters of `rank` on the attention projections, in a subprocess."""
    out.mkdir(parents=True, exist_ok=True)
    run_python(
        "from pathlib import Path; from tuning.tinymodel import build_random_adapter\n"
        f"for i in range({count}):\n"
        f"    build_random_adapter(Path({str(base)!r}), Path({str(out)!r}) / f'a{{i}}', "
        f"rank={rank}, alpha={2 * rank}, target_modules={TARGET_MODULES!r}, "
        f"seed={first_seed} + i)"
    )
    return [out / f"a{i}" for i in range(count)]


def run_python(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def register(home: Path, base: Path, adapters: dict[str, Path], max_rank: int) -> None:
    """Register each adapter as NAME version 1 and make it production."""
    from registry import Registry

    registry = (
        Registry(home)
        if (home / "registry.db").exists()
        else Registry.create(home, base, max_rank=max_rank)
    )
    try:
        for name, path in adapters.items():
            version = registry.register(name, path).version
            registry.promote(name, version)
    finally:
        registry.close()


def adapter_paths(home: Path, names: list[str]) -> dict[str, Path]:
    """Each adapter's production artifact directory (sha256-checked)."""
    from registry import Registry

    registry = Registry(home)
    try:
        return {name: registry.artifact_path(registry.resolve(name)) for name in names}
    finally:
        registry.close()


class ServerProcess:
    """`lorafleet serve` on a free loopback port, stopped with its process group."""

    def __init__(self, base: Path, home: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The server's output goes to a file, shown when it fails to start.
        self.log = tempfile.NamedTemporaryFile(prefix="lorafleet-serve-", suffix=".log")
        self.process = subprocess.Popen(
            [LORAFLEET, "serve", "--base", str(base), "--port", str(self.port), *args],
            env={**os.environ, "LORAFLEET_HOME": str(home), **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.perf_counter()
        self.ready_after = self._wait_ready()

    def _wait_ready(self, timeout: float = 600) -> float:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited during start-up:\n{self.log_tail()}")
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise SystemExit(f"the server did not become ready:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def worker_pids(self) -> list[int]:
        """The server's processes (BentoML runs the service in a child process)."""
        import psutil

        parent = psutil.Process(self.process.pid)
        return [parent.pid, *(c.pid for c in parent.children(recursive=True))]

    def rss(self) -> dict[str, int]:
        """Current and peak resident set of the largest server process, in bytes."""
        best = {"rss": 0, "peak": 0}
        for pid in self.worker_pids():
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            rss = int(fields["VmRSS"].split()[0]) * 1024
            if rss > best["rss"]:
                best = {"rss": rss, "peak": int(fields["VmHWM"].split()[0]) * 1024}
        return best

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        stop_group(self.process)
        self.log.close()


def stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process started with `start_new_session`, and its group; SIGKILL after 60 s."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


@contextmanager
def serving(
    base: Path, home: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    server = ServerProcess(base, home, *args, env=env)
    try:
        yield server
    finally:
        server.stop()


def serve_args(setup: Setup, *, slots: int | None = None, engine: str | None = None) -> list[str]:
    compiled: list[str] = []
    if setup.compile and (engine or setup.engine) == "hf":
        # Threads fixed at every core, as the peers run: a count the tuner tries would be
        # one more compile of each routing kind, inside a measured round.
        compiled = ["--compile", "--threads", str(os.cpu_count() or 1)]
    return [
        *compiled,
        "--engine",
        engine or setup.engine,
        "--dtype",
        setup.dtype,
        "--max-adapters",
        str(slots or setup.adapters),
        "--max-rank",
        str(setup.rank),
        "--max-batch",
        str(setup.streams),
        "--max-len",
        "512",
        "--max-tokens-limit",
        str(max(setup.new_tokens, 64)),
    ]


@dataclass
class Round:
    """One burst of requests sent at once: generated tokens over wall time, and each
    request's latency, time to first token (streamed rounds) and the version that answered."""

    tokens_per_s: float
    latencies: list[float]
    ttfts: list[float]
    versions: list[str]
    tokens: list[int] = field(default_factory=list)  # generated tokens of each request


async def http_round_async(
    url: str,
    models: list[str],
    texts: list[str],
    new_tokens: int,
    *,
    stream: bool = False,
    extras: list[dict[str, Any]] | None = None,
) -> Round:
    """All requests at once. Whole responses count tokens from `usage`; streamed ones also
    time the first chunk (one chunk per token here, none held back by stop strings), or take
    `usage` from the last chunk where the request asks for it (`stream_options`). `extras[i]`,
    when given, adds fields to request i's body (`logprobs`, `response_format`, `ignore_eos`,
    ...) or replaces the ones above."""
    import httpx

    limits = httpx.Limits(max_connections=len(models) + 4)
    fields = extras if extras is not None else [{} for _ in models]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(
            model: str, text: str, extra: dict[str, Any]
        ) -> tuple[int, float, float, str]:
            body = {
                "model": model,
                "prompt": text,
                "max_tokens": new_tokens,
                "temperature": 0,
                "stream": stream,
                **extra,
            }
            started = time.perf_counter()
            if not stream:
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                tokens = int(r.json()["usage"]["completion_tokens"])
                took = time.perf_counter() - started
                return tokens, took, float("nan"), r.headers.get(VERSION_HEADER, "")
            first, chunks, usage = float("nan"), 0, None
            usage_asked = bool((body.get("stream_options") or {}).get("include_usage"))
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    if usage_asked and (chunk := json.loads(line[6:])).get("usage"):
                        usage = int(chunk["usage"]["completion_tokens"])
                        continue
                    chunks += 1
                    if chunks == 1:
                        first = time.perf_counter() - started
                version = r.headers.get(VERSION_HEADER, "")
            tokens = chunks if usage is None else usage
            return tokens, time.perf_counter() - started, first, version

        started = time.perf_counter()
        results = await asyncio.gather(
            *(one(m, t, x) for m, t, x in zip(models, texts, fields, strict=True))
        )
        wall = time.perf_counter() - started
    return Round(
        sum(r[0] for r in results) / wall,
        [r[1] for r in results],
        [r[2] for r in results],
        [r[3] for r in results],
        [r[0] for r in results],
    )


def http_round(
    url: str,
    models: list[str],
    texts: list[str],
    new_tokens: int,
    *,
    stream: bool = False,
    extras: list[dict[str, Any]] | None = None,
) -> Round:
    return asyncio.run(
        http_round_async(url, models, texts, new_tokens, stream=stream, extras=extras)
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def load_mean(metrics: str) -> float | None:
    """Mean of lorafleet_adapter_load_seconds from a server's /metrics text."""
    sums = re.search(r"^lorafleet_adapter_load_seconds_sum (\S+)$", metrics, re.M)
    counts = re.search(r"^lorafleet_adapter_load_seconds_count (\S+)$", metrics, re.M)
    if not sums or not counts or float(counts[1]) == 0:
        return None
    return float(sums[1]) / float(counts[1])
