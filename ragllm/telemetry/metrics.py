"""Every metric the service exports, defined once.

vLLM's names are kept where the meaning is the same, so dashboards built for vLLM work unchanged;
the rest live under ``ragllm_``. Each app owns its registry (no module globals), so several apps can
live in one process (tests do).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ragllm.generation import Delta, EngineStats
from ragllm.telemetry.rag_metrics import RagMetrics

# Buckets as vLLM uses them, so percentiles line up with vLLM's own panels.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited before its prefill.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefilled prompt tokens.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", labels, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success", "Finished requests.", labels + ["finished_reason"], registry=r
        )
        self.requests = Counter(
            "ragllm_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.in_flight = Gauge("ragllm_requests_in_flight", "Requests being served.", registry=r)
        self.client_disconnects = Counter(
            "ragllm_client_disconnects",
            "Streams cancelled because the client went away.",
            registry=r,
        )
        self.slow_clients = Counter(
            "ragllm_slow_clients",
            "Streaming clients dropped for reading too slowly, by reason "
            "(write_timeout, buffer_full, budget_full).",
            ["reason"],
            registry=r,
        )
        self.stream_buffer_bytes = Gauge(
            "ragllm_stream_buffer_bytes",
            "Bytes of streamed answers held for clients that read slower than "
            "the engine writes, all streams together (bounded by server.stream_buffer_total_bytes).",
            registry=r,
        )
        self.redis_fallbacks = Counter(
            "ragllm_redis_fallbacks",
            "Redis calls that failed or were skipped, by operation.",
            ["operation"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "ragllm_cache_lookups", "Response cache lookups by result.", ["result"], registry=r
        )
        self.request_log_dropped = Counter(
            "ragllm_request_log_dropped",
            "Request-log entries dropped from a full buffer.",
            registry=r,
        )
        self.request_log_pending = Gauge(
            "ragllm_request_log_pending",
            "Request-log entries waiting to be written to Redis.",
            registry=r,
        )
        self.rate_limited = Counter(
            "ragllm_rate_limited",
            "Requests refused by a rate limit, by kind.",
            ["kind"],
            registry=r,
        )
        self.rag = RagMetrics(r)
        # Children bound to this model once: ``labels()`` takes a lock and a dict lookup per call,
        # and the histograms below are observed on every token.
        self.ttft_for_model = self.time_to_first_token.labels(model_name)
        self.itl_for_model = self.inter_token_latency.labels(model_name)
        self.e2e_for_model = self.e2e_latency.labels(model_name)
        self.queue_time_for_model = self.queue_time.labels(model_name)
        self.prompt_tokens_for_model = self.prompt_tokens.labels(model_name)
        self.generation_tokens_for_model = self.generation_tokens.labels(model_name)

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Export the engine's running/waiting counts, read at scrape time (no cost per step)."""
        self.registry.register(_EngineStatsCollector(stats, self.model_name))

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Requests being served, read at scrape time from the one counter the server keeps."""
        self.in_flight.set_function(count)

    def watch_stream_buffers(self, num_bytes: Callable[[], int]) -> None:
        """Bytes held for slow clients, read at scrape time from the process-wide outbox budget."""
        self.stream_buffer_bytes.set_function(num_bytes)

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Per-request timing from the service's view: fed each delta, it records vLLM's histograms."""

    __slots__ = ("_metrics", "started_at", "_last", "first_token_s")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.started_at = self._last = time.perf_counter()
        self.first_token_s: float | None = None

    def on_delta(self, delta: Delta) -> None:
        if not delta.num_tokens:
            return
        now = time.perf_counter()
        m = self._metrics
        if self.first_token_s is None:
            self.first_token_s = now - self.started_at
            m.ttft_for_model.observe(self.first_token_s)
            if delta.queue_time_s is not None:
                m.queue_time_for_model.observe(delta.queue_time_s)
            # A whole answer in one delta (a non-streaming upstream) has no inter-token timings to report.
            later_tokens = delta.num_tokens - 1 if delta.finish_reason is None else 0
        else:
            later_tokens = delta.num_tokens
        if later_tokens:
            per_token = (now - self._last) / later_tokens
            for _ in range(later_tokens):
                m.itl_for_model.observe(per_token)
        self._last = now

    def on_finish(self, last: Delta) -> None:
        """A finished answer's latency and reason. Its tokens are counted with every other request's,
        finished or not, when the request is recorded (``ragllm.api.record``)."""
        m = self._metrics
        m.e2e_for_model.observe(time.perf_counter() - self.started_at)
        m.request_success.labels(m.model_name, last.finish_reason.value).inc()


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        for name, doc, value in (
            (
                "vllm:num_requests_running",
                "Requests in the engine's running batch.",
                stats.num_running,
            ),
            ("vllm:num_requests_waiting", "Requests queued for the engine.", stats.num_waiting),
        ):
            yield self._family(GaugeMetricFamily(name, doc, labels=["model_name"]), value)
        if stats.produced is not None:
            for name, doc, value in (
                (
                    "ragllm_engine_prompt_tokens",
                    "Prompt tokens of requests whose prefill the engine started, "
                    "counted by the engine (what requests were billed: vllm:prompt_tokens).",
                    stats.produced.prompt_tokens,
                ),
                (
                    "ragllm_engine_generation_tokens",
                    "Tokens the engine sampled for requests, counted by the "
                    "engine (what requests were billed: vllm:generation_tokens).",
                    stats.produced.completion_tokens,
                ),
            ):
                yield self._family(CounterMetricFamily(name, doc, labels=["model_name"]), value)
        kv = stats.kv_cache
        if kv is None:  # an upstream engine: its replicas export these series themselves
            return
        yield self._family(
            GaugeMetricFamily(
                "vllm:kv_cache_usage_perc",
                "KV-cache block usage (1 = full).",
                labels=["model_name"],
            ),
            kv.usage,
        )
        for name, doc, value in (
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                kv.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                kv.prefix_cache_hits,
            ),
            (
                "vllm:num_preemptions",
                "Sequences preempted for want of KV blocks.",
                kv.num_preemptions,
            ),
            (
                "ragllm_document_kv_hits",
                "Documents whose stored KV a prompt reused at its position (rag.kv_reuse).",
                kv.document_hits,
            ),
            (
                "ragllm_document_kv_misses",
                "Documents computed and stored because no stored KV was found (rag.kv_reuse).",
                kv.document_misses,
            ),
            (
                "ragllm_document_kv_reused_tokens",
                "Reused documents' tokens whose stored KV was kept as it was.",
                kv.document_tokens_reused,
            ),
            (
                "ragllm_document_kv_recomputed_tokens",
                "Reused documents' tokens computed again to blend them into their new prompt.",
                kv.document_tokens_recomputed,
            ),
        ):
            yield self._family(CounterMetricFamily(name, doc, labels=["model_name"]), value)
        yield self._family(
            GaugeMetricFamily(
                "ragllm_document_kv_blocks",
                "KV blocks holding stored documents (cached: evicted when memory is needed).",
                labels=["model_name"],
            ),
            kv.document_blocks,
        )

    def _family(
        self, family: GaugeMetricFamily | CounterMetricFamily, value: float
    ) -> GaugeMetricFamily | CounterMetricFamily:
        family.add_metric([self._model_name], value)
        return family


def exposition_with_upstreams(registry: CollectorRegistry, scraped: list[tuple[str, str]]) -> bytes:
    """Our registry's text plus each upstream's ``vllm:*`` series, labelled ``upstream="<url>"``.

    A family both sides export (``vllm:num_requests_running``, ...) becomes one family: ours are the
    service's view (no ``upstream`` label), the engine's own carry the label, so PromQL can pick
    either (``vllm:num_requests_waiting{upstream!=""}`` is the engine queue autoscalers want).
    """
    families: dict[str, Metric] = {family.name: family for family in registry.collect()}
    for source, text in scraped:
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:  # a replica answered something that is not Prometheus text
            continue
        for family in parsed:
            if not family.name.startswith("vllm:"):
                continue
            labelled = [
                Sample(s.name, {**s.labels, "upstream": source}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]
            mine = families.get(family.name)
            if mine is None:
                family.samples = labelled
                families[family.name] = family
            elif mine.type == family.type:
                mine.samples = [*mine.samples, *labelled]
    return generate_latest(_Families(list(families.values())))


class _Families:
    """What ``generate_latest`` needs: something with ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
