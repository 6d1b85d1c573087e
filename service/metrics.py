"""Prometheus metrics, defined once per app on a dedicated registry (names fixed by docs/PRODUCT.md).

Labels are low-cardinality by construction: route templates (never raw paths), status codes, model names (the
repository's folders), stage and layer names from the bundle, verdict in {adversarial, benign}. No label ever
carries a request id or image hash. Every metric of a model's work carries its ``model`` label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["EVENT_DROP_REASONS", "LATENCY_BUCKETS", "STAGES", "Metrics", "ModelMetrics"]

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_UNIT_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
STAGES = ("decode", "classify", "effective_path", "nic", "total")
EVENT_DROP_REASONS = (
    "detection_failed",
    "shadow_backlog",
    "unfinished",
    "sink_backlog_full",
    "retries_exhausted",
    "sink_rejected",
    "shutdown",
)


class Metrics:
    """All service metrics on one private :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._info: dict[str, tuple[str, str, str, str]] = {}  # model -> bundle_info labels
        r = self.registry
        self.requests = Counter("pathguard_requests", "HTTP requests answered.", ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "pathguard_request_duration_seconds",
            "Time from request start to response start.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "pathguard_stage_duration_seconds",
            "Time per processing stage (per request; batched stages count once per request in the batch).",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter("pathguard_verdicts", "Detection verdicts.", ["model", "verdict"], registry=r)
        self.detection_score = Histogram(
            "pathguard_detection_score",
            "Fused detection score in [0, 1].",
            ["model"],
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.path_similarity = Histogram(
            "pathguard_layer_path_similarity",
            "Rank-1 effective-path similarity per layer.",
            ["model", "layer"],
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.violation = Histogram(
            "pathguard_layer_violation_probability",
            "NIC invariant violation probability per layer (value) or layer pair (provenance).",
            ["model", "layer", "invariant"],
            buckets=_UNIT_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter("pathguard_cache_hits", "Verdict cache hits.", ["model"], registry=r)
        self.cache_misses = Counter("pathguard_cache_misses", "Verdict cache misses.", ["model"], registry=r)
        self.redis_errors = Counter("pathguard_redis_errors", "Failed Redis operations.", registry=r)
        self.shadow_dropped = Counter(
            "pathguard_shadow_dropped",
            "Shadow-mode verdicts dropped because the shadow backlog was full (their predictions were answered).",
            ["model"],
            registry=r,
        )
        self.flagged_dropped = Counter(
            "pathguard_flagged_dropped",
            "Flagged inputs not recorded in the stream: reason = no_redis (none configured), backlog_full (the "
            "in-memory delivery backlog), spool_full (the spool's byte or entry bound), spool_error (disk error).",
            ["reason"],
            registry=r,
        )
        self.spool_entries = Gauge(
            "pathguard_spool_entries", "Flagged entries waiting in the spool for Redis.", registry=r
        )
        self.spool_bytes = Gauge("pathguard_spool_bytes", "Size of the spool file in bytes.", registry=r)
        self.background_dropped = Counter(
            "pathguard_background_dropped",
            "After-response tasks (cache writes, flagged entries, shadow verdicts) not started because "
            "PATHGUARD_MAX_BACKGROUND_TASKS were already running.",
            registry=r,
        )
        self.rejected = Counter(
            "pathguard_rejected_concurrency",
            "HTTP requests answered 503 before their body was read: PATHGUARD_MAX_CONCURRENT_REQUESTS were in flight.",
            registry=r,
        )
        self.onnx_split_failed = Gauge(
            "pathguard_onnx_split_failed",
            "1 when the ONNX graph could not be split at the checked taps, so every layer's checks wait for the "
            "whole forward pass (parallel checks lose their overlap); 0 otherwise.",
            ["model"],
            registry=r,
        )
        self.events_received = Counter(
            "pathguard_events_received",
            "Payload-logger CloudEvents accepted on POST /, by type: request (its images are checked) or response "
            "(no input in it: counted only).",
            ["type"],
            registry=r,
        )
        self.events_rejected = Counter(
            "pathguard_events_rejected",
            "Logger events answered 503 + Retry-After: PATHGUARD_EVENTS_BACKLOG events were waiting for detection, "
            "or the detection queue was full.",
            registry=r,
        )
        self.events_pending = Gauge(
            "pathguard_events_pending", "Accepted logger events whose detection has not finished.", registry=r
        )
        self.event_results = Counter(
            "pathguard_event_results",
            "Detection result events produced (one per image of an accepted logger event).",
            registry=r,
        )
        self.events_delivered = Counter(
            "pathguard_events_delivered",
            "Result events the sink (PATHGUARD_EVENTS_SINK) answered with a 2xx.",
            registry=r,
        )
        self.events_dropped = Counter(
            "pathguard_events_dropped",
            "Images of accepted logger events without a result (reason detection_failed, shadow_backlog, unfinished "
            "at shutdown), and result events not delivered (sink_backlog_full, retries_exhausted, sink_rejected, "
            "shutdown).",
            ["reason"],
            registry=r,
        )
        self.events_sink_backlog = Gauge(
            "pathguard_events_sink_backlog", "Result events waiting for delivery (in flight included).", registry=r
        )
        self.events_sink_failures = Counter(
            "pathguard_events_sink_failures",
            "Failed delivery attempts to the sink (connection error, timeout, 408, 429, 5xx); each is retried until "
            "PATHGUARD_EVENTS_SINK_ATTEMPTS.",
            registry=r,
        )
        self.inflight = Gauge("pathguard_inflight_requests", "Requests being processed.", registry=r)
        self.bundle_info = Gauge(
            "pathguard_bundle_info",
            "The bundle each model serves (value 1; name and version from its manifest).",
            ["model", "name", "version", "sha256"],
            registry=r,
        )
        self.model_ready = Gauge(
            "pathguard_model_ready", "1 while the model is loaded, warmed up and serving.", ["model"], registry=r
        )
        self.model_loads = Counter(
            "pathguard_model_loads",
            "Model loads (at start, by the repository poll or through the load API), by outcome: success (verified, "
            "loaded, warmed up and swapped in) or failed (the previous version, if any, kept serving).",
            ["model", "outcome"],
            registry=r,
        )
        for reason in ("no_redis", "backlog_full", "spool_full", "spool_error"):
            self.flagged_dropped.labels(reason=reason)
        for reason in EVENT_DROP_REASONS:
            self.events_dropped.labels(reason=reason)
        for kind in ("request", "response"):
            self.events_received.labels(type=kind)

    def for_model(self, model: str) -> ModelMetrics:
        """The metrics of one model's work (its series created at zero)."""
        return ModelMetrics(self, model)

    def set_bundle(self, model: str, name: str, version: str, sha256: str) -> None:
        """Publish the bundle ``model`` serves (replacing the one it served before)."""
        self.drop_bundle(model)
        self._info[model] = (model, name, version, sha256)
        self.bundle_info.labels(*self._info[model]).set(1)
        self.model_ready.labels(model=model).set(1)

    def drop_bundle(self, model: str) -> None:
        """``model`` serves nothing any more: its info series removed, ready 0."""
        labels = self._info.pop(model, None)
        if labels is not None:
            self.bundle_info.remove(*labels)
        self.model_ready.labels(model=model).set(0)


class ModelMetrics:
    """One model's view of :class:`Metrics`: the same series, with its ``model`` label filled in."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.cache_hits = metrics.cache_hits.labels(model=model)
        self.cache_misses = metrics.cache_misses.labels(model=model)
        self.shadow_dropped = metrics.shadow_dropped.labels(model=model)
        self.detection_score = metrics.detection_score.labels(model=model)
        self._verdicts = {v: metrics.verdicts.labels(model=model, verdict=v) for v in ("adversarial", "benign")}
        self._stages = {stage: metrics.stage_duration.labels(model=model, stage=stage) for stage in STAGES}
        for outcome in ("success", "failed"):
            metrics.model_loads.labels(model=model, outcome=outcome)

    def observe_stages(self, seconds: Mapping[str, float]) -> None:
        """Record the stage durations present in ``seconds`` (keys from :data:`STAGES`)."""
        for stage, value in seconds.items():
            if stage in self._stages:
                self._stages[stage].observe(value)

    def observe_detection(
        self,
        adversarial: bool,
        score: float,
        layers: Sequence[str],
        similarity: Sequence[float],
        value_violation: Mapping[str, float],
        provenance_violation: Mapping[str, float],
    ) -> None:
        """Record one image's verdict and per-layer scores."""
        m, model = self.metrics, self.model
        self._verdicts["adversarial" if adversarial else "benign"].inc()
        self.detection_score.observe(score)
        for layer, sim in zip(layers, similarity, strict=True):
            m.path_similarity.labels(model=model, layer=layer).observe(sim)
        for layer, p in value_violation.items():
            m.violation.labels(model=model, layer=layer, invariant="value").observe(p)
        for pair, p in provenance_violation.items():
            m.violation.labels(model=model, layer=pair, invariant="provenance").observe(p)
