"""Drift statistics: PSI and Jensen-Shannon distance on known distributions, windows bounded
by count and time, minimum-sample gating, feedback, label cardinality; then the real server
(`lorafleet serve`, tiny base, an adapter with a profile) under in-distribution and shifted
traffic, /admin/drift and `lorafleet drift report`.

The server cases need a process of their own: they read the drift gauges from BentoML's
/metrics (appended by serving/http/service.py's `__metrics__`), check them with promtool, and
run `lorafleet drift report` against the server's URL."""

from __future__ import annotations

import base64
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from registry.profile import CLASSIFIER_SIGNALS, BaselineProfile, build_profile
from serving.metrics import DRIFT_SCORE, DRIFT_THRESHOLD, DRIFT_WINDOW_SAMPLES
from serving.serve_config import ServeConfig
from serving.watch.drift import EPSILON, SIGNALS, Drift, DriftSettings, js_distance, psi

# ---- statistics ---------------------------------------------------------------------------


def test_psi_of_identical_histograms_is_zero() -> None:
    assert psi([5, 3, 0, 2], [50, 30, 0, 20]) == pytest.approx(0.0, abs=1e-12)


def test_psi_known_value() -> None:
    # (0.5-0.25) ln(0.5/0.25) + (0.5-0.75) ln(0.5/0.75) = 0.25 ln 2 + 0.25 ln 1.5 = 0.25 ln 3
    assert psi([1, 1], [1, 3]) == pytest.approx(0.25 * math.log(3), rel=1e-12)


def test_psi_equals_symmetric_scipy_entropy() -> None:
    from scipy.stats import entropy

    p, q = [5, 0, 3, 9, 1], [1, 4, 0, 2, 7]
    pe = [x / 18 or EPSILON for x in p]
    qe = [x / 14 or EPSILON for x in q]
    assert psi(p, q) == pytest.approx(entropy(pe, qe) + entropy(qe, pe), rel=1e-12)


def test_psi_of_disjoint_histograms_uses_epsilon_for_empty_bins() -> None:
    bins = 17
    p, q = [0] * bins, [0] * bins
    p[0], q[1] = 10, 7
    z = 1 + (bins - 1) * EPSILON  # one full bin and 16 bins at EPSILON, renormalized
    expected = 2 * (1 - EPSILON) / z * math.log(1 / EPSILON)
    assert psi(p, q) == pytest.approx(expected, rel=1e-9)
    assert 18.3 < psi(p, q) < 18.5


def test_js_distance_identical_disjoint_and_known() -> None:
    assert js_distance([3, 1, 0], [6, 2, 0]) == pytest.approx(0.0, abs=1e-7)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    # P=[1,0], Q=[.5,.5], M=[.75,.25]: JSD = (log2(4/3) + .5 log2(2/3) + .5) / 2
    jsd = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert js_distance([1, 0], [1, 1]) == pytest.approx(math.sqrt(jsd), rel=1e-9)


# ---- windows ------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8], [5, 6, 9], [6, 7, 8, 9, 10]]


@pytest.fixture
def make_drift() -> Iterator[Callable[..., Drift]]:
    made: list[Drift] = []

    def make(profile: BaselineProfile | None = None, **settings: Any) -> Drift:
        drift = Drift(DriftSettings(interval_s=3600, **settings), lambda a, v: profile)
        drift.clock = lambda: 1000.0
        made.append(drift)
        return drift

    yield make
    for drift in made:
        drift.close()


@pytest.fixture(scope="module")
def profile() -> BaselineProfile:
    return build_profile(PROMPTS * 10, vocab_size=64, completion_lengths=[2, 3, 3] * 10)


def test_in_distribution_window_scores_zero(
    make_drift: Callable[..., Drift], profile: BaselineProfile
) -> None:
    drift = make_drift(profile, min_samples=3)
    for ids, completion in zip(PROMPTS * 4, [2, 3, 3] * 4, strict=True):
        drift.record("same", "1", ids, completion, False)
    scores = drift.scores("same", 1)
    assert scores["prompt_length"] == pytest.approx(0.0, abs=1e-12)
    assert scores["completion_length"] == pytest.approx(0.0, abs=1e-12)
    assert scores["prompt_tokens"] == pytest.approx(0.0, abs=1e-7)
    assert scores["length_stop_share"] == 0.0
    assert scores["feedback"] is None  # no ratings yet


