"""Prometheus metrics of the server, defined once. Base units, `_total` / `_seconds`
suffixes, labels `adapter` and `version` (bounded by the resident set; the base model is
adapter "base", version "0")."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "lorafleet_requests",
    "Requests by adapter version and outcome",
    ["adapter", "version", "status"],
)
REQUEST_SECONDS = Histogram(
    "lorafleet_request_duration_seconds",
    "Request duration from admission to the last token",
    ["adapter", "version"],
    buckets=LATENCY_BUCKETS,
)
TTFT_SECONDS = Histogram(
    "lorafleet_time_to_first_token_seconds",
    "Time from admission to the first token",
    ["adapter", "version"],
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("lorafleet_prompt_tokens", "Prompt tokens", ["adapter", "version"])
COMPLETION_TOKENS = Counter(
    "lorafleet_completion_tokens", "Generated tokens", ["adapter", "version"]
)
CLASSIFICATIONS = Counter(
    "lorafleet_classifications",
    "Texts classified, by adapter version and predicted label",
    ["adapter", "version", "label"],
)
TOP_PROBABILITY = Histogram(
    "lorafleet_classification_top_probability",
    "Probability of the predicted label of each classified text",
    ["adapter", "version"],
    buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
ADAPTER_LOAD_SECONDS = Histogram(
    "lorafleet_adapter_load_seconds",
    "Time to make an adapter version resident",
    buckets=LATENCY_BUCKETS,
)
CACHE_EVENTS = Counter(
    "lorafleet_adapter_cache_events", "Adapter residency hits, misses and evictions", ["event"]
)
ADAPTERS_LOADED = Gauge(
    "lorafleet_adapters_loaded", "Adapter versions resident in the engine", multiprocess_mode="max"
)
QUEUE_DEPTH = Gauge(
    "lorafleet_queue_depth",
    "Requests admitted by the server and not finished",
    multiprocess_mode="max",
)
REGISTRY_REVISION = Gauge(
    "lorafleet_registry_revision",
    "Registry revision the server's alias map reflects",
    multiprocess_mode="max",
)


class ProcessGauge:
    """A gauge kept in this process only, whose label sets can be removed.

    BentoML runs prometheus_client in multiprocess mode, where values live in files and a
    removed label set keeps being exported with its last value. A drift score below its
    minimum sample count must be absent, not stale, so these gauges live in
    PROCESS_METRICS, which the service appends to /metrics (one worker owns the server).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        PROCESS_METRICS.register(self)

    def set(self, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._values[labels] = value

    def remove(self, labels: tuple[str, ...]) -> None:
        with self._lock:
            self._values.pop(labels, None)

    def value(self, labels: tuple[str, ...]) -> float | None:
        with self._lock:
            return self._values.get(labels)

    def labelsets(self) -> list[tuple[str, ...]]:
        with self._lock:
            return list(self._values)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            for labels, value in sorted(self._values.items()):
                family.add_metric(list(labels), value)
        yield family


PROCESS_METRICS = CollectorRegistry()
DRIFT_SCORE = ProcessGauge(
    "lorafleet_drift_score",
    "Drift of live traffic from the version's baseline profile, per signal "
    "(serving/watch/drift.py)",
    ("adapter", "version", "signal"),
)
DRIFT_WINDOW_SAMPLES = ProcessGauge(
    "lorafleet_drift_window_samples",
    "Requests in the version's drift window",
    ("adapter", "version"),
)
DRIFT_THRESHOLD = ProcessGauge(
    "lorafleet_drift_threshold",
    "Score above which a drift signal counts as drifted",
    ("signal",),
)
ALIAS_INFO = ProcessGauge(
    "lorafleet_alias_info",
    "1 for each alias the server routes, labelled with the version it points at",
    ("adapter", "alias", "version"),
)
LORA_REQUESTS_INFO = ProcessGauge(
    "lorafleet_lora_requests_info",
    "The adapters this replica holds, for load balancers that route by them (the Gateway "
    "API Inference Extension's model-server protocol, as vllm:lora_requests_info): value "
    "the time of the reading",
    ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
)
ENGINE_THREADS = ProcessGauge(
    "lorafleet_engine_threads",
    "torch threads the hf engine computes with now: every core, fewer while other processes "
    "keep one busy, unless --threads fixes them (registry/hardware.py); labelled with the "
    "dtype and the CPU",
    ("engine", "dtype", "cpu"),
)
CANARY_VERDICTS = Counter(
    "lorafleet_canary_verdicts",
    "Canary verdicts this server reached (promoted | rolled_back | held)",
    ["adapter", "verdict"],
)
SHADOW_REQUESTS = Counter(
    "lorafleet_shadow_requests",
    "Production requests run again on the canary, off the request path (outcome: compared | "
    "busy: one was running already | failed)",
    ["adapter", "outcome"],
)
