"""The files in deploy/: validated by Prometheus' and Alertmanager's own tools, consistent
with each other, and naming only metrics the server defines."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "lorafleet.json"
KUBERNETES = DEPLOY / "kubernetes"

# Metric names deploy/ may use before serving/ defines them (while a metric is being added
# to the server in parallel with its rule or panel). Tolerated only while listed here and
# absent from serving/metrics.py; remove a name as soon as it lands. Empty: every name the
# deploy files use must exist.
NOT_YET_DEFINED: frozenset[str] = frozenset()
METRIC_NAME = re.compile(r"\blorafleet_[a-zA-Z0-9_]*[a-zA-Z0-9]")


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document, over every YAML file in deploy/kubernetes/."""
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            name = doc.get("metadata", {}).get("name", path.name)
            assert (doc["kind"], name) not in docs, f"{path}: {doc['kind']} {name} twice"
            docs[(doc["kind"], name)] = doc
    return docs


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


# ---- missing binaries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("binary", "package"),
    [("promtool", "prometheus"), ("prometheus-alertmanager", "prometheus-alertmanager")],
)
def test_a_missing_binary_skips_naming_its_package_and_fails_in_ci(
    require_binary: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    binary: str,
    package: str,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"install Debian's {package} package"):
        require_binary(binary)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{binary} is not installed.*CI=true"):
        require_binary(binary)


# ---- Prometheus ------------------------------------------------------------------------------


