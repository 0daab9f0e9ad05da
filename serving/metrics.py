"""tuneloom_serving_* series. They live in prometheus_client's default registry, which vLLM's
own /metrics route exports, so one scrape gets both these and the vllm:* series."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# `adapter` is `namespace/name` (every version under one label) or the base model's served name.
requests = Counter("tuneloom_serving_requests", "Generation requests answered, by HTTP status.", ["adapter", "code"])
request_duration = Histogram(
    "tuneloom_serving_request_duration_seconds",
    "Time from request to the end of the response.",
    ["adapter"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
generated_tokens = Counter("tuneloom_serving_generated_tokens", "Completion tokens generated.", ["adapter"])
load_duration = Histogram(
    "tuneloom_serving_adapter_load_duration_seconds",
    "Time to fetch and verify an adapter version from the object store.",
    ["adapter"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
load_failures = Counter(
    "tuneloom_serving_adapter_load_failures", "Adapter versions that could not be served.", ["adapter", "reason"]
)
skipped_versions = Counter(
    "tuneloom_serving_adapter_skipped_versions",
    'Versions that "latest" passed over because they fail verification.',
    ["adapter"],
)
loaded_adapters = Gauge(
    "tuneloom_serving_loaded_adapters",
    "Adapter versions registered with the engine; it keeps up to --max-cpu-loras in memory and "
    "reloads evicted ones from the local cache.",
)
cache_hits = Counter("tuneloom_serving_adapter_cache_hits", "Adapter versions found in the local cache.", ["adapter"])
cache_misses = Counter(
    "tuneloom_serving_adapter_cache_misses", "Adapter versions downloaded from the object store.", ["adapter"]
)
