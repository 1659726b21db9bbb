"""Shared fixtures: tiny base models and adapters are built once per session and reused.

Everything is real: base models built by `tuning.tinymodel`, adapters written by peft,
registries in SQLite under tmp_path, the CLI run as a subprocess. Servers come two ways:
`serve` starts `lorafleet serve` (BentoML) on a free port, for what needs a process of its
own (BentoML's probes, /metrics and access logs, sockets, kills, the browser, Prometheus);
`serve_in_process` runs the same HTTP app over a real Server in this process, for cases of
the HTTP layer (validation, error bodies, keys, routes, admin calls, response shapes).
The OpenAI clients' tests (tests/serving/test_openai_*.py) share one `serve` process for the
session (`openai_fleet`) and `openai_reference`: transformers + peft over its adapters.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype auto means bf16 on CPUs with AMX or AVX512-BF16 and fp32 elsewhere; the references
# the tests compare with are fp32 on every machine (tests/registry/test_hardware.py checks auto).
os.environ["LORAFLEET_DTYPE"] = "fp32"

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout, `kill`) interrupts the run as Ctrl-C does, so the fixtures'
    finalizers stop every server they started; its default action skips them."""
    signal.signal(signal.SIGTERM, _interrupt)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, home: Path | None = None, env: dict[str, str] | None = None) -> Result:
    """Run the installed `lorafleet` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    if home is not None:
        full_env["LORAFLEET_HOME"] = str(home)
    proc = subprocess.run(
        [LORAFLEET, *args], capture_output=True, text=True, env=full_env, timeout=300
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    return run_cli


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuning.tinymodel import build_base_model

    return build_base_model(tmp_path_factory.mktemp("bases") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and shapes as `tiny_base`, other weights: another fingerprint."""
    from tuning.tinymodel import build_base_model

    return build_base_model(tmp_path_factory.mktemp("bases") / "other", size="tiny", seed=1)


@pytest.fixture(scope="session")
def family_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """family_base(arch, tied=None) -> a tiny base (seed 0) of model type `arch`, one of
    tuning.tinymodel.ARCHITECTURES; `tied` forces tie_word_embeddings (None: the family's
    default). Built once per (arch, tied) for the session."""
    from tuning.tinymodel import build_base_model

    root = tmp_path_factory.mktemp("family-bases")
    cache: dict[tuple[str, bool | None], Path] = {}

    def build(arch: str, tied: bool | None = None) -> Path:
        if (arch, tied) not in cache:
            name = arch if tied is None else f"{arch}-{'tied' if tied else 'untied'}"
            cache[arch, tied] = build_base_model(
                root / name, size="tiny", seed=0, arch=arch, tie_word_embeddings=tied
            )
        return cache[arch, tied]

    return build


@pytest.fixture(scope="session")
def adapter_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., Path]:
    """make(base, rank=4, seed=0, targets=...) -> a peft adapter directory (cached)."""
    from tuning.tinymodel import build_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    cache: dict[tuple[object, ...], Path] = {}

    def make(
        base: Path, *, rank: int = 4, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")
    ) -> Path:
        key = (str(base), rank, seed, targets)
        if key not in cache:
            out = root / f"a{len(cache)}"
            cache[key] = build_random_adapter(
                base, out, rank=rank, alpha=2.0 * rank, target_modules=targets, seed=seed
            )
        return cache[key]

    return make


def one_adapter_home(
    home: Path, base: Path, adapter_factory: Callable[..., Path]
) -> dict[str, Path]:
    """A registry at `home` holding alpha@1 (rank 4, production); returns {ref: directory}
    for the `serve` fixture. The set-up of tests of the HTTP layer."""
    from registry import Registry

    registry = Registry.create(home, base)
    adapters = {"alpha@1": adapter_factory(base, rank=4, seed=21)}
    registry.register("alpha", adapters["alpha@1"])
    registry.promote("alpha", 1)
    registry.close()
    return adapters


@pytest.fixture(scope="session")
def alpha_registry() -> Callable[..., dict[str, Path]]:
    """alpha_registry(home, base, adapter_factory): see `one_adapter_home`."""
    return one_adapter_home


