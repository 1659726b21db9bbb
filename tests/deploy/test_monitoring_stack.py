"""The monitoring harness end to end: real Prometheus scrapes a fake lorafleet /metrics,
deploy/'s rules fire, real Alertmanager posts the drift alert to a webhook receiver.

The metrics source is a prometheus_client HTTP server in a thread, the webhook a
http.server in a thread, both on free loopback ports; nothing of the lorafleet server runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

ADMIN_KEY = "monitoring-test-key"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    elapsed_s: float
    """Seconds from the start of the stack to the arrival of this POST."""


class Webhook:
    """An HTTP server on a free loopback port that records every POST."""

    def __init__(self, started: float) -> None:
        self.posts: list[Post] = []
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                elapsed = time.monotonic() - started
                webhook.posts.append(Post(self.path, dict(self.headers), body, elapsed))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/admin/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alert_names(self) -> set[str]:
        return {a["labels"]["alertname"] for p in self.posts for a in p.body["alerts"]}


def fake_metrics(stop: threading.Event) -> tuple[str, Callable[[], None]]:
    """A /metrics with lorafleet's drift and request series: host:port and a shutdown."""
    registry = CollectorRegistry()
    score = Gauge("lorafleet_drift_score", "", ["adapter", "version", "signal"], registry=registry)
    threshold = Gauge("lorafleet_drift_threshold", "", ["signal"], registry=registry)
    samples = Gauge("lorafleet_drift_window_samples", "", ["adapter", "version"], registry=registry)
    requests = Counter(
        "lorafleet_requests", "", ["adapter", "version", "status"], registry=registry
    )
    threshold.labels("prompt_length").set(0.2)
    threshold.labels("feedback").set(0.3)
    score.labels("support", "3", "prompt_length").set(0.45)  # drifted
    score.labels("faq", "1", "prompt_length").set(0.1)  # below its threshold
    samples.labels("support", "3").set(500)
    samples.labels("faq", "1").set(500)
    samples.labels("fresh", "1").set(3)  # below the minimum: the server exports no score

    def traffic() -> None:  # faq@1 fails a third of its requests at ~75 requests/s
        while not stop.wait(0.2):
            requests.labels("faq", "1", "ok").inc(10)
            requests.labels("faq", "1", "error").inc(5)

    threading.Thread(target=traffic, daemon=True).start()
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    return f"127.0.0.1:{server.server_port}", server.shutdown


@dataclass(frozen=True)
class Loop:
    stack: Any  # tests/monitoring.py's MonitoringStack
    webhook: Webhook
    started: float


@pytest.fixture(scope="module")
def loop(monitoring_stack: Callable[..., AbstractContextManager[Any]]) -> Iterator[Loop]:
    stop = threading.Event()
    target, shutdown = fake_metrics(stop)
    started = time.monotonic()
    webhook = Webhook(started)
    try:
        with monitoring_stack(target=target, webhook_url=webhook.url, admin_key=ADMIN_KEY) as s:
            yield Loop(s, webhook, started)
    finally:
        stop.set()
        shutdown()
        webhook.server.shutdown()


def test_drift_alert_reaches_the_webhook_with_labels_and_bearer_key(loop: Loop) -> None:
    posts = loop.stack.wait_for(
        lambda: [
            p
            for p in loop.webhook.posts
            if any(a["labels"]["alertname"] == "LorafleetDrift" for a in p.body["alerts"])
        ],
        timeout_s=30,
        what="LorafleetDrift at the webhook",
    )
    post = posts[0]
    print(f"\nLorafleetDrift reached the webhook {post.elapsed_s:.1f} s after the stack started")
    assert post.elapsed_s < 30
    assert post.path == "/admin/alerts"
    assert post.headers["Authorization"] == f"Bearer {ADMIN_KEY}"
    assert post.body["version"] == "4"
    assert post.body["status"] == "firing"
    assert post.body["receiver"] == "lorafleet-retrain"
    assert post.body["groupLabels"] == {
        "alertname": "LorafleetDrift",
        "adapter": "support",
        "version": "3",
    }
    (alert,) = post.body["alerts"]
    assert alert["status"] == "firing"
    assert alert["fingerprint"]
    labels = alert["labels"]
    assert (labels["adapter"], labels["version"], labels["signal"]) == (
        "support",
        "3",
        "prompt_length",
    )
    assert (labels["severity"], labels["action"]) == ("warning", "retrain")
    assert alert["annotations"]["summary"] == "support@3 drifted on prompt_length"


def test_real_alertmanager_payloads_fit_the_servers_webhook_schema(loop: Loop) -> None:
    from serving.watch.alert_intake import AlertmanagerPayload

    loop.stack.wait_for(lambda: loop.webhook.posts, 30, "a POST at the webhook")
    for post in loop.webhook.posts:
        payload = AlertmanagerPayload.model_validate(post.body)
        assert payload.version == "4"
        assert payload.group_key and payload.external_url.startswith("http")
        assert all(a.fingerprint and a.starts_at for a in payload.alerts)


def test_only_the_drifted_version_fires(loop: Loop) -> None:
    loop.stack.wait_for(
        lambda: loop.stack.firing_alerts("LorafleetDrift"), 30, "LorafleetDrift firing"
    )
    scores = {(m["adapter"], m["signal"]): v for m, v in loop.stack.values("lorafleet_drift_score")}
    assert scores == {("support", "prompt_length"): 0.45, ("faq", "prompt_length"): 0.1}
    (firing,) = loop.stack.firing_alerts("LorafleetDrift")
    assert firing["labels"]["adapter"] == "support"
    assert float(firing["value"]) == 0.45
    (target,) = loop.stack.targets()
    assert target["health"] == "up"
    drift_posts = [
        a["labels"]["adapter"]
        for p in loop.webhook.posts
        for a in p.body["alerts"]
        if a["labels"]["alertname"] == "LorafleetDrift"
    ]
    assert set(drift_posts) == {"support"}


def test_other_alerts_go_to_the_default_receiver_not_the_webhook(loop: Loop) -> None:
    (errors,) = loop.stack.wait_for(
        lambda: loop.stack.alertmanager_alerts("LorafleetHighErrorRate"),
        30,
        "LorafleetHighErrorRate in Alertmanager",
    )
    assert (errors["labels"]["adapter"], errors["labels"]["version"]) == ("faq", "1")
    assert [r["name"] for r in errors["receivers"]] == ["default"]
    time.sleep(2)  # longer than group_wait: a wrongly routed alert would have been posted
    assert loop.webhook.alert_names() == {"LorafleetDrift"}


def test_the_stack_runs_deploys_rules_with_short_durations_only(loop: Loop) -> None:
    deployed = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    running = yaml.safe_load((loop.stack.workdir / "rules.yml").read_text())
    for group_d, group_r in zip(deployed["groups"], running["groups"], strict=True):
        for rule_d, rule_r in zip(group_d["rules"], group_r["rules"], strict=True):
            assert rule_r.pop("for") == "1s"
            rule_d.pop("for")
            assert rule_r == rule_d
    durations = {r["name"]: r["duration"] for r in loop.stack.rules()}
    assert durations == {
        "LorafleetDrift": 1,
        "LorafleetHighErrorRate": 1,
        "LorafleetHighLatency": 1,
    }
