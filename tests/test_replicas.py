"""Three `lorafleet serve` replicas sharing one registry (Debian's PostgreSQL and moto's S3
server, tests/stores.py) behind Debian's HAProxy running deploy/haproxy/haproxy.cfg, all on
localhost:

- 32 clients through HAProxy while the production alias moves every second: no request
  fails, each response's version is its alias's target at the revision that resolved it,
  and every replica follows each move within a second;
- feedback through HAProxy on responses of every replica is stored, with their versions;
- a failing canary whose requests spread over the replicas (fewer on each than a verdict
  needs) is rolled back once, on the pooled samples;
- SIGKILL of one replica under load: HAProxy routes around it, and only requests that
  were in flight on it fail (counted).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import Registry
from serving.runtime.routing import sticky_uniform

HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
PROMPT = "Review: the pizza was great.\nSentiment:"
CLIENTS = 32


@dataclass
class Fleet:
    registry: Registry
    replicas: list[Any]  # tests/conftest.py's Service, one per replica
    proxy: httpx.Client
    url: str
    env: dict[str, str]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def complete(client: httpx.Client, model: str, session: str | None = None) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    headers = {"X-Session-Id": session} if session else {}
    return client.post("/v1/completions", json=body, headers=headers)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Any]],
    require_binary: Callable[[str], str],
    postgres: Any,
    s3: Any,
) -> Iterator[Fleet]:
    haproxy = require_binary("haproxy")
    env = {
        "LORAFLEET_REGISTRY_URL": postgres.new_database(),
        "LORAFLEET_ARTIFACTS_URL": s3.new_bucket(),
        **s3.env(),
        "LORAFLEET_FAULTS": "gamma@2=error",
    }
    work = tmp_path_factory.mktemp("replicas")
    with pytest.MonkeyPatch.context() as patch, ExitStack() as stack:
        for key, value in env.items():
            patch.setenv(key, value)
        registry = Registry.create(work / "admin", tiny_base)
        stack.callback(registry.close)
        for seed, name in enumerate(["alpha", "beta", "gamma", "delta"]):
            registry.register(name, adapter_factory(tiny_base, rank=4, seed=40 + seed))
            registry.register(name, adapter_factory(tiny_base, rank=4, seed=50 + seed))
            registry.promote(name, 1)
        registry.update_settings(
            "gamma", {"canary_min_requests": 10, "canary_window_s": 0, "canary_weight": 0.5}
        )
        options = ("--max-tokens-limit", "16", "--canary-interval-s", "0.2")
        starting = [serve(work / f"replica{i}", tiny_base, {}, *options, env=env) for i in range(3)]
        with ThreadPoolExecutor(3) as pool:  # start all three at once
            replicas = list(pool.map(stack.enter_context, starting))
        port = free_port()
        proxy_env = {
            **os.environ,
            "LORAFLEET_HAPROXY_BIND": f"127.0.0.1:{port}",
            **{
                f"LORAFLEET_REPLICA_{i + 1}": r.url.removeprefix("http://")
                for i, r in enumerate(replicas)
            },
        }
        proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(HAPROXY_CONFIG)],
            env=proxy_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        stack.callback(lambda: (proc.kill(), proc.wait()))
        url = f"http://127.0.0.1:{port}"
        proxy = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        deadline = time.monotonic() + 30
        while True:
            try:
                if complete(proxy, "beta").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "HAProxy did not start"
            time.sleep(0.2)
        yield Fleet(registry, replicas, proxy, url, env)


def holders(registry: Registry, adapter: str) -> list[tuple[int, int | None]]:
    """(revision, version) of every production move of `adapter`, oldest first."""
    return [
        (e.revision, e.version)
        for e in registry.history(adapter, all_events=True)
        if e.alias == "production" and e.action.startswith("alias.")
    ]


def holder_at(moves: list[tuple[int, int | None]], revision: int) -> int | None:
    held = None
    for at, version in moves:
        if at <= revision:
            held = version
    return held


def verdicts_on(registry: Registry, adapter: str) -> list[Any]:
    return [e for e in registry.history(adapter) if e.action == "canary.verdict"]


def revision_of(replica: Any) -> int:
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    return int(replica.http.post("/v1/completions", json=body).headers["X-Lorafleet-Revision"])


def follow(replicas: list[Any], wanted: int, since: float) -> list[float]:
    """Seconds from `since` until each replica's alias map is at revision `wanted` (its
    /admin/residency says, without queueing behind the engine), watched side by side."""

    def one(replica: Any) -> float:
        while replica.admin("/admin/residency").json()["revision"] < wanted:
            assert time.monotonic() - since < 5, f"{replica.url} did not follow"
            time.sleep(0.01)
        return time.monotonic() - since

    with ThreadPoolExecutor(len(replicas)) as pool:
        return list(pool.map(one, replicas))


def test_promotes_under_load_reach_every_replica_within_a_second(fleet: Fleet) -> None:
    stop = threading.Event()
    results: list[tuple[int, str, int]] = []  # (status, version served, revision)
    failures: list[str] = []
    lags: list[float] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=fleet.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = complete(http, "alpha" if i % 2 else "beta")
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                version = r.headers["X-Lorafleet-Adapter-Version"]
                results.append((r.status_code, version, int(r.headers["X-Lorafleet-Revision"])))

    with ThreadPoolExecutor(CLIENTS) as pool:
        for i in range(CLIENTS):
            pool.submit(client, i)
        try:
            for move in range(8):
                time.sleep(1.0)
                if move % 2 == 0:
                    fleet.registry.promote("alpha", 2, actor="tests", reason="load")
                else:
                    fleet.registry.rollback("alpha", actor="tests", reason="load")
                wanted, moved = fleet.registry.revision(), time.monotonic()
                lags += follow(fleet.replicas, wanted, moved)
        finally:
            stop.set()
    moves = holders(fleet.registry, "alpha")
    alpha = [(v, rev) for _, v, rev in results if v.startswith("alpha@")]
    wrong = [(v, rev) for v, rev in alpha if v != f"alpha@{holder_at(moves, rev)}"]
    print(
        f"\n{len(results)} requests through HAProxy from {CLIENTS} clients, {len(failures)} "
        f"failed; 8 alias moves followed by all 3 replicas in at most {max(lags):.2f} s "
        f"(median {sorted(lags)[len(lags) // 2]:.2f} s)"
    )
    assert failures == []
    assert wrong == []
    assert {v for v, _ in alpha} == {"alpha@1", "alpha@2"}
    assert max(lags) < 1.0


def holding(replica: Any) -> list[str]:
    """What a replica's lorafleet_lora_requests_info says it holds."""
    text = replica.http.get("/metrics").text
    pattern = r'^lorafleet_lora_requests_info\{[^}]*running_lora_adapters="([^"]*)"'
    found = re.search(pattern, text, re.M)
    assert found, "no lorafleet_lora_requests_info"
    return found.group(1).split(",") if found.group(1) else []


