"""Prometheus metrics of the server, defined once. Base units, `_total` / `_seconds`
suffixes, labels `adapter` and `version` (bounded by the resident set; the base model is
adapter "base", version "0")."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
