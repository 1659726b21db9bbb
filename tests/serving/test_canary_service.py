"""Canary verdicts on a real `lorafleet serve`: versions made really worse by injected faults
(LORAFLEET_FAULTS: a delay before each token, or an error) are rolled back 5 times out of
5; a canary with too few requests waits; an inconclusive one is held (or rolled back) at
its max window; the shadow comparison runs production's prompts on the canary off the
request path and promotes a canary that answers alike, rolls back one that does not; and a
good canary on the demo's settings is promoted with a CPU hog spinning on one core (once
here, 5 times in `make chaos`)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from registry import Registry
from serving.runtime.routing import sticky_uniform

Service = Any
PROMPT = "Review: the pizza was great.\nSentiment:"
RUNS = 5
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
# examples/demo.py's canary settings: short windows, a tolerance of errors a short canary
# can show it is within
DEMO_SETTINGS = {
    "canary_weight": 0.5,
    "canary_min_requests": 10,
    "canary_window_s": 2,
    "canary_max_window_s": 300,
    "canary_max_error_rate_increase": 0.2,
}
HOG = (
    "import os, time\n"
    "os.sched_setaffinity(0, {0})\n"
    "end = time.monotonic() + 600\n"
    "print('spinning', flush=True)\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Service]],
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("canary") / "home"
    registry = Registry.create(home, tiny_base)
    quick = {"canary_min_requests": 10, "canary_window_s": 0, "canary_weight": 0.5}
    names = ["slow", "failing", "sparse", "held", "dropped", "twin", "other", "good"]
    for seed, name in enumerate(names):
        registry.register(name, adapter_factory(tiny_base, rank=4, seed=70 + seed))
        if name == "twin":  # the same weights again: a canary that answers as production does
            copy = shutil.copytree(
                adapter_factory(tiny_base, rank=4, seed=70 + seed), home.parent / "twin"
            )
            (copy / "NOTES.txt").write_text("retrained: the same weights\n")
            registry.register(name, copy)
        else:
            registry.register(name, adapter_factory(tiny_base, rank=4, seed=90 + seed))
        registry.promote(name, 1)
        registry.update_settings(name, quick)
    # An alpha no p-value reaches: every criterion beyond its tolerance stays inconclusive.
    undecided = {"canary_alpha": 1e-12, "canary_max_window_s": 3}
    registry.update_settings("held", undecided)
    registry.update_settings("dropped", {**undecided, "canary_inconclusive": "rollback"})
    # Ten canary requests can show latency and errors within these tolerances, so the
    # shadow criterion decides these two.
    shadowed = {
        "shadow_share": 1.0,
        "shadow_min_pairs": 8,
        "canary_weight": 0.2,
        "canary_max_latency_ratio": 20,
        "canary_max_error_rate_increase": 0.9,
    }
    registry.update_settings("good", DEMO_SETTINGS)
    registry.update_settings("twin", shadowed)
    registry.update_settings("other", shadowed)
    registry.close()
    faults = "slow@2=delay:0.05,failing@2=error,sparse@2=error,held@2=error,dropped@2=error"
    with serve(
        home,
        tiny_base,
        {},
        "--max-adapters",
        "16",
        "--max-tokens-limit",
        "16",
        "--canary-interval-s",
        "0.2",
        env={"LORAFLEET_FAULTS": faults},
    ) as running:
        yield running


def sessions(adapter: str, weight: float) -> tuple[list[str], list[str]]:
    """Session ids the router sends to the canary, and to production, at `weight`."""
    ids = [f"s{i}" for i in range(400)]
    canary = [s for s in ids if sticky_uniform(s, adapter) < weight]
    return canary, [s for s in ids if s not in canary]


def complete(service: Service, model: str, session: str) -> tuple[str, str]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    r = service.http.post("/v1/completions", json=body, headers={"X-Session-Id": session})
    assert r.status_code == 200, r.text
    return r.headers["X-Lorafleet-Adapter-Version"], r.json()["choices"][0]["finish_reason"]


def state_of(reason: str, criterion: str) -> str:
    """The state a verdict's reason gives `criterion` (each criterion's text ends in it)."""
    found = re.search(
        rf"(?:^|; |: ){re.escape(criterion)}: .*?: (pass|fail|inconclusive|skipped)(?:;|$)", reason
    )
    assert found, f"{criterion} not in {reason}"
    return found.group(1)


def events(registry: Registry, adapter: str, action: str) -> list[Any]:
    return [e for e in registry.history(adapter) if e.action == action]


def set_canary(service: Service, registry: Registry, adapter: str, weight: float) -> None:
    """Set `adapter`'s canary at version 2 and wait until the server routes by it: the server
    applies the registry at its next poll (0.25 s), and a few requests of a tiny model take
    less than that. A request to the base says which revision resolved it, and touches no
    adapter's statistics."""
    registry.set_alias(adapter, "canary", 2, weight=weight, actor="tests", reason="try")
    wanted = registry.revision()
    deadline = time.monotonic() + 15
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    while True:
        r = service.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        seen = int(r.headers["X-Lorafleet-Revision"])
        if seen >= wanted:
            return
        assert time.monotonic() < deadline, f"the server is at revision {seen}, not {wanted}"
        time.sleep(0.05)