def test_haproxy_keeps_an_adapter_on_one_replica_which_exports_it(fleet: Fleet) -> None:
    for _ in range(10):
        assert complete(fleet.proxy, "delta").status_code == 200
    held = [i for i, replica in enumerate(fleet.replicas) if "delta" in holding(replica)]
    print(f"\ndelta, 10 requests through HAProxy: resident on replica {held}")
    assert len(held) == 1
    assert "delta@1" in holding(fleet.replicas[held[0]])
    # each replica counts its own requests (three servers on one host keep their
    # multiprocess metrics apart)
    counted = [delta_requests(replica) for replica in fleet.replicas]
    assert counted == [10.0 if i == held[0] else 0.0 for i in range(3)], counted


def delta_requests(replica: Any) -> float:
    text = replica.http.get("/metrics").text
    found = re.findall(r'^lorafleet_requests_total\{[^}]*adapter="delta"[^}]*\} (\S+)$', text, re.M)
    return sum(float(v) for v in found)


def test_feedback_on_any_replicas_response_is_stored(fleet: Fleet) -> None:
    served = []
    for replica in fleet.replicas:
        r = complete(replica.http, "beta")
        assert r.status_code == 200
        served.append((r.json()["id"], r.headers["X-Lorafleet-Adapter-Version"]))
    for i, (response_id, _) in enumerate(served):
        body = {"response_id": response_id, "score": 1.0}
        through_proxy = fleet.proxy.post("/v1/feedback", json=body)
        assert through_proxy.status_code == 200, through_proxy.text
        # and straight to a replica that did not serve it
        other = fleet.replicas[(i + 1) % 3].http.post("/v1/feedback", json={**body, "score": 0.5})
        assert other.status_code == 200, other.text
    stored = {
        (f["response_id"], f["adapter"], f["version"], f["score"])
        for f in fleet.registry.feedback("beta")
    }
    for response_id, version in served:
        number = int(version.split("@")[1])
        assert {(response_id, "beta", number, 1.0), (response_id, "beta", number, 0.5)} <= stored
    unknown = fleet.proxy.post("/v1/feedback", json={"response_id": "cmpl-nope", "score": 1})
    assert unknown.status_code == 404 and "shared request log" in unknown.text


