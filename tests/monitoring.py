"""Real Prometheus and Alertmanager for tests, configured from deploy/.

`monitoring_stack(workdir, target=..., webhook_url=..., admin_key=...)` starts Debian's
`prometheus` and `prometheus-alertmanager` on free loopback ports, waits until both are
ready, and stops them (SIGTERM, then SIGKILL) when the block ends. What they run is derived
from the deploy/ files, never written anew:

- rules: deploy/prometheus/rules.yml with the value of every rule's `for:` replaced by a
  short duration (`short_rules`); expressions, labels and annotations are unchanged, and
  `short_rules` checks that the expressions are identical.
- Prometheus: the `lorafleet` job of deploy/prometheus/prometheus.yml (its metrics path)
  with a static target instead of DNS discovery, scrape and evaluation every second, alerts
  to the test's Alertmanager, `--rules.alert.resend-delay=2s` (the default, 1 minute, delays
  a firing alert's arrival at Alertmanager by up to a minute).
- Alertmanager: deploy/alertmanager/alertmanager.yml with the webhook URL of the retraining
  receiver replaced, its credentials file replaced by one holding the test's admin key, and
  short group_wait / group_interval on every route.

Tests use it through the `monitoring_stack` and `require_binary` fixtures of tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
SCRAPE_JOB = "lorafleet"
"""The job of deploy/prometheus/prometheus.yml that scrapes the server."""
RETRAIN_RECEIVER = "lorafleet-retrain"
"""The receiver of deploy/alertmanager/alertmanager.yml that posts to /admin/alerts."""

PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
}
"""Binary -> the Debian package that installs it."""

T = TypeVar("T")


def require_binary(name: str) -> str:
    """The path of `name`; skips the test when it is missing, fails it when CI=true."""
    path = shutil.which(name)
    if path:
        return path
    package = PACKAGES.get(name, name)
    message = (
        f"{name} is not installed: install Debian's {package} package "
        f"(apt-get install {package}; .ci/run does this)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true, so a missing binary is a failure", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rule_expressions(rules_text: str) -> dict[str, str]:
    """alert or record name -> its expression, for every rule of a rules file."""
    data = yaml.safe_load(rules_text)
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in data["groups"]
        for rule in group["rules"]
    }


def short_rules(rules_text: str, for_: str = "1s") -> str:
    """The rules file with every rule's `for:` set to `for_`; nothing else changes."""
    data = yaml.safe_load(rules_text)
    for group in data["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = for_
    text = yaml.safe_dump(data, sort_keys=False)
    assert rule_expressions(text) == rule_expressions(rules_text), "expressions changed"
    return text


def prometheus_config(
    target: str, alertmanager: str, rules_file: str, interval: str = "1s"
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's scrape job for one static target, fast intervals."""
    deployed = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in deployed["scrape_configs"] if j["job_name"] == SCRAPE_JOB]
    discovery = [key for key in job if key.endswith("_sd_configs") or key == "relabel_configs"]
    scrape = {key: value for key, value in job.items() if key not in discovery}
    scrape.update(static_configs=[{"targets": [target]}], scrape_interval=interval)
    scrape["scrape_timeout"] = interval  # must not exceed the interval
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rules_file],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [scrape],
    }


def alertmanager_config(
    webhook_url: str, credentials_file: Path, group_wait: str = "1s", group_interval: str = "1s"
) -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml with the test's webhook, key file and timings."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        route["group_wait"], route["group_interval"] = group_wait, group_interval
        routes.extend(route.get("routes", []))
    (receiver,) = [r for r in config["receivers"] if r["name"] == RETRAIN_RECEIVER]
    (webhook,) = receiver["webhook_configs"]
    webhook["url"] = webhook_url
    webhook["http_config"]["authorization"]["credentials_file"] = str(credentials_file)
    return config