def test_shifted_window_scores_known_values(
    make_drift: Callable[..., Drift], profile: BaselineProfile
) -> None:
    drift = make_drift(profile, min_samples=3)
    for _ in range(6):  # unseen tokens, 40 long (bin [32, 64)), cut by max_tokens
        drift.record("shift", "1", list(range(20, 60)), 16, True)
    scores = drift.scores("shift", 1)
    assert scores["prompt_tokens"] == pytest.approx(1.0)  # baseline has no "other" tokens
    # baseline prompts: 10+10 in [2, 4) ... lengths 4, 3, 5: bins [2,4) gets 1/3, [4,8) 2/3
    base = np.array(profile.prompt_length_counts, float)
    live = np.zeros_like(base)
    live[6] = 6
    assert scores["prompt_length"] == pytest.approx(psi(base, live))
    assert scores["prompt_length"] > 5
    assert scores["length_stop_share"] == 1.0
    report = drift.report("shift", 1)
    assert report["signals"]["prompt_tokens"]["status"] == "drifted"
    assert report["signals"]["prompt_tokens"]["live"][-1] == 6 * 40  # all in "other"
    assert report["signals"]["prompt_length"]["live"] == live.tolist()


def test_count_bound_keeps_the_newest_requests(
    make_drift: Callable[..., Drift], profile: BaselineProfile
) -> None:
    drift = make_drift(profile, window=5, min_samples=1)
    for length in range(1, 9):  # lengths 1..8; the window keeps 4..8
        drift.record("count", "1", [5] * length, 1, False)
    report = drift.report("count", 1)
    live = report["signals"]["prompt_length"]["live"]
    assert report["samples"] == 5
    assert live[3] == 4 and live[4] == 1 and sum(live) == 5  # [4, 8): 4..7, [8, 16): 8


def test_time_bound_evicts_and_drops_idle_versions(
    make_drift: Callable[..., Drift], profile: BaselineProfile
) -> None:
    drift = make_drift(profile, window_s=60, min_samples=2)
    now = [1000.0]
    drift.clock = lambda: now[0]
    drift.record("timed", "1", PROMPTS[0], 2, False)
    now[0] = 1030.0
    drift.record("timed", "1", PROMPTS[1], 2, False)
    drift.update()
    assert DRIFT_WINDOW_SAMPLES.value(("timed", "1")) == 2
    assert DRIFT_SCORE.value(("timed", "1", "prompt_length")) is not None
    now[0] = 1070.0  # the first request is 70 s old
    drift.update()
    assert DRIFT_WINDOW_SAMPLES.value(("timed", "1")) == 1
    assert DRIFT_SCORE.value(("timed", "1", "prompt_length")) is None  # below 2 samples
    now[0] = 1100.0  # nothing seen for a window time: the version's label sets go
    drift.update()
    assert DRIFT_WINDOW_SAMPLES.value(("timed", "1")) is None
    assert drift.summary() == []


def test_min_samples_gate_removes_and_restores_the_gauge(
    make_drift: Callable[..., Drift], profile: BaselineProfile
) -> None:
    drift = make_drift(profile, min_samples=3)
    for i in range(2):
        drift.record("gated", "1", PROMPTS[i], 2, False)
    drift.update()
    assert all(DRIFT_SCORE.value(("gated", "1", s)) is None for s in SIGNALS)
    assert drift.report("gated", 1)["signals"]["prompt_tokens"]["status"] == "not enough samples"
    drift.record("gated", "1", PROMPTS[2], 2, False)
    drift.update()
    assert DRIFT_SCORE.value(("gated", "1", "prompt_tokens")) == pytest.approx(0.0, abs=1e-7)
    assert DRIFT_SCORE.value(("gated", "1", "feedback")) is None
    assert DRIFT_THRESHOLD.value(("prompt_tokens",)) == 0.2


def test_feedback_share_of_negative_scores_with_its_own_minimum(
    make_drift: Callable[..., Drift], profile: BaselineProfile
) -> None:
    drift = make_drift(profile, min_samples=100, min_feedback=4)
    for score in (-1.0, 0.5, -0.2):
        drift.add_feedback("rated", "2", score)
    assert drift.scores("rated", 2)["feedback"] is None
    drift.add_feedback("rated", "2", 0.0)
    scores = drift.scores("rated", 2)
    assert scores["feedback"] == 0.5  # 2 of 4 below zero; 0.0 is not negative
    assert scores["prompt_length"] is None  # no requests: below their minimum