def test_a_canary_spread_over_replicas_is_decided_once_on_pooled_samples(fleet: Fleet) -> None:
    registry = fleet.registry
    registry.set_alias("gamma", "canary", 2, weight=0.5, actor="tests", reason="try")
    wanted = registry.revision()
    for replica in fleet.replicas:
        while revision_of(replica) < wanted:
            time.sleep(0.05)
    ids = [f"s{i}" for i in range(200)]
    to_canary = [s for s in ids if sticky_uniform(s, "gamma") < 0.5][:12]
    to_production = [s for s in ids if sticky_uniform(s, "gamma") >= 0.5][:12]
    for i in range(12):  # 4 per replica and side: fewer than the 10 a verdict needs
        replica = fleet.replicas[i % 3]
        assert complete(replica.http, "gamma", to_canary[i]).status_code == 200
        assert complete(replica.http, "gamma", to_production[i]).status_code == 200
    deadline = time.monotonic() + 60
    while not verdicts_on(registry, "gamma"):
        if time.monotonic() > deadline:
            live = [r.admin("/admin/canary?adapter=gamma").json() for r in fleet.replicas]
            raise AssertionError(f"no verdict on the pooled samples; the replicas see {live}")
        time.sleep(0.2)
    time.sleep(1.0)  # every replica's check has run again by now
    verdicts = verdicts_on(registry, "gamma")
    print(f"\n{len(verdicts)} verdict by {verdicts[0].actor}: {verdicts[0].reason[:160]}")
    assert len(verdicts) == 1
    assert verdicts[0].reason.startswith("rolled back: ")
    # each replica served 4 of the canary's requests: a verdict on 10 or more is pooled
    pattern = r"error_rate: canary 1\.000 \((\d+)/(\d+)\) vs production 0\.000"
    errors = re.search(pattern, verdicts[0].reason)
    assert errors and int(errors.group(1)) == int(errors.group(2)) >= 10, verdicts[0].reason
    assert {a.alias for a in registry.aliases("gamma")} == {"production"}


def test_sigkill_of_a_replica_fails_only_its_requests_in_flight(fleet: Fleet) -> None:
    victim = fleet.replicas[2]
    stop = threading.Event()
    outcomes: list[tuple[float, bool]] = []  # (time it ended, ok)
    killed_at: list[float] = []

    def client(i: int) -> None:
        models = ["alpha", "beta", "gamma"]
        with httpx.Client(base_url=fleet.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    ok = complete(http, models[i % 3]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                outcomes.append((time.monotonic(), ok))

    with ThreadPoolExecutor(16) as pool:
        for i in range(16):
            pool.submit(client, i)
        time.sleep(2.0)
        killed_at.append(time.monotonic())
        os.killpg(victim.pid, signal.SIGKILL)
        time.sleep(5.0)
        stop.set()
    failed = [at for at, ok in outcomes if not ok]
    late = [at for at in failed if at > killed_at[0] + 3.0]  # after HAProxy's 2 failed checks
    print(
        f"\n{len(outcomes)} requests, {len(failed)} failed when a replica was SIGKILLed "
        f"(at most the 16 in flight), {len(late)} after it was taken out"
    )
    with pytest.raises(httpx.HTTPError):
        victim.http.get("/readyz", timeout=2)  # it is gone
    assert len(failed) <= 16
    assert late == []
    assert sum(1 for at, ok in outcomes if ok and at > killed_at[0] + 3.0) > 0
