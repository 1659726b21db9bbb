"""Who gets in and what gets loaded: every admin route (enumerated from the app) and the
alert webhook answer 401 without the key or with a wrong one; the optional inference key
guards /v1/* while the probes and /metrics stay open; neither key is ever logged; keys are
compared with hmac.compare_digest; adapter names and files cannot leave the artifact store;
only safetensors are loaded.

The key checks of the routes run in process (`service`: the HTTP app over a real Server;
the check is the app's own middleware, serving/http/access.py). The probes and /metrics
(BentoML's routes) and the log (BentoML's access log, captured from the process's output)
need a real `lorafleet serve` (`bento`).

Elsewhere: unsafe names and files through the admin route are in test_admin_register.py;
the per-adapter request-log opt-out is
tests/serving/test_loop_service.py::test_request_log_keeps_adapter_requests_with_the_response_id.
"""

from __future__ import annotations

import argparse
import ast
import hmac
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from registry import Registry
from registry.basemodel import PICKLE_SUFFIXES
from registry.errors import AdapterWeightsError, InvalidAdapter, InvalidName
from serving.http.app import app

LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "sec-admin-key-7d2e5b90"
INFERENCE_KEY = "sec-inference-key-91ac04e3"
WRONG_KEYS = ["wrong-key-c4f1a2", ADMIN_KEY[:-1], ADMIN_KEY + "x", ADMIN_KEY.upper()]