def run_canary(service: Service, registry: Registry, adapter: str, timeout_s: float = 60) -> Any:
    """Set `adapter`'s canary at version 2 and send traffic, half to each side, until a
    verdict; the verdict event."""
    before = len(events(registry, adapter, "canary.verdict"))
    set_canary(service, registry, adapter, 0.5)
    to_canary, to_production = sessions(adapter, 0.5)
    deadline = time.monotonic() + timeout_s
    i = 0
    while len(found := events(registry, adapter, "canary.verdict")) == before:
        if time.monotonic() > deadline:
            live = service.admin(f"/admin/canary?adapter={adapter}").json()
            raise AssertionError(f"no verdict on {adapter} after {i} rounds: {live}")
        complete(service, adapter, to_canary[i % len(to_canary)])
        complete(service, adapter, to_production[i % len(to_production)])
        i += 1
    return found[-1]


@pytest.mark.parametrize(("adapter", "criterion"), [("slow", "latency"), ("failing", "error_rate")])
def test_really_worse_canaries_are_rolled_back_every_time(
    service: Service, adapter: str, criterion: str
) -> None:
    registry = Registry(service.home)
    reasons = [run_canary(service, registry, adapter).reason for _ in range(RUNS)]
    print(f"\n{adapter}: {RUNS}/{RUNS} rolled back; last: {reasons[-1]}")
    for reason in reasons:
        assert reason.startswith("rolled back: "), reason
        assert state_of(reason, criterion) == "fail", reason
    assert {a.alias: a.version for a in registry.aliases(adapter)} == {"production": 1}
    if adapter == "failing":
        assert complete(service, adapter, "s1") == ("failing@1", "length")


def test_too_few_requests_wait_and_never_guess(service: Service) -> None:
    registry = Registry(service.home)
    set_canary(service, registry, "sparse", 0.5)
    to_canary, _ = sessions("sparse", 0.5)
    served = [complete(service, "sparse", s) for s in to_canary[:4]]
    assert served == [("sparse@2", "error")] * 4  # failing, but 4 requests of the 10 it needs
    time.sleep(1.0)  # five checks
    live = service.admin("/admin/canary?adapter=sparse").json()["canaries"][0]
    assert live["ready"] is False
    assert live["waiting"].startswith("4/10 requests"), live["waiting"]
    errors = next(c for c in live["criteria"] if c["name"] == "error_rate")
    assert errors["state"] == "inconclusive" and errors["text"].endswith(
        "inconclusive (needs 10 requests per side)"
    )
    assert events(registry, "sparse", "canary.verdict") == []
    assert "canary" in {a.alias for a in registry.aliases("sparse")}


@pytest.mark.parametrize("adapter", ["held", "dropped"])
def test_inconclusive_at_the_max_window_holds_or_rolls_back(service: Service, adapter: str) -> None:
    registry = Registry(service.home)
    set_canary(service, registry, adapter, 0.5)
    to_canary, to_production = sessions(adapter, 0.5)
    for i in range(12):
        complete(service, adapter, to_canary[i])
        complete(service, adapter, to_production[i])
    live = service.admin(f"/admin/canary?adapter={adapter}").json()["canaries"]
    if live and live[0]["ready"]:
        assert live[0]["verdict"] == "inconclusive"  # all errors, yet no p-value < 1e-12 / 2
    deadline = time.monotonic() + 15
    action = "canary.held" if adapter == "held" else "canary.verdict"
    while not events(registry, adapter, action):
        assert time.monotonic() < deadline, f"no {action} on {adapter}"
        time.sleep(0.1)
    event = events(registry, adapter, action)[-1]
    aliases = {a.alias: a.version for a in registry.aliases(adapter)}
    if adapter == "held":
        assert event.reason.startswith("held: inconclusive after ")
        assert aliases == {"production": 1, "canary": 2}  # it keeps its traffic
        time.sleep(0.6)
        assert len(events(registry, adapter, "canary.held")) == 1  # recorded once
        live = service.admin(f"/admin/canary?adapter={adapter}").json()["canaries"][0]
        assert live["waiting"].endswith("held for a manual verdict"), live["waiting"]
        assert service.admin("/admin/canary/rollback", {"adapter": adapter}).status_code == 200
    else:
        assert event.reason.startswith("rolled back: inconclusive after ")
        assert aliases == {"production": 1}
    assert "error_rate: canary 1.000 (" in event.reason, event.reason