def test_versions_without_profile_get_counts_only(make_drift: Callable[..., Drift]) -> None:
    drift = make_drift(None, min_samples=1)
    drift.record("plain", "1", PROMPTS[0], 2, True)
    drift.update()
    assert drift.scores("plain", 1) == dict.fromkeys(SIGNALS)
    assert DRIFT_WINDOW_SAMPLES.value(("plain", "1")) == 1
    assert drift.report("plain", 1)["signals"]["prompt_length"]["status"] == "no baseline"


def test_tracked_versions_are_capped_least_recently_used_first(
    make_drift: Callable[..., Drift], profile: BaselineProfile
) -> None:
    drift = make_drift(profile, min_samples=1, max_versions=2)
    for version in ("1", "2"):
        drift.record("lru", version, PROMPTS[0], 2, False)
    drift.update()
    drift.record("lru", "1", PROMPTS[0], 2, False)  # 2 is now the least recently used
    drift.record("lru", "3", PROMPTS[0], 2, False)
    drift.update()
    assert [(v["adapter"], v["version"]) for v in drift.summary()] == [("lru", 1), ("lru", 3)]
    assert DRIFT_WINDOW_SAMPLES.value(("lru", "2")) is None
    assert DRIFT_SCORE.value(("lru", "2", "prompt_length")) is None
    assert DRIFT_WINDOW_SAMPLES.value(("lru", "1")) == 2


def test_disabled_drift_records_nothing(make_drift: Callable[..., Drift]) -> None:
    drift = make_drift(None, enabled=False)
    drift.record("off", "1", PROMPTS[0], 2, False)
    assert drift.summary() == []


def test_config_rejects_inconsistent_drift_options(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:
        ServeConfig(
            base=tmp_path,
            drift_window=10,
            drift_min_samples=20,
            drift_thresholds={"prompt_tokenz": 0.3, "feedback": 0},
        )
    text = str(err.value)
    assert "drift_min_samples 20 > drift_window 10" in text
    assert "unknown drift signal 'prompt_tokenz'" in text
    assert "drift threshold of feedback is 0.0" in text


# ---- the real server ----------------------------------------------------------------------

Service = Any  # the running server of conftest's `serve` fixture
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
WINDOW = 50
ADMIN_KEY = "test-admin-key"  # the key conftest's `serve` starts servers with


def rows(task: str, split: str) -> list[dict[str, str]]:
    import json

    lines = (DATA / task / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def drift_service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Service]],
    profiled_copy: Callable[[Path, Path, Path], Path],
) -> Iterator[Service]:
    """`lorafleet serve` with `senti` version 1 registered with a profile of the sentiment
    task's train prompts; windows of 50 requests, scored from 50, feedback from 3."""
    from registry import Registry

    tmp = tmp_path_factory.mktemp("drift")
    adapter = profiled_copy(tiny_base, adapter_factory(tiny_base, rank=4, seed=31), tmp / "senti")
    registry = Registry.create(tmp / "home", tiny_base)
    registry.register("senti", adapter, metadata={"drift_profile": "profile.json"})
    registry.promote("senti", 1)
    registry.close()
    options = ["--max-len", "256", "--max-tokens-limit", "16", "--drift-window", str(WINDOW)]
    options += ["--drift-min-samples", str(WINDOW), "--drift-min-feedback", "3"]
    with serve(tmp / "home", tiny_base, {"senti@1": adapter}, *options) as running:
        yield running


