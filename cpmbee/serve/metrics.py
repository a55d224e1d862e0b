"""Prometheus metrics of one server (each app has its own registry, so several can live in one process)."""

from __future__ import annotations

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the server needs the `serve` extra: pip install 'cpmbee[serve]'") from err

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# HTTP status → the `reason` label of cpmbee_request_errors_total
ERROR_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large",
    415: "bad_content_type",
    422: "invalid_request",
    429: "queue_full",
    499: "client_disconnected",
    503: "unavailable",
    504: "timeout",
}


class ServeMetrics:
    """The server's counters, gauges and histograms; ``render()`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cpmbee_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.errors = Counter(
            "cpmbee_request_errors", "Requests that failed, by reason", ["endpoint", "reason"], registry=r
        )
        self.latency = Histogram(
            "cpmbee_request_duration_seconds",
            "Time from request to the end of the response (whole stream included)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "cpmbee_queue_wait_seconds",
            "Time a request waited before its batch started",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_text = Histogram(
            "cpmbee_time_to_first_text_seconds",
            "Time from submission to the first streamed text",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("cpmbee_queue_depth", "Requests waiting for the model", registry=r)
        self.running = Gauge("cpmbee_running_requests", "Requests in the batch being generated", registry=r)
        self.batch_rows = Histogram(
            "cpmbee_batch_rows", "Inputs (rows) per batched generate call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "cpmbee_batch_requests", "Requests per batched generate call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "cpmbee_batch_duration_seconds",
            "Wall time of one batched generate call",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_passes = Counter("cpmbee_forward_passes", "Forward passes of the model", registry=r)
        self.prompt_tokens = Counter("cpmbee_prompt_tokens", "Prompt tokens encoded (prefill)", registry=r)
        self.generated_tokens = Counter(
            "cpmbee_generated_tokens", "Token positions decoded (every beam counts)", registry=r
        )

    def observe_response(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            reason = ERROR_REASONS.get(status, "internal" if status >= 500 else "bad_request")
            self.errors.labels(endpoint, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
