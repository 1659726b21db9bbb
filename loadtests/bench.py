"""`make bench`: side-by-side throughput comparisons on the `small` base model.

Each comparison runs both sides in this one run, on the same machine and traffic, and
reports the median (min-max) of several repeats and their ratio. Results go to
loadtests/results/<timestamp>.json. Comparisons so far:

- B1 mixed-adapter / base-only throughput through the HTTP service (8 adapters + base,
  32 concurrent streams, 64 new tokens, greedy, bf16). Target >= 0.90.
- B2 lorafleet / a naive PEFT server (one request at a time: set_adapter, then generate)
  on the same 32 requests. Target >= 10x.
- B3 the HTTP service / the same engine called in-process on the same batch. Target >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
RESULTS = ROOT / "loadtests" / "results"


@dataclass
class Setup:
    model: str = "small"
    dtype: str = "bf16"
    streams: int = 32
    new_tokens: int = 64
    adapters: int = 8
    rank: int = 8
    repeats: int = 3
    engine: str = "hf"


@dataclass
class Figure:
    name: str
    setup: dict[str, Any]
    numerator: str
    denominator: str
    values: dict[str, list[float]]  # side -> tokens/s of each repeat
    target: str

    def median(self, side: str) -> float:
        return statistics.median(self.values[side])

    @property
    def ratio(self) -> float:
        return self.median(self.numerator) / self.median(self.denominator)

    def line(self) -> str:
        def side(name: str) -> str:
            v = self.values[name]
            return f"{name} {statistics.median(v):8.1f} tok/s ({min(v):.1f}-{max(v):.1f})"

        return (
            f"{self.name:<3} {self.ratio:6.2f}x  {side(self.numerator)}  vs  "
            f"{side(self.denominator)}   target {self.target}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(work: Path, setup: Setup) -> tuple[Path, Path, list[str]]:
    """Base model, adapters and a registry with each adapter promoted."""
    from registry import Registry
    from tuning.tinymodel import build_base_model, build_random_adapter

    base = build_base_model(work / "base", size=setup.model, seed=0)  # type: ignore[arg-type]
    home = work / "home"
    registry = Registry.create(home, base, max_rank=setup.rank)
    names = []
    for i in range(setup.adapters):
        adapter = build_random_adapter(
            base,
            work / f"a{i}",
            rank=setup.rank,
            alpha=2 * setup.rank,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            seed=i,
        )
        registry.register(f"task{i}", adapter)
        registry.promote(f"task{i}", 1)
        names.append(f"task{i}")
    registry.close()
    return base, home, names


def prompts(base: Path, count: int) -> list[str]:
    from tuning.corpus import sentences

    return [" ".join(sentences(3, seed=i)) for i in range(count)]


async def http_round(url: str, models: list[str], texts: list[str], new_tokens: int) -> float:
    """All requests at once; tokens/s of generated tokens over the wall time."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(model: str, text: str) -> int:
            r = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": text, "max_tokens": new_tokens, "temperature": 0},
            )
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(m, t) for m, t in zip(models, texts, strict=True)))
        return sum(tokens) / (time.perf_counter() - started)


def engine_round(
    engine: Any, keys: list[str | None], ids: list[list[int]], new_tokens: int
) -> float:
    import threading

    from serving.engine import GenerationRequest, SamplingParams

    done = threading.Semaphore(0)
    counts = [0] * len(keys)

    def callback(i: int) -> Callable[[Any], None]:
        def on_event(event: Any) -> None:
            if event.token_id is None:
                done.release()
            else:
                counts[i] += 1

        return on_event

    started = time.perf_counter()
    for i, (key, prompt) in enumerate(zip(keys, ids, strict=True)):
        engine.submit(
            GenerationRequest(
                uuid.uuid4().hex, prompt, SamplingParams(max_new_tokens=new_tokens), key
            ),
            callback(i),
        )
    for _ in keys:
        done.acquire()
    return sum(counts) / (time.perf_counter() - started)