@dataclass(frozen=True)
class MonitoringStack:
    """A running Prometheus and Alertmanager, and queries against their HTTP APIs."""

    prometheus_url: str
    alertmanager_url: str
    workdir: Path
    """Configs, data and the logs prometheus.log / alertmanager.log."""

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Prometheus' instant query result: [{"metric": {labels}, "value": [t, "v"]}]."""
        data = self._get(f"{self.prometheus_url}/api/v1/query", params={"query": expr})
        assert data["resultType"] == "vector", f"{expr!r} is not an instant vector: {data}"
        return list(data["result"])

    def values(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every series of an instant query."""
        return [(r["metric"], float(r["value"][1])) for r in self.query(expr)]

    def prometheus_alerts(self, state: str | None = "firing") -> list[dict[str, Any]]:
        """Prometheus' alerts (state firing, pending, or None for both)."""
        alerts = self._get(f"{self.prometheus_url}/api/v1/alerts")["alerts"]
        return [a for a in alerts if state is None or a["state"] == state]

    def firing_alerts(self, name: str | None = None) -> list[dict[str, Any]]:
        """Alerts firing in Prometheus, of one alert name or all."""
        alerts = self.prometheus_alerts("firing")
        return [a for a in alerts if name is None or a["labels"]["alertname"] == name]

    def alertmanager_alerts(self, name: str | None = None) -> list[dict[str, Any]]:
        """Active alerts in Alertmanager (API v2), of one alert name or all."""
        response = httpx.get(f"{self.alertmanager_url}/api/v2/alerts", timeout=5)
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()
        return [a for a in alerts if name is None or a["labels"]["alertname"] == name]

    def rules(self) -> list[dict[str, Any]]:
        """The rules Prometheus loaded (name, query, duration in seconds, state, ...)."""
        groups = self._get(f"{self.prometheus_url}/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        """Prometheus' active scrape targets, with health and lastError."""
        return list(self._get(f"{self.prometheus_url}/api/v1/targets")["activeTargets"])

    def wait_for(self, probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
        """Poll `probe` every 0.2 s until it returns something truthy; fail with the logs."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout_s} s\n{self.logs()}", pytrace=False)
            time.sleep(0.2)

    def logs(self, tail_chars: int = 3000) -> str:
        """The end of both logs, for failure messages."""
        parts = []
        for name in ("prometheus.log", "alertmanager.log"):
            path = self.workdir / name
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} (last {tail_chars} chars)\n{text[-tail_chars:]}")
        return "\n".join(parts)

    def _get(self, url: str, params: dict[str, str] | None = None) -> Any:
        response = httpx.get(url, params=params, timeout=5)
        body = response.json()
        assert body.get("status") == "success", f"{url} {params}: {body}"
        return body["data"]


@contextmanager
def monitoring_stack(
    workdir: Path,
    *,
    target: str,
    webhook_url: str,
    admin_key: str,
    for_: str = "1s",
    interval: str = "1s",
    group_wait: str = "1s",
    group_interval: str = "1s",
    resend_delay: str = "2s",
    ready_timeout_s: float = 30.0,
) -> Iterator[MonitoringStack]:
    """Prometheus scraping `target` (host:port, /metrics without auth) with deploy/'s rules
    at `for_`, Alertmanager posting drift alerts to `webhook_url` with Bearer `admin_key`.

    `interval` is the scrape interval, the scrape timeout and the evaluation interval: a
    scrape slower than it marks the target down and its series stale, which resets pending
    alerts, so raise it (e.g. "2s") for a target whose /metrics can be slow under load."""
    prometheus = require_binary("prometheus")
    alertmanager = require_binary("prometheus-alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    prom_port, am_port = free_port(), free_port()
    am_address, prom_address = f"127.0.0.1:{am_port}", f"127.0.0.1:{prom_port}"

    key_file = workdir / "admin-key"
    key_file.write_text(admin_key)
    am_config = alertmanager_config(webhook_url, key_file, group_wait, group_interval)
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(am_config, sort_keys=False))
    (workdir / "rules.yml").write_text(short_rules(RULES.read_text(), for_))
    prom_config = prometheus_config(target, am_address, "rules.yml", interval)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(prom_config, sort_keys=False))

    with ExitStack() as stack:
        am_url = stack.enter_context(
            _process(
                [
                    alertmanager,
                    f"--config.file={workdir / 'alertmanager.yml'}",
                    f"--storage.path={workdir / 'alertmanager-data'}",
                    f"--web.listen-address={am_address}",
                    "--cluster.listen-address=",  # no gossip port on all interfaces
                ],
                workdir / "alertmanager.log",
                f"http://{am_address}",
                ready_timeout_s,
            )
        )
        prom_url = stack.enter_context(
            _process(
                [
                    prometheus,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                    f"--web.listen-address={prom_address}",
                    f"--rules.alert.resend-delay={resend_delay}",
                ],
                workdir / "prometheus.log",
                f"http://{prom_address}",
                ready_timeout_s,
            )
        )
        yield MonitoringStack(prom_url, am_url, workdir)


@contextmanager
def _process(argv: list[str], log: Path, url: str, ready_timeout_s: float) -> Iterator[str]:
    """Run `argv` with its output in `log` until GET url/-/ready answers 200; yield url."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with status {proc.returncode}"
                    if proc.poll() is not None
                    else f"was not ready within {ready_timeout_s} s"
                )
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{Path(argv[0]).name} {state}; its log ends:\n{tail}")
            time.sleep(0.1)
        yield url
    finally:
        _stop(proc)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