def test_promtool_checks_the_config_with_its_rules(require_binary: Callable[[str], str]) -> None:
    out = run([require_binary("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 3 rules found" in out.stdout


def test_promtool_rule_unit_tests_pass(require_binary: Callable[[str], str]) -> None:
    out = run([require_binary("promtool"), "test", "rules", str(PROMETHEUS / "rules_test.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@pytest.mark.parametrize(
    ("original", "broken", "alert"),
    [
        (") > 0.05\n", ") > 0.5\n", "LorafleetHighErrorRate"),  # threshold 5% -> 50%
        ("[5m])) >= 0.1\n", "[5m])) >= 0.001\n", "LorafleetHighErrorRate"),  # min traffic
        ("> 20\n", "> 40\n", "LorafleetHighLatency"),
        ("> on (job, instance, signal)", "< on (job, instance, signal)", "LorafleetDrift"),
        ("for: 10m", "for: 1m", "LorafleetDrift"),
    ],
)
def test_rule_unit_tests_catch_a_changed_rule(
    require_binary: Callable[[str], str], tmp_path: Path, original: str, broken: str, alert: str
) -> None:
    """The unit tests assert thresholds, minimum traffic and durations, not only syntax."""
    rules = (PROMETHEUS / "rules.yml").read_text()
    assert original in rules
    (tmp_path / "rules.yml").write_text(rules.replace(original, broken, 1))
    (tmp_path / "rules_test.yml").write_text((PROMETHEUS / "rules_test.yml").read_text())
    out = run([require_binary("promtool"), "test", "rules", str(tmp_path / "rules_test.yml")])
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"alertname: {alert}," in out.stderr  # promtool reports failures on stderr


def test_dashboard_expressions_are_valid_promql(
    require_binary: Callable[[str], str], tmp_path: Path
) -> None:
    """Each dashboard query, with Grafana's variables filled in, as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, expr in enumerate(dashboard_expressions())
    ]
    text = yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    text = text.replace("$__rate_interval", "1m").replace("$adapter", ".*")
    (tmp_path / "dashboard.yml").write_text(text.replace("$version", ".*"))
    out = run([require_binary("promtool"), "check", "rules", str(tmp_path / "dashboard.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


# ---- Alertmanager ----------------------------------------------------------------------------


def test_amtool_checks_the_config(require_binary: Callable[[str], str]) -> None:
    out = run([require_binary("amtool"), "check-config", str(ALERTMANAGER_YML)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    assert "2 receivers" in out.stdout


@pytest.mark.parametrize(
    ("alertname", "receiver"),
    [
        ("LorafleetDrift", "lorafleet-retrain"),
        ("LorafleetHighErrorRate", "default"),
        ("LorafleetHighLatency", "default"),
    ],
)
def test_drift_alone_routes_to_the_webhook(
    require_binary: Callable[[str], str], alertname: str, receiver: str
) -> None:
    out = run(
        [
            require_binary("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_YML}",
            f"alertname={alertname}",
            "adapter=support",
            "version=3",
        ]
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == receiver


def test_webhook_posts_to_the_servers_service_with_a_bearer_key_file() -> None:
    config = yaml.safe_load(ALERTMANAGER_YML.read_text())
    assert config["route"]["group_by"] == ["alertname", "adapter", "version"]
    (receiver,) = [r for r in config["receivers"] if r["name"] == "lorafleet-retrain"]
    (webhook,) = receiver["webhook_configs"]
    url = urlsplit(webhook["url"])
    service = manifests()[("Service", "lorafleet")]
    namespace = service["metadata"]["namespace"]
    assert url.hostname == f"lorafleet.{namespace}.svc.cluster.local"
    assert url.port == service["spec"]["ports"][0]["port"]
    assert url.path == "/admin/alerts"
    auth = webhook["http_config"]["authorization"]
    assert auth["type"] == "Bearer"
    assert auth["credentials_file"].startswith("/")
    assert "credentials" not in auth  # the key never sits in the config


# ---- Grafana ---------------------------------------------------------------------------------


def test_dashboard_has_a_datasource_variable_and_the_expected_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"adapter", "version"} <= set(variables)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    exprs = "\n".join(dashboard_expressions())
    for metric in (
        "lorafleet_requests_total",
        "lorafleet_request_duration_seconds_bucket",
        "lorafleet_time_to_first_token_seconds_bucket",
        "lorafleet_prompt_tokens_total",
        "lorafleet_completion_tokens_total",
        "lorafleet_adapters_loaded",
        "lorafleet_adapter_cache_events_total",
        "lorafleet_queue_depth",
        "lorafleet_drift_score",
        "lorafleet_drift_threshold",
        "lorafleet_alias_info",
        "lorafleet_canary_verdicts_total",
    ):
        assert metric in exprs, metric
    assert '$adapter"' in exprs and '$version"' in exprs
    assert 'alias=~"production|canary"' in exprs


# ---- metric names ----------------------------------------------------------------------------


def defined_metric_names() -> set[str]:
    """Every sample name the server's metrics produce (serving/metrics.py)."""
    import prometheus_client

    import serving.metrics

    registries = [prometheus_client.REGISTRY] + [
        value
        for value in vars(serving.metrics).values()
        if isinstance(value, prometheus_client.CollectorRegistry)
    ]
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("", "_sum", "_count"),
    }
    return {
        family.name + suffix
        for registry in registries
        for family in registry.collect()
        if family.name.startswith("lorafleet_")
        for suffix in suffixes[family.type]
    }


def queries(path: Path) -> list[str]:
    """The PromQL of a deploy file: rule expressions, test series, dashboard queries."""
    if path == DASHBOARD:
        dashboard = json.loads(path.read_text())
        variables = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
        return dashboard_expressions() + variables
    data = yaml.safe_load(path.read_text())
    if "tests" in data:  # a promtool unit test file
        return [s["series"] for t in data["tests"] for s in t["input_series"]]
    return [rule["expr"] for group in data["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    "path",
    [PROMETHEUS / "rules.yml", PROMETHEUS / "rules_test.yml", DASHBOARD],
    ids=lambda p: p.name,
)
def test_every_metric_name_is_one_the_server_defines(path: Path) -> None:
    used = {name for query in queries(path) for name in METRIC_NAME.findall(query)}
    assert len(used) >= 4, used
    defined = defined_metric_names()
    assert "lorafleet_requests_total" in defined
    unknown = used - defined - NOT_YET_DEFINED
    assert not unknown, f"{path.name} uses metrics serving/metrics.py does not define: {unknown}"


# ---- Kubernetes ------------------------------------------------------------------------------


def test_kubernetes_manifests_parse_with_the_expected_kinds() -> None:
    assert set(manifests()) == {
        ("Namespace", "lorafleet"),
        ("PersistentVolumeClaim", "lorafleet-data"),
        ("Deployment", "lorafleet"),
        ("Service", "lorafleet"),
        ("Service", "lorafleet-pods"),
        ("CronJob", "lorafleet-retrain"),
        ("Kustomization", "kustomization.yaml"),
    }
    kustomization = manifests()[("Kustomization", "kustomization.yaml")]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_server_and_cronjob_share_image_volume_secret_and_home() -> None:
    docs = manifests()
    deployment = docs[("Deployment", "lorafleet")]["spec"]["template"]
    cron = docs[("CronJob", "lorafleet-retrain")]["spec"]
    job = cron["jobTemplate"]["spec"]["template"]
    (server,), (retrain,) = deployment["spec"]["containers"], job["spec"]["containers"]
    assert server["image"] == retrain["image"]
    assert retrain["args"] == ["python", "-m", "registry", "jobs", "run"]
    assert retrain["workingDir"] == "/home/bentoml/bento/src"
    assert cron["concurrencyPolicy"] == "Forbid"
    for pod, container in ((deployment, server), (job, retrain)):
        (volume,) = pod["spec"]["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == "lorafleet-data"
        (mount,) = container["volumeMounts"]
        env = env_of(container)
        assert env["LORAFLEET_HOME"].startswith(mount["mountPath"] + "/")
        assert env["LORAFLEET_API_KEY"]["secretKeyRef"] == {
            "name": "lorafleet-admin",
            "key": "api-key",
        }
    assert env_of(server)["LORAFLEET_HOME"] == env_of(retrain)["LORAFLEET_HOME"]
    # The CronJob's pod runs on the server's node (ReadWriteOnce volume, SQLite WAL).
    affinity = job["spec"]["affinity"]["podAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= deployment["metadata"]["labels"].items()
    pvc = docs[("PersistentVolumeClaim", "lorafleet-data")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_cronjob_schedule_is_a_valid_cron_expression() -> None:
    from croniter import croniter

    cron = manifests()[("CronJob", "lorafleet-retrain")]["spec"]
    assert croniter.is_valid(cron["schedule"])


def test_server_probes_port_annotations_and_serve_config() -> None:
    from serving.serve_config import ServeConfig

    docs = manifests()
    pod = docs[("Deployment", "lorafleet")]["spec"]["template"]
    (server,) = pod["spec"]["containers"]
    (port,) = server["ports"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert server["resources"]["requests"] and server["resources"]["limits"]["memory"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"] == 3000
    # The Bento reads LORAFLEET_SERVE_CONFIG; Kubernetes expands $(LORAFLEET_API_KEY).
    raw = env_of(server)["LORAFLEET_SERVE_CONFIG"]
    assert "$(LORAFLEET_API_KEY)" in raw
    config = ServeConfig.model_validate(json.loads(raw.replace("$(LORAFLEET_API_KEY)", "k3y")))
    assert config.api_key == "k3y"
    assert str(config.base).startswith(server["volumeMounts"][0]["mountPath"] + "/")
    for name in ("lorafleet", "lorafleet-pods"):
        service = docs[("Service", name)]["spec"]
        assert service["selector"].items() <= pod["metadata"]["labels"].items()
        assert service["ports"][0]["port"] == port["containerPort"]
    assert docs[("Service", "lorafleet-pods")]["spec"]["clusterIP"] == "None"


def test_prometheus_discovers_the_headless_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (dns,) = job["dns_sd_configs"]
    headless = manifests()[("Service", "lorafleet-pods")]
    namespace = headless["metadata"]["namespace"]
    assert dns["names"] == [f"lorafleet-pods.{namespace}.svc.cluster.local"]
    assert dns["port"] == headless["spec"]["ports"][0]["port"]
    assert job["metrics_path"] == "/metrics"


# ---- many replicas: deploy/kubernetes/fleet and deploy/haproxy -----------------------------

FLEET = KUBERNETES / "fleet"


def fleet_manifests() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(FLEET.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            name = doc.get("metadata", {}).get("name", path.name)
            found[(doc["kind"], name)] = doc
    return found


def test_fleet_runs_three_replicas_without_a_shared_volume() -> None:
    docs = fleet_manifests()
    assert set(docs) == {
        ("Deployment", "lorafleet"),
        ("Service", "lorafleet"),
        ("Service", "lorafleet-pods"),
        ("PodDisruptionBudget", "lorafleet"),
        ("CronJob", "lorafleet-retrain"),
        ("Kustomization", "kustomization.yaml"),
    }
    listed = set(docs[("Kustomization", "kustomization.yaml")]["resources"])
    assert listed == {"../namespace.yaml"} | {
        p.name for p in FLEET.glob("*.yaml") if p.name != "kustomization.yaml"
    }
    deployment = docs[("Deployment", "lorafleet")]["spec"]
    assert deployment["replicas"] == 3
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["template"]["spec"]
    assert [v for v in pod["volumes"] if "emptyDir" not in v] == []  # no claim, nothing shared
    labels = deployment["template"]["metadata"]["labels"]
    pdb = docs[("PodDisruptionBudget", "lorafleet")]["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    server = pod["containers"][0]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = json.loads(env_of(server)["LORAFLEET_SERVE_CONFIG"])
    (fetch,) = pod["initContainers"]
    assert fetch["args"][:4] == ["python", "-m", "registry", "base"]
    assert fetch["args"][fetch["args"].index("--out") + 1] == config["base"]
    assert config["home"] == env_of(server)["LORAFLEET_HOME"]


def test_fleet_pods_take_the_registry_from_a_secret() -> None:
    docs = fleet_manifests()
    pod = docs[("Deployment", "lorafleet")]["spec"]["template"]["spec"]
    job = docs[("CronJob", "lorafleet-retrain")]["spec"]["jobTemplate"]["spec"]["template"]
    containers = [*pod["initContainers"], *pod["containers"], *job["spec"]["initContainers"],
                  *job["spec"]["containers"]]
    for container in containers:
        env = env_of(container)
        for name in ("LORAFLEET_REGISTRY_URL", "LORAFLEET_ARTIFACTS_URL", "AWS_ACCESS_KEY_ID"):
            assert env[name]["secretKeyRef"]["name"] == "lorafleet-registry", (container, name)


def test_fleet_retrains_on_a_gpu_node_in_the_gpu_image() -> None:
    job = fleet_manifests()[("CronJob", "lorafleet-retrain")]["spec"]["jobTemplate"]["spec"]
    spec = job["template"]["spec"]
    (retrain,) = spec["containers"]
    assert retrain["args"] == ["python", "-m", "registry", "jobs", "run"]
    assert retrain["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert retrain["image"].split(":")[0].endswith("lorafleet-gpu")
    assert "affinity" not in spec  # any node: nothing to share with the servers' nodes
    (fetch,) = spec["initContainers"]
    assert env_of(retrain)["LORAFLEET_BASE"] == fetch["args"][fetch["args"].index("--out") + 1]


def test_the_commands_the_fleet_runs_exist() -> None:
    import sys

    for args in (["base", "fetch", "--help"], ["jobs", "run", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "registry", *args], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def test_haproxy_checks_its_config(require_binary: Callable[[str], str]) -> None:
    import os

    env = {
        **os.environ,
        "LORAFLEET_HAPROXY_BIND": "127.0.0.1:8080",
        **{f"LORAFLEET_REPLICA_{i}": f"127.0.0.1:{3000 + i}" for i in (1, 2, 3)},
    }
    done = subprocess.run(
        [require_binary("haproxy"), "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout + done.stderr