@pytest.mark.parametrize(("adapter", "verdict"), [("twin", "promoted"), ("other", "rolled_back")])
def test_shadow_comparison_runs_production_prompts_on_the_canary(
    service: Service, adapter: str, verdict: str
) -> None:
    registry = Registry(service.home)
    set_canary(service, registry, adapter, 0.2)
    to_canary, to_production = sessions(adapter, 0.2)
    deadline = time.monotonic() + 5
    while "canary" not in service.admin(f"/admin/canary?adapter={adapter}").text:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # the canary watch makes the canary resident
    prompts = [f"Review: the {w} was great.\nSentiment:" for w in ("pizza", "room", "film")]
    for i in range(10):
        body = {"model": adapter, "prompt": prompts[i % 3], "max_tokens": 8, "temperature": 0}
        r = service.http.post(
            "/v1/completions", json=body, headers={"X-Session-Id": to_production[i]}
        )
        assert r.headers["X-Lorafleet-Adapter-Version"] == f"{adapter}@1"
        time.sleep(0.15)  # one shadow run at a time: let each finish
    live = service.admin(f"/admin/canary?adapter={adapter}").json()["canaries"][0]
    assert live["canary"]["requests"] == 0  # shadow runs are not the canary's traffic
    shadow = next(c for c in live["criteria"] if c["name"] == "shadow")
    assert shadow["n"][0] >= 8, shadow
    metrics = service.http.get("/metrics").text
    assert f'lorafleet_shadow_requests_total{{adapter="{adapter}",outcome="compared"}}' in metrics
    for s in to_canary[:10]:  # the canary's own requests, for its verdict
        complete(service, adapter, s)
    found = run_verdict(registry, adapter)
    assert found.reason.startswith(verdict.replace("_", " ") + ": "), found.reason
    assert state_of(found.reason, "shadow") == ("pass" if verdict == "promoted" else "fail")


def run_verdict(registry: Registry, adapter: str, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := events(registry, adapter, "canary.verdict")):
        assert time.monotonic() < deadline, f"no verdict on {adapter}"
        time.sleep(0.1)
    return found[-1]


def demo_prompts() -> list[str]:
    return [
        json.loads(line)["prompt"]
        for task in ("topic", "sentiment")
        for line in (EXAMPLES / task / "eval.jsonl").read_text().splitlines()
    ]


def promote_under_a_cpu_hog(service: Service, registry: Registry, seed: int) -> tuple[Any, int]:
    """The demo's canary loop (rounds of 8 requests from 4 clients at once, greedy, up to 16
    tokens) with a process spinning on core 0 all along: the verdict (or the hold) and the
    requests sent."""
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "spinning"
        before = len(events(registry, "good", "canary.verdict"))
        # Both sides' samples under the hog: none from before it spun, none that the old
        # alias map sent to production alone (the verdict counts from the alias move).
        set_canary(service, registry, "good", 0.5)
        rng, prompts, sent = random.Random(seed), demo_prompts(), 0

        def one(prompt: str) -> None:
            body = {"model": "good", "prompt": prompt, "max_tokens": 16, "temperature": 0}
            assert service.http.post("/v1/completions", json=body).status_code == 200

        deadline = time.monotonic() + 330  # past the max window: a hold ends it too
        with ThreadPoolExecutor(4) as pool:
            while len(found := events(registry, "good", "canary.verdict")) == before:
                held = events(registry, "good", "canary.held")
                assert not held, f"held after {sent} requests: {held[-1].reason}"
                assert time.monotonic() < deadline, f"no verdict after {sent} requests"
                list(pool.map(one, rng.sample(prompts, 8)))
                sent += 8
        return found[-1], sent
    finally:
        hog.kill()
        hog.wait()
        if "production" in {a.alias for a in registry.aliases("good")}:
            registry.set_alias("good", "production", 1, actor="tests", reason="next run")


def check_promoted(verdict: Any, sent: int, run: int) -> None:
    print(f"\nrun {run}: {sent} requests under a CPU hog; {verdict.reason[:400]}")
    assert verdict.reason.startswith("promoted: "), verdict.reason
    assert state_of(verdict.reason, "latency") == "pass"


def test_a_good_canary_is_promoted_under_a_cpu_hog(service: Service) -> None:
    registry = Registry(service.home)
    check_promoted(*promote_under_a_cpu_hog(service, registry, seed=0), run=1)


@pytest.mark.chaos
def test_a_good_canary_is_promoted_under_a_cpu_hog_five_times(service: Service) -> None:
    registry = Registry(service.home)
    for run in range(1, 6):
        check_promoted(*promote_under_a_cpu_hog(service, registry, seed=run), run=run)