def send(service: Service, prompts: list[str]) -> list[dict[str, Any]]:
    """Completions of `prompts` for `senti`, 8 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(prompt: str) -> dict[str, Any]:
        body = {"model": "senti", "prompt": prompt, "max_tokens": 3, "temperature": 0}
        response = service.http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def drift_metrics(service: Service) -> dict[str, float]:
    """lorafleet_drift_* samples of /metrics by their name and labels."""
    out = {}
    for line in service.http.get("/metrics").text.splitlines():
        if line.startswith("lorafleet_drift_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def server_options(service: Service, key: str = ADMIN_KEY) -> list[str]:
    return ["--url", service.url, "--api-key", key]


def score_line(signal: str) -> str:
    return f'lorafleet_drift_score{{adapter="senti",signal="{signal}",version="1"}}'


def wait_for_samples(service: Service, samples: int) -> dict[str, float]:
    key = 'lorafleet_drift_window_samples{adapter="senti",version="1"}'
    deadline = time.monotonic() + 15
    while True:
        metrics = drift_metrics(service)
        if metrics.get(key) == samples and (
            samples < WINDOW or score_line("prompt_tokens") in metrics
        ):
            return metrics
        assert time.monotonic() < deadline, f"window never reached {samples}: {metrics}"
        time.sleep(0.2)


def test_server_scores_in_distribution_low_and_shifted_traffic_high(
    drift_service: Service, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    senti = [r["prompt"] for r in rows("sentiment", "eval")]
    topic = [r["prompt"] for r in rows("topic", "eval")]
    send(drift_service, senti[:30])
    metrics = wait_for_samples(drift_service, 30)
    assert not any(k.startswith("lorafleet_drift_score") for k in metrics)  # 30 < 50: absent
    assert metrics['lorafleet_drift_threshold{signal="prompt_tokens"}'] == 0.2

    answers = send(drift_service, senti[30:WINDOW])
    metrics = wait_for_samples(drift_service, WINDOW)
    assert metrics[score_line("prompt_tokens")] < 0.2
    assert metrics[score_line("prompt_length")] < 0.25
    assert score_line("feedback") not in metrics  # no ratings yet
    for answer in answers[:3]:  # three negative ratings: the feedback share is 1.0
        rated = drift_service.http.post(
            "/v1/feedback", json={"response_id": answer["id"], "score": -1}
        )
        assert rated.status_code == 200

    answers = send(drift_service, topic[:WINDOW])  # the window now holds only topic prompts
    cut = sum(a["choices"][0]["finish_reason"] == "length" for a in answers)
    metrics = wait_for_samples(drift_service, WINDOW)
    deadline = time.monotonic() + 15
    while metrics.get(score_line("feedback")) != 1.0 or metrics[score_line("prompt_tokens")] < 0.5:
        assert time.monotonic() < deadline, metrics  # the last update may be on its way
        time.sleep(0.2)
        metrics = drift_metrics(drift_service)
    assert metrics[score_line("prompt_tokens")] > 0.5  # measured 0.58-0.60 for such windows
    assert metrics[score_line("length_stop_share")] == pytest.approx(cut / WINDOW)
    assert metrics[score_line("feedback")] == 1.0

    report = drift_service.admin("/admin/drift?model=senti").json()
    assert report["model"] == "senti@1" and report["samples"] == WINDOW
    tokens = report["signals"]["prompt_tokens"]
    assert tokens["status"] == "drifted" and tokens["score"] > 0.5
    assert tokens["labels"][-1] == "other" and len(tokens["labels"]) == len(tokens["baseline"])
    assert sum(report["signals"]["prompt_length"]["live"]) == WINDOW
    assert report["signals"]["feedback"]["live"] == [0, 3]
    summary = drift_service.admin("/admin/drift").json()
    assert [(v["adapter"], v["version"]) for v in summary["versions"]] == [("senti", 1)]
    assert "prompt_tokens" in summary["versions"][0]["drifted"]

    out = tmp_path / "report.html"
    done = cli("drift", "report", "senti", "--out", str(out), *server_options(drift_service))
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(SIGNALS) - len(CLASSIFIER_SIGNALS)  # not a classifier
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "prompt_tokens" in page and ">drifted<" in page


def test_admin_drift_and_report_errors_name_the_fix(
    drift_service: Service, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    assert drift_service.admin("/admin/drift", key="wrong").status_code == 401
    unknown = drift_service.admin("/admin/drift?model=nope")
    assert unknown.status_code == 404 and "models: base, senti" in unknown.text
    base = drift_service.admin("/admin/drift?model=base").json()
    assert base["baseline"] is False
    assert base["signals"]["prompt_tokens"]["status"] == "no baseline"

    out = str(tmp_path / "r.html")
    wrong = cli("drift", "report", "senti", "--out", out, *server_options(drift_service, "no"))
    assert wrong.returncode == 2
    assert "pass --api-key KEY or set LORAFLEET_API_KEY" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    missing = cli("drift", "report", "nope", "--out", out, *server_options(drift_service))
    assert missing.returncode == 2 and "model 'nope' does not exist" in missing.stderr
    assert not Path(out).exists()


def test_promtool_accepts_the_drift_series(drift_service: Service) -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (see .ci/run)"
    send(drift_service, [r["prompt"] for r in rows("sentiment", "eval")[:2]])
    lines = drift_service.http.get("/metrics").text.splitlines()
    ours = [line for line in lines if "lorafleet_drift_" in line]
    assert any(line.startswith("lorafleet_drift_score{") for line in ours)
    out = subprocess.run(
        [promtool, "check", "metrics"],
        input="\n".join(ours) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