def naive_round(
    model: Any, tokenizer: Any, names: list[str | None], texts: list[str], new_tokens: int
) -> float:
    """What a user writes with PEFT alone: one request at a time, set_adapter, generate."""
    import torch

    total, started = 0, time.perf_counter()
    for name, text in zip(names, texts, strict=True):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
        total += out.shape[1] - ids["input_ids"].shape[1]
    return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    args = parser.parse_args()
    setup = Setup(model=args.model, repeats=args.repeats)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        work = Path(tmp)
        print(f"setup: {asdict(setup)}", flush=True)
        base, home, names = prepare(work, setup)
        texts = prompts(base, setup.streams)
        mixed = [[*names, "base"][i % (len(names) + 1)] for i in range(setup.streams)]
        base_only = ["base"] * setup.streams

        port = free_port()
        env = {**os.environ, "LORAFLEET_HOME": str(home)}
        server = subprocess.Popen(
            [
                LORAFLEET,
                "serve",
                "--base",
                str(base),
                "--port",
                str(port),
                "--dtype",
                setup.dtype,
                "--max-adapters",
                str(setup.adapters),
                "--max-batch",
                str(setup.streams),
                "--max-len",
                "512",
                "--max-tokens-limit",
                str(setup.new_tokens),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, server)
            asyncio.run(http_round(url, mixed, texts, 8))  # warm-up: loads every adapter
            values: dict[str, list[float]] = {"mixed": [], "base-only": []}
            for _ in range(setup.repeats):
                values["mixed"].append(asyncio.run(http_round(url, mixed, texts, setup.new_tokens)))
                values["base-only"].append(
                    asyncio.run(http_round(url, base_only, texts, setup.new_tokens))
                )
            figures.append(Figure("B1", asdict(setup), "mixed", "base-only", values, ">= 0.90"))
            print(figures[-1].line(), flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        http_mixed = values["mixed"]

        figures.append(in_process(base, home, names, mixed, texts, setup, http_mixed))
        print(figures[-1].line(), flush=True)
        figures.append(naive(base, home, names, mixed, texts, setup, http_mixed))
        print(figures[-1].line(), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps([{**asdict(f), "ratio": f.ratio} for f in figures], indent=1))
    print(f"\nresults: {path}")


def wait_ready(url: str, server: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def adapter_paths(home: Path, names: list[str]) -> dict[str, Path]:
    """Each adapter's production artifact directory (sha256-checked)."""
    from registry import Registry

    registry = Registry(home)
    try:
        return {name: registry.artifact_path(registry.resolve(name)) for name in names}
    finally:
        registry.close()


def in_process(
    base: Path,
    home: Path,
    names: list[str],
    models: list[str],
    texts: list[str],
    setup: Setup,
    http_values: list[float],
) -> Figure:
    from transformers import AutoTokenizer

    from serving.engines.hf import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    engine = HFEngine(
        base,
        dtype=setup.dtype,
        max_batch=setup.streams,
        max_len=512,
        adapter_slots=setup.adapters,
        max_rank=setup.rank,
    )
    for name, path in adapter_paths(home, names).items():
        engine.load_adapter(f"{name}@1", path)
    keys = [None if m == "base" else f"{m}@1" for m in models]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    try:
        engine_round(engine, keys, ids, 8)
        values = [engine_round(engine, keys, ids, setup.new_tokens) for _ in range(setup.repeats)]
    finally:
        engine.shutdown()
    return Figure(
        "B3",
        asdict(setup),
        "http",
        "in-process",
        {"http": http_values, "in-process": values},
        ">= 0.8",
    )


def naive(
    base: Path,
    home: Path,
    names: list[str],
    models: list[str],
    texts: list[str],
    setup: Setup,
    http_values: list[float],
) -> Figure:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer


    dtype = torch.bfloat16 if setup.dtype == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    for i, (name, path) in enumerate(adapter_paths(home, names).items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    model.eval()
    adapters = [None if m == "base" else m for m in models]
    repeats = max(1, setup.repeats - 1)  # one request at a time is slow; fewer repeats
    values = [
        naive_round(model, tokenizer, adapters, texts, setup.new_tokens) for _ in range(repeats)
    ]
    return Figure(
        "B2",
        asdict(setup),
        "lorafleet",
        "naive-peft",
        {"lorafleet": http_values, "naive-peft": values},
        ">= 10x",
    )


if __name__ == "__main__":
    main()