@dataclass
class Running:
    url: str
    http: httpx.Client
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    serve_in_process: Callable[..., AbstractContextManager[Any]],
) -> Iterator[Any]:
    """The HTTP app over a real Server in this process, with both keys."""
    home = tmp_path_factory.mktemp("security-app") / "home"
    Registry.create(home, tiny_base, max_rank=16, actor="tests").close()
    keys = {"api_key": ADMIN_KEY, "inference_key": INFERENCE_KEY}
    with serve_in_process(home, tiny_base, {}, max_tokens_limit=8, **keys) as running:
        yield running


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[Running]:
    """`lorafleet serve` with both keys (the inference key from $LORAFLEET_INFERENCE_KEY), its
    stdout and stderr in one log file."""
    root = tmp_path_factory.mktemp("security")
    Registry.create(root / "home", tiny_base, max_rank=16, actor="tests").close()
    port, log = free_port(), root / "server.log"
    env = {
        **os.environ,
        "LORAFLEET_HOME": str(root / "home"),
        "LORAFLEET_INFERENCE_KEY": INFERENCE_KEY,
        "PYTHONUNBUFFERED": "1",
    }
    command = [LORAFLEET, "serve", "--base", str(tiny_base), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*command, "--api-key", ADMIN_KEY, "--max-tokens-limit", "8"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, f"server exited: {log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "server did not become ready in 180 s"
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield Running(url, http, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def routes(prefix: str) -> list[tuple[str, str]]:
    """(method, path) of every route of the app under `prefix`, path parameters filled."""
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith(prefix):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            found += [(method, path) for method in sorted(route.methods)]
    return sorted(found)


ADMIN_ROUTES = routes("/admin")
INFERENCE_ROUTES = routes("/v1/")


def test_the_route_lists_are_complete() -> None:
    assert len(ADMIN_ROUTES) >= 11  # every admin route of today; new ones join the list
    assert ("POST", "/admin/alerts") in ADMIN_ROUTES  # Alertmanager's webhook
    assert ("POST", "/admin/adapters/x") in ADMIN_ROUTES
    assert {p for _, p in INFERENCE_ROUTES} >= {"/v1/models", "/v1/completions"}


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_need_the_admin_key(method: str, path: str, service: Any) -> None:
    """401 before the body is read: a malformed body, the inference key or a near miss of
    the admin key all get the same answer."""
    attempts: list[dict[str, str]] = [
        {},
        *(bearer(k) for k in WRONG_KEYS),
        bearer(INFERENCE_KEY),
        {"Authorization": "Bearer"},
        {"Authorization": ADMIN_KEY},  # no Bearer scheme
        {"Authorization": f"Basic {ADMIN_KEY}"},
    ]
    for headers in attempts:
        response = service.http.request(method, path, headers=headers, content=b"{not json")
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "Unauthorized"
        assert "--api-key" in response.json()["error"]["message"]


def test_admin_key_opens_admin_routes(service: Any) -> None:
    response = service.http.get("/admin/residency", headers=bearer(ADMIN_KEY))
    assert response.status_code == 200, response.text
    assert response.json()["resident"] == []


@pytest.mark.parametrize(("method", "path"), INFERENCE_ROUTES)
def test_inference_routes_need_the_inference_key(method: str, path: str, service: Any) -> None:
    for headers in [{}, bearer("wrong-key-c4f1a2"), bearer(ADMIN_KEY), bearer(INFERENCE_KEY[1:])]:
        response = service.http.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (headers, response.text)
        assert "--inference-key" in response.json()["error"]["message"]


def test_inference_key_opens_v1_and_probes_stay_open(bento: Running) -> None:
    listed = bento.http.get("/v1/models", headers=bearer(INFERENCE_KEY))
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == ["base"]
    body = {"model": "base", "prompt": "Add: 3 + 4 =", "max_tokens": 3, "temperature": 0}
    done = bento.http.post("/v1/completions", json=body, headers=bearer(INFERENCE_KEY))
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] >= 1
    for path in ("/metrics", "/readyz", "/livez"):
        assert bento.http.get(path).status_code == 200, path


def test_keys_are_never_logged(bento: Running) -> None:
    """Calls with the right and wrong keys, then the whole log: it holds the access lines of
    these calls but neither key (nor a wrong one)."""
    for key in [ADMIN_KEY, INFERENCE_KEY, *WRONG_KEYS[:3]]:
        bento.http.get("/admin/residency", headers=bearer(key))
        bento.http.get("/v1/models", headers=bearer(key))
        bento.http.post("/admin/alerts", headers=bearer(key), json={"alerts": "bad"})
    # The last call, the only one to /admin/canary with the key: its line ends the wait.
    assert bento.http.get("/admin/canary", headers=bearer(ADMIN_KEY)).status_code == 200
    last = re.compile(r"/admin/canary\b.*status=200")
    deadline = time.monotonic() + 30
    while not last.search(text := bento.log.read_text()):
        assert time.monotonic() < deadline, f"no access log line for the calls: {text[-2000:]}"
        time.sleep(0.2)
    assert "/v1/models" in text and "/admin/alerts" in text
    for secret in [ADMIN_KEY, INFERENCE_KEY, *WRONG_KEYS[:3]]:
        assert secret not in text


def test_inference_key_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.cli.serve import add_serve_commands

    def parse(*argv: str) -> Any:
        parser = argparse.ArgumentParser()
        add_serve_commands(parser.add_subparsers())
        return parser.parse_args(["serve", "--base", "b", *argv])

    monkeypatch.delenv("LORAFLEET_INFERENCE_KEY", raising=False)
    assert parse().inference_key is None
    assert parse("--inference-key", "k1").inference_key == "k1"
    monkeypatch.setenv("LORAFLEET_INFERENCE_KEY", "k2")
    assert parse().inference_key == "k2"


# ---- constant-time comparison, in process ---------------------------------------------------


def test_keys_are_compared_with_hmac_compare_digest(
    service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = service.http
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    wrong = "x" * len(ADMIN_KEY)  # same length: only the content differs
    assert client.get("/admin/residency", headers=bearer(wrong)).status_code == 401
    assert calls == [(wrong.encode(), ADMIN_KEY.encode())]
    # The check runs before routing: an admin path the app does not have is a 401 too.
    assert client.post("/admin/nowhere", content=b"{not json").status_code == 401
    calls.clear()
    assert client.get("/admin/residency", headers=bearer(ADMIN_KEY)).status_code == 200
    assert calls and all(c == (ADMIN_KEY.encode(), ADMIN_KEY.encode()) for c in calls)
    # The decision is compare_digest's: if it says equal, a wrong key gets in.
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: True)
    opened = client.get("/admin/residency", headers=bearer(wrong))
    assert opened.status_code == 200
    assert opened.json()["revision"] == service.server.router.map.revision


# ---- names and files cannot leave the artifact store ----------------------------------------


def snapshot(home: Path) -> tuple[int, list[str], list[str]]:
    registry = Registry(home)
    try:
        return (
            registry.revision(),
            sorted(os.listdir(home / "artifacts" / "sha256")),
            sorted(os.listdir(home / "artifacts" / "tmp")),
        )
    finally:
        registry.close()


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/tmp/x", "x/../../y", ".hidden", "a\\b"])
def test_registry_refuses_names_that_are_paths(
    name: str, home: Path, tiny_base: Path, adapter_factory: Callable[..., Path]
) -> None:
    before = snapshot(home)
    registry = Registry(home)
    try:
        with pytest.raises(InvalidName, match="invalid adapter name"):
            registry.register(name, adapter_factory(tiny_base))
    finally:
        registry.close()
    assert snapshot(home) == before


def _symlink_to_outside(adapter: Path) -> None:
    outside = adapter.parent / "outside.safetensors"
    (adapter / "adapter_model.safetensors").rename(outside)
    (adapter / "adapter_model.safetensors").symlink_to(outside)


def _link_to_secret(adapter: Path) -> None:
    (adapter / "notes.txt").symlink_to("/etc/passwd")


def _linked_directory(adapter: Path) -> None:
    (adapter / "more").symlink_to(adapter.parent, target_is_directory=True)


def _subdirectory(adapter: Path) -> None:
    (adapter / "sub").mkdir()
    (adapter / "sub" / "x.txt").write_text("x")


def _fifo(adapter: Path) -> None:
    os.mkfifo(adapter / "pipe")


ESCAPES = [
    (_symlink_to_outside, "contains a symlink 'adapter_model.safetensors'"),
    (_link_to_secret, "contains a symlink 'notes.txt'"),
    (_linked_directory, "contains a symlink 'more'"),
    (_subdirectory, "contains a subdirectory 'sub'"),
    (_fifo, "contains 'pipe', which is not a regular file"),
]


@pytest.mark.parametrize(("escape", "message"), ESCAPES, ids=[e[0].__name__ for e in ESCAPES])
def test_register_refuses_links_and_special_files(
    escape: Callable[[Path], None],
    message: str,
    home: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    copy_adapter: Callable[[Path], Path],
) -> None:
    adapter = copy_adapter(adapter_factory(tiny_base))
    escape(adapter)
    before = snapshot(home)
    registry = Registry(home)
    try:
        with pytest.raises(InvalidAdapter, match=re.escape(message)):
            registry.register("support", adapter)
    finally:
        registry.close()
    assert snapshot(home) == before


@pytest.mark.parametrize("digest", ["../../etc", "/etc/passwd", "a" * 63 + "/", "A" * 64, ""])
def test_artifact_paths_come_from_sha256_digests_only(digest: str, home: Path) -> None:
    registry = Registry(home)
    try:
        with pytest.raises(ValueError, match="not a sha256 digest"):
            registry.artifacts.path(digest)
    finally:
        registry.close()


# ---- only safetensors are ever loaded -------------------------------------------------------


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickle_files_in_an_adapter_are_refused(
    suffix: str,
    home: Path,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    copy_adapter: Callable[[Path], Path],
) -> None:
    adapter = copy_adapter(adapter_factory(tiny_base))
    (adapter / f"extra{suffix}").write_bytes(b"\x80\x04}\x94.")  # pickle of {}
    registry = Registry(home)
    try:
        with pytest.raises(AdapterWeightsError, match=f"contains pickle file 'extra{suffix}'"):
            registry.register("support", adapter)
        assert registry.adapter_names() == []
    finally:
        registry.close()


UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def unsafe_loads(source: str) -> list[str]:
    """Lines of `source` that unpickle: torch.load, torch.jit.load, an import of a pickling
    module, numpy.load(allow_pickle=True), or a model's from_pretrained without
    use_safetensors=True (which falls back to pickled pytorch_model.bin)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names.append(getattr(node, "module", None) or "")
            if any(n.split(".")[0] in UNPICKLING_MODULES for n in names):
                found.append(f"{node.lineno}: import {', '.join(names)}")
        if not isinstance(node, ast.Call):
            continue
        call = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if re.fullmatch(r"torch(\.jit|\.serialization)?\.load", call):
            found.append(f"{node.lineno}: {call}")
        elif call.endswith("load") and keywords.get("allow_pickle") == "True":
            found.append(f"{node.lineno}: {call}(allow_pickle=True)")
        elif (
            call.endswith(".from_pretrained")
            and "Tokenizer" not in call
            and keywords.get("use_safetensors") != "True"
        ):
            found.append(f"{node.lineno}: {call} without use_safetensors=True")
    return sorted(found, key=lambda hit: int(hit.split(":")[0]))


def test_the_scanner_finds_unpickling() -> None:
    planted = (
        "import torch\nimport pickle as p\nfrom joblib import load\n"
        "torch.load(f)\ntorch.jit.load(f)\nnp.load(f, allow_pickle=True)\n"
        "AutoModelForCausalLM.from_pretrained(d)\n"
        "AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)\n"
        "AutoTokenizer.from_pretrained(d)\n"
    )
    assert [line.split(":")[0] for line in unsafe_loads(planted)] == ["2", "3", "4", "5", "6", "7"]


def test_no_code_unpickles() -> None:
    files = sorted(p for d in ("registry", "serving", "tuning") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 40
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := unsafe_loads(p.read_text()))}
    assert found == {}
