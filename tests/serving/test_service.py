"""The service (hf engine, tiny base, adapters alpha@1, alpha@2 and beta@1), driven with the
official openai client: every endpoint, streaming, errors, admin auth, hot-swap from
another process and under concurrent load, feedback, metrics.

Endpoints, streaming, errors, admin calls and feedback run in process (`service`: the HTTP
app over a real Server; nothing of them is BentoML's). Alias moves made by another process,
swaps under load over real sockets, a client that hangs up mid-stream and the metrics
(BentoML's /metrics, merged in serving/http/service.py) run on `lorafleet serve` (`bento`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from registry import Registry

Service = Any  # a server of conftest's `serve` or `serve_in_process`

PROMPTS = ["Review: the pizza was great.\nSentiment:", "Add: 3 + 4 =", "The customer sends"]


def three_adapter_home(
    home: Path, base: Path, adapter_factory: Callable[..., Path]
) -> dict[str, Path]:
    """alpha@1 (production), alpha@2 (rank 8, other targets), beta@1 (production): returns
    {ref: directory}."""
    registry = Registry.create(home, base)
    adapters = {
        "alpha@1": adapter_factory(base, rank=4, seed=21),
        "alpha@2": adapter_factory(base, rank=8, seed=22, targets=("q_proj", "o_proj")),
        "beta@1": adapter_factory(base, rank=4, seed=23, targets=("v_proj", "down_proj")),
    }
    for key, path in adapters.items():
        registry.register(key.split("@")[0], path)
    registry.promote("alpha", 1)
    registry.promote("beta", 1)
    registry.close()
    return adapters


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve_in_process: Callable[..., AbstractContextManager[Service]],
) -> Iterator[Service]:
    """The HTTP app over a real Server in this process."""
    home = tmp_path_factory.mktemp("serve-app") / "home"
    adapters = three_adapter_home(home, tiny_base, adapter_factory)
    options = {"max_adapters": 3, "max_len": 256, "max_tokens_limit": 64}
    with serve_in_process(home, tiny_base, adapters, **options) as running:
        yield running


@pytest.fixture(scope="module")
def bento(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Service]],
) -> Iterator[Service]:
    """`lorafleet serve` with the same registry and options as `service`, every model served
    once: its versions resident, as when these cases followed the others on one server."""
    home = tmp_path_factory.mktemp("serve") / "home"
    adapters = three_adapter_home(home, tiny_base, adapter_factory)
    with serve(
        home,
        tiny_base,
        adapters,
        "--max-adapters",
        "3",
        "--max-len",
        "256",
        "--max-tokens-limit",
        "64",
    ) as running:
        for model in ("base", "alpha", "alpha@2", "beta"):
            running.served(model)
        yield running


# ---- in process: the HTTP app over a real Server ------------------------------------------


def test_models_lists_base_adapters_versions_and_aliases(service: Service) -> None:
    models = {m.id: m for m in service.client.models.list().data}
    assert set(models) == {"base", "alpha", "beta"}
    assert models["alpha"].model_extra == {"versions": [1, 2], "aliases": {"production": 1}}


def test_completions_equal_peft_for_each_model(
    service: Service, peft_greedy: Callable[..., list[int]]
) -> None:
    tok = AutoTokenizer.from_pretrained(str(service.base))
    for model, key in (
        ("base", None),
        ("alpha", "alpha@1"),
        ("alpha@2", "alpha@2"),
        ("beta", "beta@1"),
    ):
        for prompt in PROMPTS:
            result = service.client.completions.create(
                model=model, prompt=prompt, max_tokens=6, temperature=0
            )
            assert result.model == (key or "base")
            ids = tok(prompt)["input_ids"]
            adapter = service.adapters[key] if key else None
            expected = tok.decode(
                peft_greedy(service.base, adapter, ids, 6), skip_special_tokens=True
            )
            assert result.choices[0].text == expected, (model, prompt)


def test_concurrent_mixed_requests_equal_sequential(service: Service) -> None:
    models = ["base", "alpha", "beta", "alpha@2"] * 3
    sequential = [service.served(m, p) for m, p in zip(models, PROMPTS * 4, strict=True)]
    results: list[tuple[str, str] | None] = [None] * len(models)

    def call(i: int) -> None:
        results[i] = service.served(models[i], (PROMPTS * 4)[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential


def test_chat_stream_equals_non_stream(service: Service) -> None:
    messages = [{"role": "user", "content": "Add: 2 + 2 ="}]
    whole = service.client.chat.completions.create(
        model="beta",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    chunks = list(
        service.client.chat.completions.create(
            model="beta", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )  # type: ignore[arg-type]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert all(c.model == "beta@1" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text_chunks = list(
        service.client.completions.create(
            model="alpha", prompt=PROMPTS[1], max_tokens=5, temperature=0, stream=True
        )
    )
    assert (
        "".join(c.choices[0].text for c in text_chunks)
        == service.served("alpha", PROMPTS[1], max_tokens=5)[1]
    )


def test_errors_name_what_is_wrong(service: Service) -> None:
    with pytest.raises(openai.NotFoundError, match="models: base, alpha, beta"):
        service.client.completions.create(model="gamma", prompt="x")
    with pytest.raises(openai.NotFoundError, match="has no alias 'staging'"):
        service.client.completions.create(model="alpha:staging", prompt="x")
    with pytest.raises(openai.NotFoundError, match="alpha@9 does not exist; active versions: 1, 2"):
        service.client.completions.create(model="alpha@9", prompt="x")
    cases = [
        ({"temperature": -1}, 422, "temperature"),
        ({"top_p": 0}, 422, "top_p"),
        ({"max_tokens": 0}, 400, "only valid with echo"),
        ({"max_tokens": 65}, 400, "max_tokens 65 > 64"),
        ({"colour": "red"}, 400, "unrecognized request argument(s): colour"),
        ({"prompt": "word " * 400}, 400, "exceeds max_len 256"),
        ({"model": "Bad Name"}, 400, "invalid"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ]
    for extra, status, fragment in cases:
        body = {"model": "alpha", "prompt": "x", **extra}
        response = service.http.post("/v1/completions", json=body)
        assert response.status_code == status, (extra, response.text)
        assert fragment in response.text, (extra, response.text)
    bad_json = service.http.post(
        "/v1/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 422


def test_admin_needs_the_key(service: Service) -> None:
    assert service.http.get("/admin/residency").status_code == 401
    assert service.admin("/admin/residency", key="wrong").status_code == 401
    body = {"adapter": "alpha", "version": 2}
    assert service.admin("/admin/promote", body, key="wrong").status_code == 401
    assert service.served("alpha")[0] == "alpha@1"  # nothing changed
    residency = service.admin("/admin/residency").json()
    assert residency["capacity"] == 3 and residency["engine"] == "hf"


def test_admin_promote_and_rollback_take_effect_and_are_recorded(service: Service) -> None:
    moved = service.admin("/admin/promote", {"adapter": "alpha", "version": 2, "reason": "test"})
    assert moved.status_code == 200, moved.text
    assert service.served("alpha")[0] == "alpha@2"  # effective before the response returned
    # The response names the revision of the alias map that resolved it: the move's.
    body = {"model": "alpha", "prompt": "Add: 3 + 4 =", "max_tokens": 1, "temperature": 0}
    answer = service.http.post("/v1/completions", json=body)
    assert answer.headers["X-Lorafleet-Revision"] == str(moved.json()["revision"])
    assert (
        service.admin("/admin/rollback", {"adapter": "alpha", "reason": "back"}).status_code == 200
    )
    assert service.served("alpha")[0] == "alpha@1"
    registry = Registry(service.home)
    history = registry.history("alpha", "production")
    assert [(e.actor, e.reason) for e in history[-2:]] == [
        ("api:tester", "test"),
        ("api:tester", "back"),
    ]
    refused = service.admin("/admin/promote", {"adapter": "alpha", "version": 7})
    assert refused.status_code == 404 and "its versions: 1, 2" in refused.text


def test_feedback_is_stored_with_the_response(service: Service) -> None:
    result = service.client.completions.create(
        model="beta", prompt=PROMPTS[1], max_tokens=3, temperature=0
    )
    stored = service.http.post(
        "/v1/feedback", json={"response_id": result.id, "score": -1, "correction": " 7"}
    )
    assert stored.status_code == 200, stored.text
    rows = Registry(service.home).feedback("beta")
    assert rows[-1]["response_id"] == result.id and rows[-1]["version"] == 1
    assert rows[-1]["correction"] == " 7" and rows[-1]["output"] == result.choices[0].text
    assert rows[-1]["prompt"] == PROMPTS[1]
    unknown = service.http.post("/v1/feedback", json={"response_id": "cmpl-nope", "score": 1})
    assert unknown.status_code == 404
    assert (
        service.http.post("/v1/feedback", json={"response_id": "x", "score": 3}).status_code == 422
    )


def test_admin_load_and_unload(service: Service) -> None:
    loaded = service.admin("/admin/load", {"model": "alpha@2"})
    assert loaded.status_code == 200 and loaded.json()["loaded"] == "alpha@2"
    assert "alpha@2" in service.admin("/admin/residency").json()["resident"]
    unloaded = service.admin("/admin/unload", {"model": "alpha@2"})
    assert unloaded.json() == {"unloaded": "alpha@2"}
    assert "alpha@2" not in service.admin("/admin/residency").json()["resident"]
    assert service.served("alpha@2")[0] == "alpha@2"  # loaded again on demand
    assert service.admin("/admin/load", {"model": "nope"}).status_code == 404


# ---- on `lorafleet serve`: another process's writes, real sockets, BentoML's /metrics -----


def test_alias_moved_by_another_process_takes_effect_within_a_second(bento: Service) -> None:
    registry = Registry(bento.home)
    registry.promote("beta", 1)  # no-op, state known
    assert bento.served("beta")[0] == "beta@1"
    registry.promote("alpha", 2, reason="from another process")
    started = time.monotonic()
    while bento.served("alpha")[0] != "alpha@2":
        assert time.monotonic() - started < 1.5, "alias change not applied within 1.5 s"
        time.sleep(0.05)
    registry.rollback("alpha")
    while bento.served("alpha")[0] != "alpha@1":
        assert time.monotonic() - started < 3.0
        time.sleep(0.05)


def test_swaps_under_concurrent_load_fail_no_request(bento: Service) -> None:
    registry = Registry(bento.home)
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=bento.url, timeout=60) as http:
            while not stop.is_set():
                r = http.post(
                    "/v1/completions",
                    json={
                        "model": "alpha",
                        "prompt": PROMPTS[2],
                        "max_tokens": 8,
                        "temperature": 0,
                    },
                )
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.append(r.headers["X-Lorafleet-Adapter-Version"])

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for _ in range(10):
        registry.promote("alpha", 2, reason="load test")
        time.sleep(0.3)
        registry.rollback("alpha", reason="load test")
        time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert set(seen) == {"alpha@1", "alpha@2"} and len(seen) > 20


def test_metrics_are_labelled_by_adapter_and_version(bento: Service) -> None:
    bento.served("alpha")
    text = bento.http.get("/metrics").text
    for name in (
        "lorafleet_requests_total",
        "lorafleet_request_duration_seconds_bucket",
        "lorafleet_time_to_first_token_seconds_bucket",
        "lorafleet_prompt_tokens_total",
        "lorafleet_completion_tokens_total",
        "lorafleet_adapter_cache_events_total",
        "lorafleet_adapters_loaded",
        "lorafleet_adapter_load_seconds_bucket",
    ):
        assert name in text, name
    assert 'lorafleet_requests_total{adapter="alpha",status="ok",version="1"}' in text
    # The engine's threads (every core at start: nothing else keeps one busy for long) and
    # the dtype auto resolved to ($LORAFLEET_DTYPE, fp32 in the tests).
    threads = re.search(r"^lorafleet_engine_threads\{([^}]*)\} (\S+)$", text, re.M)
    assert threads, "no lorafleet_engine_threads"
    assert 'engine="hf"' in threads.group(1) and 'dtype="fp32"' in threads.group(1)
    assert 1 <= float(threads.group(2)) <= len(os.sched_getaffinity(0))


def test_promtool_finds_no_problems_in_our_metrics(bento: Service) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (see .ci/run)"
    bento.served("beta")
    lines = bento.http.get("/metrics").text.splitlines()
    ours = [
        line
        for line in lines
        if line.startswith("lorafleet_")
        or line.startswith(("# HELP lorafleet_", "# TYPE lorafleet_"))
    ]
    assert len(ours) > 20
    out = subprocess.run(
        [promtool, "check", "metrics"],
        input="\n".join(ours) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", (
        out.stdout + out.stderr
    )


def test_client_disconnect_mid_stream_frees_the_request(bento: Service) -> None:
    def cancelled() -> float:
        for line in bento.http.get("/metrics").text.splitlines():
            if line.startswith('lorafleet_requests_total{adapter="alpha",status="cancelled"'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = cancelled()
    body = {"model": "alpha", "prompt": PROMPTS[2], "max_tokens": 64, "stream": True}
    with bento.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first chunk arrived; now hang up
    deadline = time.monotonic() + 10
    while cancelled() <= before:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.1)
    assert bento.served("alpha")[0] == "alpha@1"  # and the server keeps serving
