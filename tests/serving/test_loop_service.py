"""The serving side of the watch-and-retrain loop on one real server (`lorafleet serve`, hf
engine, tiny base): Alertmanager's webhook queues jobs, canaries are promoted or rolled back
by the server's verdict or by hand (CLI and admin API), the request log, alias metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from registry import Registry
from registry.storage.jobs import list_jobs, queue_job
from serving.runtime.routing import sticky_uniform

Service = Any  # the running server of conftest's `serve` fixture
PROMPT = "Review: the pizza was great.\nSentiment:"


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Service]],
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("loop") / "home"
    registry = Registry.create(home, tiny_base)
    versions = {"alpha": 1, "beta": 2, "delta": 3, "eps": 1, "gamma": 1, "zeta": 2}
    seed = 40
    for name, count in versions.items():
        for _ in range(count):
            seed += 1
            registry.register(name, adapter_factory(tiny_base, rank=4, seed=seed))
        registry.promote(name, 1)
    # alpha: a healthy canary; its version 2 was made by a job (verdict events name it).
    job, _ = queue_job(registry.db, "alpha", actor="tests", reason="retrain alpha")
    registry.register(
        "alpha",
        adapter_factory(tiny_base, rank=4, seed=99),
        metadata={"job_id": job.id, "trigger": "manual", "parent_version": 1},
    )
    registry.update_settings(
        "alpha",
        # Five requests a side can show a canary within these tolerances (a pass needs
        # evidence: 0 errors in 5 is evidence of a rate below 0.9, not below 0.02); the
        # criteria's own tolerances are tested in test_canary_criteria.py.
        # The window is shortened by the test once its traffic and feedback are in.
        {
            "canary_min_requests": 5,
            "canary_min_ratings": 5,
            "canary_window_s": 600,
            "canary_max_latency_ratio": 20,
            "canary_max_error_rate_increase": 0.9,
        },
    )
    registry.update_settings("beta", {"canary_min_requests": 5, "canary_window_s": 1})
    registry.update_settings(
        "zeta",
        {
            "canary_min_requests": 5,
            "canary_min_ratings": 5,
            "canary_window_s": 600,
            "canary_max_latency_ratio": 20,
        },
    )
    registry.update_settings("delta", {"canary_min_requests": 1000})  # decided by hand only
    registry.update_settings("gamma", {"request_log": False})
    registry.close()
    with serve(
        home,
        tiny_base,
        {},
        "--max-adapters",
        "12",
        "--max-len",
        "256",
        "--max-tokens-limit",
        "16",
        "--canary-interval-s",
        "0.2",
    ) as running:
        yield running


def _payload(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    """An Alertmanager webhook notification (version 4) as Alertmanager 0.25 sends it."""
    return {
        "receiver": "lorafleet-retrain",
        "status": status,
        "alerts": list(alerts),
        "groupLabels": {"alertname": "LorafleetDrift"},
        "commonLabels": {"alertname": "LorafleetDrift", "severity": "warning"},
        "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093",
        "version": "4",
        "groupKey": '{}/{alertname="LorafleetDrift"}:{alertname="LorafleetDrift"}',
        "truncatedAlerts": 0,
    }


def _alert(fingerprint: str, adapter: str, status: str = "firing") -> dict[str, Any]:
    return {
        "status": status,
        "labels": {
            "alertname": "LorafleetDrift",
            "adapter": adapter,
            "version": "1",
            "signal": "prompt_tokens",
            "severity": "warning",
            "action": "retrain",
        },
        "annotations": {"summary": f"{adapter}@1 drifted on prompt_tokens"},
        "startsAt": "2026-11-20T10:00:00.123Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://127.0.0.1:9090/graph?g0.expr=lorafleet_drift_score",
        "fingerprint": fingerprint,
    }


def _outcomes(response: Any) -> list[tuple[str, str | None]]:
    assert response.status_code == 200, response.text
    return [(a["outcome"], a["adapter"]) for a in response.json()["alerts"]]


def test_alert_webhook_queues_dedupes_and_cools_down(service: Service) -> None:
    first = _payload(_alert("a1b2c3d4e5f60718", "gamma"))
    assert service.http.post("/admin/alerts", json=first).status_code == 401
    assert service.admin("/admin/alerts", first, key="wrong").status_code == 401
    assert Registry(service.home).db.query("SELECT COUNT(*) FROM alerts")[0][0] == 0

    queued = service.admin("/admin/alerts", first)
    assert _outcomes(queued) == [("queued", "gamma")]
    job_id = queued.json()["alerts"][0]["job"]
    jobs = list_jobs(Registry(service.home).db, "gamma")
    assert [(j.id, j.state, j.trigger) for j in jobs] == [
        (job_id, "queued", "alert:a1b2c3d4e5f60718")
    ]
    assert jobs[0].details["alert"]["labels"]["signal"] == "prompt_tokens"
    assert jobs[0].actor == "alertmanager:lorafleet-retrain"

    again = service.admin("/admin/alerts", first)  # Alertmanager's repeat / another replica
    assert _outcomes(again) == [("duplicate", "gamma")]
    later = _payload(
        _alert("0f1e2d3c4b5a6978", "gamma"),
        _alert("9999aaaabbbbcccc", "nosuch"),
        _alert("a1b2c3d4e5f60718", "gamma", status="resolved"),
    )
    assert _outcomes(service.admin("/admin/alerts", later)) == [
        ("cooldown", "gamma"),
        ("ignored", "nosuch"),
        ("ignored", "gamma"),
    ]
    registry = Registry(service.home)
    assert [j.id for j in list_jobs(registry.db, "gamma")] == [job_id]
    received = [
        (e.action, e.job) for e in registry.history("gamma") if e.action.startswith("alert.")
    ]
    assert received == [("alert.received", job_id), ("alert.received", None)]
    # resolved alerts are acknowledged without a record; the unknown adapter is recorded
    rows = registry.db.query("SELECT fingerprint, outcome FROM alerts ORDER BY rowid")
    assert [tuple(r) for r in rows] == [
        ("a1b2c3d4e5f60718", "queued"),
        ("0f1e2d3c4b5a6978", "cooldown"),
        ("9999aaaabbbbcccc", "ignored"),
    ]


def test_alert_webhook_refuses_other_versions_and_bad_payloads(service: Service) -> None:
    body = {**_payload(_alert("1234", "gamma")), "version": "5"}
    refused = service.admin("/admin/alerts", body)
    assert refused.status_code == 400
    assert "version '5' is not supported" in refused.json()["error"]["message"]
    missing = _payload(_alert("1234", "gamma"))
    del missing["alerts"][0]["fingerprint"]
    assert service.admin("/admin/alerts", missing).status_code == 422
    extra = {**_payload(), "someFutureField": {"x": 1}}  # unknown fields are ignored
    assert service.admin("/admin/alerts", extra).json() == {"received": 0, "alerts": []}


def _sessions(adapter: str, weight: float) -> tuple[list[str], list[str]]:
    """Session ids the router sends to the canary, and to production, at `weight`."""
    ids = [f"s{i}" for i in range(200)]
    canary = [s for s in ids if sticky_uniform(s, adapter) < weight]
    return canary, [s for s in ids if s not in canary]


def _complete(service: Service, model: str, session: str) -> tuple[str, str]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    response = service.http.post("/v1/completions", json=body, headers={"X-Session-Id": session})
    assert response.status_code == 200, response.text
    return response.headers["X-Lorafleet-Adapter-Version"], response.json()["id"]


def _verdicts(registry: Registry, adapter: str) -> list[Any]:
    return [e for e in registry.history(adapter) if e.action == "canary.verdict"]


def _wait_for_verdict(registry: Registry, adapter: str, timeout_s: float = 15) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := _verdicts(registry, adapter)):
        assert time.monotonic() < deadline, f"no canary verdict on {adapter}"
        time.sleep(0.1)
    return found[-1]


def _canary_traffic(
    service: Service, registry: Registry, adapter: str, scores: tuple[float, float]
) -> list[str]:
    """Set `adapter`'s canary (version 2, weight 0.5), send 5 requests it serves and 5 or
    more that production (version 1) serves, rate five of each side with `scores`
    (canary, production); return the ids production served."""
    to_canary, to_production = _sessions(adapter, 0.5)
    registry.set_alias(adapter, "canary", 2, weight=0.5, actor="tests", reason="retrained")
    served: list[tuple[str, str]] = []
    while sum(v == f"{adapter}@2" for v, _ in served) < 5:  # the first may precede the swap
        served.append(_complete(service, adapter, to_canary[len(served)]))
    served += [_complete(service, adapter, s) for s in to_production[:5]]
    for score, version in zip(scores, (2, 1), strict=True):
        for response_id in [i for v, i in served if v == f"{adapter}@{version}"][:5]:
            body = {"response_id": response_id, "score": score}
            assert service.http.post("/v1/feedback", json=body).status_code == 200
    return [i for v, i in served if v == f"{adapter}@1"]


def test_healthy_canary_is_promoted_automatically(service: Service) -> None:
    registry = Registry(service.home)
    job = list_jobs(registry.db, "alpha")[0]  # the job that registered version 2
    to_production = _canary_traffic(service, registry, "alpha", scores=(1, 1))
    n_canary, n_production = 5, len(to_production)
    live = service.admin("/admin/canary?adapter=alpha").json()["canaries"][0]
    assert (live["canary"]["requests"], live["production"]["requests"]) == (5, n_production)
    assert (live["canary"]["ratings"], live["canary"]["mean_feedback"]) == (5, 1.0)
    assert live["ready"] is False and live["waiting"].endswith("/600 s")
    assert [(c["name"], c["state"]) for c in live["criteria"][:3]] == [
        ("latency", "pass"),
        ("error_rate", "pass"),
        ("feedback", "pass"),
    ]
    # the first look spends alpha / 2, split over the three criteria tested
    assert live["alpha"] == 0.025 and live["criteria"][0]["alpha"] == pytest.approx(0.025 / 3)
    assert _verdicts(registry, "alpha") == []

    registry.update_settings("alpha", {"canary_window_s": 1}, actor="tests")
    verdict = _wait_for_verdict(registry, "alpha")
    assert (verdict.version, verdict.job, verdict.alias) == (2, job.id, "canary")
    assert verdict.actor.startswith("canary-check@")
    reason = verdict.reason
    assert reason.startswith("promoted: latency: median s/token canary "), reason
    assert f"(n 5 vs {n_production}): ratio " in reason and "<= 20; Mann-Whitney U " in reason
    within = 0.1**5  # 0 errors in 5 under a rate of 0.9
    assert (
        f"; error_rate: canary 0.000 (0/{n_canary}) vs production 0.000 (0/{n_production}): "
        f"increase 0.000 <= 0.9; Fisher's exact, odds ratio n/a, p 1, within p {within:.3g} "
        "(alpha 0.00833): pass; feedback: mean score canary 1.000 vs production 1.000 (n 5 "
        "vs 5): drop 0.000 <= 0.2; Mann-Whitney U 12.5, p 1, within p 0.00199 (alpha "
        "0.00833): pass; drift.prompt_length: canary not scored "
        f"({n_canary} requests; too few or no baseline): skipped" in reason
    ), reason
    assert {a.alias: a.version for a in registry.aliases("alpha")} == {"production": 2}
    moves = [(e.action, e.alias, e.previous, e.version) for e in registry.history("alpha")]
    assert moves[-3:] == [
        ("canary.verdict", "canary", None, 2),
        ("alias.set", "production", 1, 2),
        ("alias.remove", "canary", 2, None),
    ]
    deadline = time.monotonic() + 3
    while _complete(service, "alpha", to_production[0])[0] != "alpha@2":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    metrics = service.http.get("/metrics").text
    assert 'lorafleet_canary_verdicts_total{adapter="alpha",verdict="promoted"} 1.0' in metrics
    assert 'lorafleet_alias_info{adapter="alpha",alias="production",version="2"} 1.0' in metrics
    assert 'adapter="alpha",alias="canary"' not in metrics


def test_canary_with_worse_feedback_is_rolled_back_automatically(service: Service) -> None:
    registry = Registry(service.home)
    _canary_traffic(service, registry, "zeta", scores=(-1, 1))
    assert _verdicts(registry, "zeta") == []  # its window is 600 s
    registry.update_settings("zeta", {"canary_window_s": 0}, actor="tests")
    verdict = _wait_for_verdict(registry, "zeta")
    assert verdict.reason.startswith("rolled back: latency: "), verdict.reason
    assert (
        "feedback: mean score canary -1.000 vs production 1.000 (n 5 vs 5): drop 2.000 > 0.2; "
        "Mann-Whitney U 0.0000, p 0.00199, within p 0.999 (alpha 0.00833): fail" in verdict.reason
    ), verdict.reason
    assert {a.alias: a.version for a in registry.aliases("zeta")} == {"production": 1}
    assert _complete(service, "zeta", "any")[0] == "zeta@1"


def test_tampered_canary_is_rolled_back_and_production_keeps_serving(service: Service) -> None:
    registry = Registry(service.home)
    record = registry.get_version("beta", 2)
    weights = registry.artifact_path(record) / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    registry.set_alias("beta", "canary", 2, weight=0.5, actor="tests", reason="retrained")
    to_canary, _ = _sessions("beta", 0.5)
    verdict = _wait_for_verdict(registry, "beta", timeout_s=5)
    assert verdict.version == 2 and verdict.job is None
    assert verdict.reason.startswith(
        f"rolled back: canary beta@2 cannot be loaded: artifact {record.digest[:12]} at "
    ), verdict.reason
    assert "was changed after registration" in verdict.reason
    assert {a.alias: a.version for a in registry.aliases("beta")} == {"production": 1}
    assert [e.action for e in registry.history("beta")][-2:] == ["canary.verdict", "alias.remove"]
    # sessions that the canary's weight would have sent to it are all served by production
    assert {_complete(service, "beta", s)[0] for s in to_canary[:6]} == {"beta@1"}
    metrics = service.http.get("/metrics").text
    assert 'lorafleet_canary_verdicts_total{adapter="beta",verdict="rolled_back"} 1.0' in metrics


def test_manual_verdicts_by_cli_and_admin(service: Service, cli: Callable[..., Any]) -> None:
    registry = Registry(service.home)
    refused = cli("canary", "promote", "delta", home=service.home)
    assert refused.returncode == 2
    assert "adapter 'delta' has no canary alias" in refused.stderr

    registry.set_alias("delta", "canary", 2, weight=0.2, actor="tests", reason="try 2")
    deadline = time.monotonic() + 5
    while not service.admin("/admin/canary?adapter=delta").json()["canaries"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    live = service.admin("/admin/canary?adapter=delta").json()["canaries"][0]
    assert (live["canary_version"], live["production_version"], live["ready"]) == (2, 1, False)
    assert live["canary"]["requests"] == 0 and live["waiting"].startswith("0/1000 requests")
    status = cli("canary", "status", "delta", "--url", service.url, "--api-key", "test-admin-key")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("delta: canary 2 vs production 1 since ")
    assert "waiting for 0/1000 requests" in status.stdout
    assert cli("canary", "status", "delta", "--url", service.url).returncode == 2

    promoted = cli(
        "canary",
        "promote",
        "delta",
        "--reason",
        "looks good",
        "--actor",
        "ana",
        "--json",
        home=service.home,
    )
    assert promoted.returncode == 0, promoted.stderr
    record = json.loads(promoted.stdout)
    assert (record["verdict"], record["production_before"], record["production_after"]) == (
        "promoted",
        1,
        2,
    )
    assert {a.alias: a.version for a in registry.aliases("delta")} == {"production": 2}
    event = _verdicts(registry, "delta")[-1]
    assert (event.actor, event.reason) == ("ana", "promoted: manual: looks good")

    registry.set_alias("delta", "canary", 3, weight=0.2, actor="tests", reason="try 3")
    rolled = service.admin("/admin/canary/rollback", {"adapter": "delta", "reason": "no"})
    assert rolled.status_code == 200, rolled.text
    body = rolled.json()
    assert (body["version"], body["verdict"], body["production_after"]) == (3, "rolled_back", 2)
    assert body["live"]["canary_version"] == 3
    assert {a.alias: a.version for a in registry.aliases("delta")} == {"production": 2}
    event = _verdicts(registry, "delta")[-1]
    assert event.actor == "api:tester"
    assert event.reason.startswith("rolled back: manual: no; live: latency: no production latency")
    assert service.admin("/admin/canary/promote", {"adapter": "delta"}).status_code == 404
    assert service.http.post("/admin/canary/promote", json={"adapter": "delta"}).status_code == 401
    assert _complete(service, "delta", "any")[0] == "delta@2"


def test_request_log_keeps_adapter_requests_with_the_response_id(service: Service) -> None:
    registry = Registry(service.home)
    service.client.completions.create(model="gamma", prompt=PROMPT, max_tokens=3)
    service.client.completions.create(model="base", prompt=PROMPT, max_tokens=3)
    messages = [{"role": "user", "content": "Add: 2 + 2 ="}]
    text = service.client.completions.create(
        model="eps", prompt=PROMPT, max_tokens=5, temperature=0
    )
    chat = service.client.chat.completions.create(
        model="eps:production",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
    )
    deadline = time.monotonic() + 5
    while len(rows := registry.request_log.read("eps")) < 2:
        assert time.monotonic() < deadline, "request log rows did not appear"
        time.sleep(0.1)
    assert [(r.response_id, r.adapter, r.version, r.model) for r in rows] == [
        (text.id, "eps", 1, "eps"),
        (chat.id, "eps", 1, "eps:production"),
    ]
    assert text.id.startswith("cmpl-") and chat.id.startswith("chatcmpl-")
    first, second = rows
    assert first.prompt == PROMPT and first.output == text.choices[0].text
    assert text.usage is not None and chat.usage is not None
    assert (first.prompt_tokens, first.completion_tokens, first.finish_reason) == (
        text.usage.prompt_tokens,
        text.usage.completion_tokens,
        text.choices[0].finish_reason,
    )
    assert second.output == chat.choices[0].message.content
    tokenizer = AutoTokenizer.from_pretrained(str(service.base))
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert second.prompt == rendered
    assert second.completion_tokens == chat.usage.completion_tokens
    assert registry.request_log.read("gamma") == []  # its request_log setting is false
    assert "base" not in registry.request_log.counts()


def test_alias_info_lists_every_routed_alias(service: Service) -> None:
    lines = [
        line
        for line in service.http.get("/metrics").text.splitlines()
        if line.startswith("lorafleet_alias_info{") and 'adapter="eps"' in line
    ]
    assert lines == ['lorafleet_alias_info{adapter="eps",alias="production",version="1"} 1.0']
