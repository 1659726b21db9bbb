"""`make demo`: tune, register, serve, hot-swap, watch and retrain, end to end on the CPU.

Builds a tiny base model, fine-tunes two adapters on the example tasks and a sentiment
classifier, registers and promotes them, starts `lorafleet serve`, asks the base and each
adapter, classifies reviews at /v1/classify beside the generation adapters, then registers a
new version and promotes and rolls it back while a background client keeps sending
requests, and prints what served each request. Then the loop: the `topic` adapter gets
prompts it was not trained on, its drift scores cross their thresholds, the drift alert
arrives at the server's webhook (here posted in Alertmanager's format; `make test` runs real
Prometheus and Alertmanager), `lorafleet jobs run` retrains it on its data plus new data,
the gate passes, and the server's canary verdict promotes the new version. Last, what the
operator dashboard shows. Files go to $DEMO_DIR (default .demo); with DEMO_KEEP_SERVING=1
the server keeps running at the end, for a look at its /dashboard.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LORAFLEET = str(Path(sys.executable).with_name("lorafleet"))
DIR = Path(os.environ.get("DEMO_DIR", ROOT / ".demo"))
ENV = {**os.environ, "LORAFLEET_HOME": str(DIR / "registry"), "LORAFLEET_ACTOR": "demo"}
KEY = "demo-key"
QUESTIONS = [
    ("Review: the coffee was awful and the staff was rude.\nSentiment:", ("base", "sentiment")),
    ("Review: the room was lovely and the service was excellent.\nSentiment:", ("sentiment",)),
    ("Text: we talked about the guitar, the album and the drum.\nTopic:", ("base", "topic")),
    ("Text: we talked about the flight, the beach and the map.\nTopic:", ("topic",)),
]


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def lorafleet(*args: str, quiet: bool = False) -> None:
    print(f"$ lorafleet {' '.join(args)}", flush=True)
    out = subprocess.run([LORAFLEET, *args], env=ENV, cwd=ROOT, capture_output=quiet, text=True)
    if out.returncode != 0:
        sys.exit(f"demo failed: lorafleet {' '.join(args)}\n{out.stderr if quiet else ''}")


def tune(task: str, run: str, *extra: str) -> None:
    lorafleet(
        "tune",
        f"examples/{task}.yaml",
        f"base={DIR / 'base'}",
        f"output.dir={DIR / 'runs' / run}",
        *extra,
        quiet=True,
    )
    print(f"   -> {DIR / 'runs' / run / 'adapter'} (loss curve: loss.png)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def complete(http: httpx.Client, model: str, prompt: str) -> tuple[str, str]:
    r = http.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0},
    )
    r.raise_for_status()
    return r.headers["X-Lorafleet-Adapter-Version"], r.json()["choices"][0]["text"]


def main() -> None:
    shutil.rmtree(DIR, ignore_errors=True)
    DIR.mkdir(parents=True)
    step("build a tiny Llama base model with its own tokenizer (no downloads)")
    lorafleet("base", "tiny", "--out", str(DIR / "base"))
    lorafleet("registry", "init", "--base", str(DIR / "base"))
    step("fine-tune two adapters on the example tasks and register them")
    tune("sentiment", "sentiment-1", "--register", "sentiment")
    tune("topic", "topic-1", "--register", "topic")
    tune("sentiment", "sentiment-2", "training.seed=1")  # registered later, under load
    step("fine-tune a classifier (LoRA + a new head) on the same reviews and register it")
    tune("sentiment-classifier", "classifier-1", "--register", "sentiment-classifier")
    lorafleet("registry", "promote", "sentiment", "1", "--reason", "launch")
    lorafleet("registry", "promote", "topic", "1", "--reason", "launch")
    lorafleet("registry", "promote", "sentiment-classifier", "1", "--reason", "launch")

    step("start the service")
    port = free_port()
    log = (DIR / "server.log").open("w")
    server = subprocess.Popen(
        [
            LORAFLEET,
            "serve",
            "--base",
            str(DIR / "base"),
            "--port",
            str(port),
            "--api-key",
            KEY,
            # Small drift windows, so a few dozen requests show the shift.
            "--drift-window",
            "40",
            "--drift-min-samples",
            "30",
        ],
        env=ENV,
        cwd=ROOT,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    print(f"$ lorafleet serve --base {DIR / 'base'} --port {port} --api-key ***")
    try:
        http = httpx.Client(base_url=url, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"demo failed: the server did not start; see {DIR / 'server.log'}")
            time.sleep(0.5)
        print(f"   ready at {url}; the operator dashboard: {url}/dashboard (admin key {KEY})")
        serve_phase(http)
        loop_phase(http)
        dashboard_phase(http)
        if os.environ.get("DEMO_KEEP_SERVING"):
            print(f"\n   serving on until Ctrl-C: open {url}/dashboard, admin key {KEY}")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
    finally:
        step("stop the service")
        os.killpg(server.pid, signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"   stopped (exit code {code})")


def serve_phase(http: httpx.Client) -> None:
    step("ask the base model and each adapter (greedy, up to 10 tokens)")
    for prompt, models in QUESTIONS:
        for model in models:
            served, text = complete(http, model, prompt)
            print(f"   {prompt.splitlines()[0][:58]:<58} {served:<12} -> {text!r}")

    step("classify the same reviews with the classifier (POST /v1/classify, vLLM's API)")
    reviews = [q.split("\n")[0].removeprefix("Review: ") for q, _ in QUESTIONS[:2]]
    r = http.post("/v1/classify", json={"model": "sentiment-classifier", "input": reviews})
    r.raise_for_status()
    for review, item in zip(reviews, r.json()["data"], strict=True):
        probs = ", ".join(f"{p:.3f}" for p in item["probs"])
        served = r.headers["X-Lorafleet-Adapter-Version"]
        print(f"   {review:<58} {served} -> {item['label']} ({probs})")

    step("a new version while a client keeps sending requests")
    stop = threading.Event()
    seen: list[str] = []
    failed: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            while not stop.is_set():
                try:
                    seen.append(complete(own, "sentiment", QUESTIONS[0][0])[0])
                except httpx.HTTPError as err:
                    failed.append(str(err))

    background = threading.Thread(target=client)
    background.start()
    time.sleep(1.0)
    lorafleet(
        "registry",
        "register",
        "sentiment",
        str(DIR / "runs" / "sentiment-2" / "adapter"),
        "--reason",
        "new seed",
    )
    lorafleet("registry", "promote", "sentiment", "2", "--reason", "new seed")
    time.sleep(1.5)
    lorafleet("registry", "rollback", "sentiment", "--reason", "demo rollback")
    time.sleep(1.5)
    stop.set()
    background.join()
    runs = " -> ".join(f"{version} x{len(list(group))}" for version, group in groupby(seen))
    print(f"   versions served, in order: {runs}")
    print(f"   {len(seen)} requests, {len(failed)} failed")
    if failed or "sentiment@2" not in seen or seen[-1] != "sentiment@1":
        sys.exit(f"demo failed: {failed[:3] or 'the swap was not observed'}")
    lorafleet("registry", "history", "sentiment")

    step("metrics excerpt (GET /metrics)")
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(
            (
                "lorafleet_requests_total",
                "lorafleet_adapters_loaded",
                "lorafleet_adapter_cache_events_total",
                "lorafleet_classifications_total",
            )
        ):
            print(f"   {line}")



def prompts(task: str, split: str = "eval") -> list[str]:
    path = ROOT / "examples" / "data" / task / f"{split}.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def send(http: httpx.Client, model: str, batch: list[str], clients: int = 1) -> list[str]:
    """Versions that served `batch` (greedy, up to 16 tokens), from `clients` at once."""

    def one(prompt: str) -> str:
        r = http.post(
            "/v1/completions",
            json={"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0},
        )
        r.raise_for_status()
        return r.headers["X-Lorafleet-Adapter-Version"]

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, batch))


def show_drift(http: httpx.Client, ref: str) -> dict[str, float | None]:
    report = http.get(
        "/admin/drift", params={"model": ref}, headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    scores = {name: s["score"] for name, s in report["signals"].items()}
    shown = ", ".join(
        f"{name} {score:.2f}" + (" DRIFT" if score > report["signals"][name]["threshold"] else "")
        for name, score in scores.items()
        if score is not None
    )
    print(f"   {ref} drift scores: {shown or 'not enough samples yet'}")
    return scores


def loop_phase(http: httpx.Client) -> None:
    step("watch and retrain: users of `topic` start sending reviews")
    new_data = DIR / "new-data" / "topic"
    new_data.mkdir(parents=True)
    # The reviews users now send, labelled: the new data a retraining job adds.
    shutil.copy(ROOT / "examples/data/sentiment/train.jsonl", new_data / "reviews.jsonl")
    lorafleet(
        "registry", "settings", "topic", f"retrain_data_dir={new_data}", "canary_weight=0.5",
        "canary_min_requests=10", "canary_window_s=2", "canary_max_window_s=300",
        "canary_max_error_rate_increase=0.2", "gate_tolerance=0.1",
        "gate_forgetting_tolerance=1.5", quiet=True,
    )
    # The candidate also learns the reviews: its loss on topic's own held-out set may rise by
    # up to 10% (gate_tolerance 0.1); with the default 0 this run's candidate was refused.
    # The tiny base is random, so topic@1 knows no general text to forget: its retrain's
    # perplexity on general text rose 1.42x when measured, and 1.5 lets it through (docs/tuning.md).
    print(
        "   (settings: new data from new-data/topic; the gate lets topic's held-out loss rise "
        "10% and\n    its general-text perplexity 150% (a random base knows no general "
        "text); canary at 0.5,\n    judged from 10 requests and 2 s on by one-sided tests at "
        "alpha 0.05, a short\n    canary's error tolerance 0.2; held for a person if still "
        "inconclusive after 300 s)"
    )
    send(http, "topic", prompts("topic")[:40])
    show_drift(http, "topic@1")
    send(http, "topic", prompts("sentiment")[:40])
    scores = show_drift(http, "topic@1")
    lorafleet(
        "drift", "report", "topic@1", "--out", str(DIR / "drift-topic.html"),
        "--url", str(http.base_url), "--api-key", KEY, quiet=True,
    )
    print(f"   baseline vs live, per signal: {DIR / 'drift-topic.html'}")
    signal_name = max((v or 0.0, k) for k, v in scores.items())[1]

    step("the drift alert reaches the server's webhook (Alertmanager's payload, version 4)")
    alert = {
        "status": "firing",
        "labels": {"alertname": "LorafleetDrift", "adapter": "topic", "version": "1",
                   "signal": signal_name, "severity": "warning"},
        "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": "5e1ec7ed0d3a7a11",
    }
    payload = {"version": "4", "status": "firing", "receiver": "lorafleet-retrain",
               "groupKey": "demo", "alerts": [alert]}
    answer = http.post(
        "/admin/alerts", json=payload, headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    print(f"   POST /admin/alerts -> {answer['alerts'][0]['outcome']} "
          f"({answer['alerts'][0]['detail']})")
    lorafleet("jobs", "run")  # exits 0 also when the gate refuses the candidate

    step("the canary takes half of `topic`'s traffic; the server judges it")
    mixed = prompts("topic")[40:] + prompts("sentiment")[40:]
    rng = random.Random(0)
    seen: list[str] = []
    deadline = time.monotonic() + 330  # past canary_max_window_s: held canaries end it
    while time.monotonic() < deadline:
        seen += send(http, "topic", rng.sample(mixed, 8), clients=4)
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        aliases = models["topic"]["aliases"]
        if "canary" not in aliases:
            break
    print(f"   {len(seen)} requests: {seen.count('topic@1')} by topic@1, "
          f"{seen.count('topic@2')} by topic@2 (the canary)")
    print(f"   topic aliases now: {aliases}")
    show_verdict("topic")
    if aliases.get("production") != 2:
        sys.exit("demo failed: the canary was not promoted")
    for prompt in (prompts("topic")[0], prompts("sentiment")[0]):
        served, text = complete(http, "topic", prompt)
        print(f"   {prompt.splitlines()[0][:58]:<58} {served:<12} -> {text!r}")
    lorafleet("registry", "history", "topic")


def show_verdict(adapter: str) -> None:
    """Each criterion of the adapter's last canary verdict (or hold): its test and numbers."""
    out = subprocess.run(
        [LORAFLEET, "registry", "history", adapter, "--json"],
        env=ENV, cwd=ROOT, capture_output=True, text=True, check=True,
    )
    found = [e for e in json.loads(out.stdout) if e["action"] in ("canary.verdict", "canary.held")]
    if not found:
        print("   no verdict yet")
        return
    head, _, rest = found[-1]["reason"].partition(": ")
    # each criterion's text starts with its name: latency, error_rate, feedback, drift.*, shadow
    criteria = re.split(r"; (?=(?:latency|error_rate|feedback|drift\.\w+|shadow): )", rest)
    skipped = [c.split(":")[0] for c in criteria if c.endswith(": skipped")]
    print(f"   the verdict: {head}, from one-sided tests (alpha 0.05 split over those run):")
    for criterion in criteria:
        if not criterion.endswith(": skipped"):
            print(f"     {criterion}")
    if skipped:
        print(f"     skipped (no ratings, too few drift samples): {', '.join(skipped)}")


def dashboard_phase(http: httpx.Client) -> None:
    step("what the operator dashboard shows (GET /admin/dashboard, drawn at /dashboard)")
    state = http.get("/admin/dashboard", headers={"Authorization": f"Bearer {KEY}"}).json()
    for adapter in state["fleet"]["adapters"]:
        aliases = ", ".join(f"{a} -> v{h['version']}" for a, h in adapter["aliases"].items())
        print(f"   {adapter['name']:<10} {len(adapter['versions'])} versions; {aliases}")
    for model, recent in sorted(state["traffic"]["recent"].items()):
        p95 = "-" if recent["p95_s"] is None else f"{recent['p95_s']:.3f} s"
        print(f"   {model:<12} last minute: {recent['requests']:>4} requests, p95 {p95}")
    for job in state["fleet"]["jobs"]:
        verdict = (job["canary_verdict"] or {}).get("reason", "no verdict")
        print(f"   job {job['id']} ({job['trigger']}): {job['state']}, v{job['version']}, "
              f"canary: {verdict[:60]}")


if __name__ == "__main__":
    main()