def sentiment_profiled(base: Path, src: Path, dst: Path) -> Path:
    """A copy of adapter `src` at `dst` with a drift profile (profile.json) of the sentiment
    task's train rows as `base` tokenizes them, as `lorafleet tune` writes one. Register it
    with metadata={"drift_profile": "profile.json"}."""
    import json

    from transformers import AutoTokenizer

    from registry.profile import build_profile

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(base))
    lines = (EXAMPLES / "data" / "sentiment" / "train.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in lines]
    build_profile(
        [tok(r["prompt"])["input_ids"] for r in train],
        vocab_size=len(tok),
        completion_lengths=[len(tok(r["completion"])["input_ids"]) + 1 for r in train],
    ).save(dst)
    return dst


@pytest.fixture(scope="session")
def profiled_copy() -> Callable[[Path, Path, Path], Path]:
    """profiled_copy(base, src, dst): see `sentiment_profiled`."""
    return sentiment_profiled


@pytest.fixture
def copy_adapter(tmp_path: Path) -> Callable[[Path], Path]:
    """A private, editable copy of an adapter directory."""
    counter = iter(range(1000))

    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy{next(counter)}"
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def home(tmp_path: Path, tiny_base: Path) -> Path:
    """A new registry bound to `tiny_base`."""
    from registry import Registry

    path = tmp_path / "home"
    Registry.create(path, tiny_base, max_rank=16, actor="tests").close()
    return path


@pytest.fixture(scope="session")
def peft_greedy() -> Callable[..., list[int]]:
    """greedy(base, adapter | None, prompt_ids, n) -> new token ids from transformers + peft,
    one request at a time: the reference the engines are held to (eos not included)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models: dict[tuple[str, str | None], object] = {}

    def greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
        key = (str(base), str(adapter) if adapter else None)
        if key not in models:
            model = AutoModelForCausalLM.from_pretrained(str(base))
            models[key] = PeftModel.from_pretrained(model, str(adapter)) if adapter else model
        tok = AutoTokenizer.from_pretrained(str(base))
        with torch.no_grad():
            out = models[key].generate(  # type: ignore[attr-defined]
                torch.tensor([prompt]),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        tokens: list[int] = out[0, len(prompt) :].tolist()
        return tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens

    return greedy


ADMIN_KEY = "test-admin-key"


class Service:
    """A running server and clients for it: a `lorafleet serve` process (`serve`) or the
    HTTP app in this process (`serve_in_process`, whose `http` is a TestClient)."""

    def __init__(
        self,
        url: str,
        home: Path,
        adapters: dict[str, Path],
        base: Path,
        http: httpx.Client | None = None,
    ) -> None:
        import httpx
        import openai

        self.url, self.home, self.adapters, self.base = url, home, adapters, base
        self.admin_key = ADMIN_KEY
        self.pid = 0
        self.server: Any = None  # the Server itself, in process only
        self.http = http if http is not None else httpx.Client(base_url=url, timeout=60)
        self.client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http
        )

    def admin(
        self, path: str, body: dict[str, object] | None = None, key: str | None = None
    ) -> Any:
        """GET (no body) or POST `path` with the admin key (or `key`), as actor `tester`."""
        headers = {
            "Authorization": f"Bearer {self.admin_key if key is None else key}",
            "X-Lorafleet-Actor": "tester",
        }
        if body is None:
            return self.http.get(path, headers=headers)
        return self.http.post(path, json=body, headers=headers)

    def served(
        self, model: str, prompt: str = "Review: the pizza was great.\nSentiment:", **kw: object
    ) -> tuple[str, str]:
        """(version that served it, text) of a greedy 4-token completion."""
        body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}
        response = self.http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["text"]
        return response.headers["X-Lorafleet-Adapter-Version"], text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve() -> Callable[..., AbstractContextManager[Service]]:
    """serve(home, base, adapters, *options, env=...): run `lorafleet serve` on a free port
    (`env`: variables added to the server's environment)."""
    import httpx

    @contextmanager
    def run(
        home: Path,
        base: Path,
        adapters: dict[str, Path],
        *options: str,
        env: dict[str, str] | None = None,
    ) -> Iterator[Service]:
        port = free_port()
        proc = subprocess.Popen(
            [
                LORAFLEET,
                "serve",
                "--base",
                str(base),
                "--port",
                str(port),
                "--api-key",
                ADMIN_KEY,
                *options,
            ],
            env={**os.environ, "LORAFLEET_HOME": str(home), **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        try:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited: {proc.stderr.read() if proc.stderr else ''}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready in 180 s")
                time.sleep(0.5)
            service = Service(url, home, adapters, base)
            service.pid = proc.pid  # `lorafleet serve`, which runs `bentoml serve` as its child
            yield service
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except ProcessLookupError:  # a test killed it
                proc.wait()
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    return run


# ---- the OpenAI clients' server: one `lorafleet serve` for tests/serving/test_openai_*.py ---


def two_adapter_home(
    home: Path, base: Path, adapter_factory: Callable[..., Path]
) -> dict[str, Path]:
    """alpha@1 and beta@1 (other seed and targets), both production: {ref: directory}."""
    from registry import Registry

    registry = Registry.create(home, base)
    adapters = {
        "alpha@1": adapter_factory(base, rank=4, seed=21),
        "beta@1": adapter_factory(base, rank=4, seed=23, targets=("v_proj", "down_proj")),
    }
    for ref, path in adapters.items():
        name = ref.split("@")[0]
        registry.register(name, path)
        registry.promote(name, 1)
    registry.close()
    return adapters


@pytest.fixture(scope="session")
def openai_fleet(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Service]],
) -> Iterator[Service]:
    """`lorafleet serve` (hf engine, --max-len 512, no canary verdicts) over
    `two_adapter_home`: one process for the session, which test_openai_sdk.py and
    test_openai_tools.py share; stopped when the session ends."""
    home = tmp_path_factory.mktemp("openai-clients") / "home"
    adapters = two_adapter_home(home, tiny_base, adapter_factory)
    options = ("--engine", "hf", "--max-len", "512", "--no-canary-verdicts")
    with serve(home, tiny_base, adapters, *options) as running:
        yield running


class Reference:
    """transformers + peft in fp32, one sequence at a time: log_softmax of the raw logits
    and greedy decoding, optionally with OpenAI's penalties and logit_bias; and the
    tokenizer (`tok`), to write prompts as token ids the way the server reads them."""

    def __init__(self, base: Path, adapters: dict[str, Path], tokenizer: Any) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def load() -> Any:
            return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)

        # One base copy per adapter: peft injects its layers into the model it wraps.
        self.models: dict[str, Any] = {"base": load().eval()}
        for ref, path in adapters.items():
            self.models[ref.split("@")[0]] = PeftModel.from_pretrained(load(), str(path)).eval()
        self.eos = {tokenizer.eos_token_id}
        self.tok = tokenizer

    def ids(self, text: str) -> list[int]:
        """The prompt ids of a completions prompt `text`."""
        return list(self.tok(text)["input_ids"])

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt ids of a conversation as the server renders it (template, no specials)."""
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def logprobs(self, model: str, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab): row i is the distribution of the token after ids[: i + 1]."""
        import torch

        with torch.no_grad():
            logits = self.models[model](torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def greedy(
        self,
        model: str,
        prompt: list[int],
        n: int,
        *,
        frequency: float = 0.0,
        presence: float = 0.0,
        bias: dict[int, float] | None = None,
    ) -> list[int]:
        """Up to n greedy tokens (eos ends them, not included). Penalties count generated
        tokens only: logit - count * frequency - (count > 0) * presence."""
        import torch

        out: list[int] = []
        for _ in range(n):
            logits = self.logprobs(model, prompt + out)[-1].clone()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(logits))
            logits -= counts[: len(logits)] * frequency + (counts[: len(logits)] > 0) * presence
            for token, value in (bias or {}).items():
                logits[token] += value
            token = int(logits.argmax())
            if token in self.eos:
                break
            out.append(token)
        return out

    def text(self, ids: list[int]) -> str:
        """The text the server hands out for `ids`: as vLLM, it never ends a text with an
        incomplete character (transformers' decode would end it with U+FFFD), so the
        longest prefix of the tokens that decodes without one."""
        for end in range(len(ids), -1, -1):
            text = str(self.tok.decode(ids[:end], skip_special_tokens=True))
            if not text.endswith("\ufffd"):
                return text
        return ""

    def piece(self, token: int) -> str:
        """The text of one token, as logprobs name it."""
        return str(self.tok.decode([token]))


@pytest.fixture(scope="session")
def openai_reference(tiny_base: Path, openai_fleet: Service) -> Reference:
    """A `Reference` over `openai_fleet`'s base and adapters (models base, alpha, beta)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    return Reference(tiny_base, openai_fleet.adapters, tokenizer)


# ---- the HTTP app in this process: cases of the HTTP layer, no BentoML -----------------------


@pytest.fixture(scope="session")
def serve_in_process() -> Callable[..., AbstractContextManager[Service]]:
    """serve_in_process(home, base, adapters, **options): serving/http/app.py's app over a
    real Server (hf engine, the admin key of `serve`; `options` are ServeConfig fields) in
    this process, driven by starlette's TestClient: the routes, key check, request limits,
    errors and response shapes as `lorafleet serve` runs them, without BentoML, a socket or
    the start-up of a process. One at a time (the app holds one server): the Server is
    closed and `app.state.server` restored when the block ends, whatever happens."""
    from fastapi.testclient import TestClient

    from serving.http.app import app
    from serving.runtime.server import Server
    from serving.serve_config import ServeConfig

    @contextmanager
    def run(home: Path, base: Path, adapters: dict[str, Path], **options: Any) -> Iterator[Service]:
        previous = getattr(app.state, "server", None)
        if previous is not None:
            raise RuntimeError(f"the app already serves {previous!r}; one server at a time")
        config = ServeConfig(
            **{"base": base, "home": home, "engine": "hf", "api_key": ADMIN_KEY, **options}
        )
        server = Server(config)
        try:
            app.state.server = server
            # The block keeps one event loop for every request, as a server's worker does.
            with TestClient(app, base_url="http://testserver") as http:
                service = Service("http://testserver", home, adapters, base, http=http)
                service.server, service.admin_key = server, config.api_key or ""
                yield service
        finally:
            app.state.server = previous
            server.close()

    return run


@pytest.fixture(scope="module")
def alpha_app(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve_in_process: Callable[..., AbstractContextManager[Service]],
) -> Iterator[Service]:
    """The app in this process over `one_adapter_home` (alpha@1, production) with
    ServeConfig's defaults and no canary verdicts: one per test module."""
    home = tmp_path_factory.mktemp("alpha-app") / "home"
    adapters = one_adapter_home(home, tiny_base, adapter_factory)
    with serve_in_process(home, tiny_base, adapters, canary_verdicts=False) as service:
        yield service


# ---- monitoring: real Prometheus and Alertmanager (tests/monitoring.py) ---------------------


def _load_monitoring() -> Any:
    """tests/ is no package: load the harness module from its file."""
    import importlib.util

    name = "lorafleet_tests_monitoring"
    if name not in sys.modules:
        path = Path(__file__).with_name("monitoring.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def require_binary() -> Callable[[str], str]:
    """require_binary(name) -> path; skips when missing (names the Debian package), fails
    when CI=true."""
    return _load_monitoring().require_binary  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def monitoring_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., AbstractContextManager[Any]]:
    """monitoring_stack(target="127.0.0.1:PORT", webhook_url=URL, admin_key=KEY, for_="1s")
    -> a context manager yielding tests/monitoring.py's MonitoringStack: real Prometheus
    (deploy/'s rules with short `for:`) and Alertmanager (deploy/'s routing, the webhook at
    `webhook_url`), both on free loopback ports, stopped when the block ends."""
    monitoring = _load_monitoring()

    def start(**options: Any) -> AbstractContextManager[Any]:
        workdir = tmp_path_factory.mktemp("monitoring")
        return monitoring.monitoring_stack(workdir, **options)  # type: ignore[no-any-return]

    return start


# ---- the shared registry's servers: PostgreSQL and S3 (tests/stores.py) ---------------------


def _load_stores() -> Any:
    """tests/ is no package: load the harness module from its file."""
    import importlib.util

    name = "lorafleet_tests_stores"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("stores.py"))
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """Debian's PostgreSQL on a free loopback port for the whole run (tests/stores.py's
    Postgres: `new_database()` -> URL)."""
    with _load_stores().postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[Any]:
    """moto's S3 server on a free loopback port for the whole run (tests/stores.py's S3:
    `env()`, `new_bucket()` -> s3:// URL)."""
    with _load_stores().s3_server() as server:
        yield server


@pytest.fixture
def shared_store(postgres: Any, s3: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A new PostgreSQL database and S3 bucket, set as this test's registry
    (LORAFLEET_REGISTRY_URL, LORAFLEET_ARTIFACTS_URL and the S3 client's variables, which
    the processes a test starts inherit); the variables set."""
    env = {
        "LORAFLEET_REGISTRY_URL": postgres.new_database(),
        "LORAFLEET_ARTIFACTS_URL": s3.new_bucket(),
        **s3.env(),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
