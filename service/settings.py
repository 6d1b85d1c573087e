"""Service configuration: typed settings read from ``PATHGUARD_*`` environment variables.

Every field maps to one variable, e.g. ``bundle`` <- ``PATHGUARD_BUNDLE``, ``redis_url`` <- ``PATHGUARD_REDIS_URL``.
Build a :class:`Settings` explicitly (``Settings(port=9000)``) or from the environment (``Settings()``);
nothing reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Configuration of the detection service (environment prefix ``PATHGUARD_``)."""

    model_config = SettingsConfigDict(env_prefix="PATHGUARD_", extra="forbid", frozen=True)

    # --- what to serve -------------------------------------------------------------------------------
    bundle: Path = Field(
        default=Path("artifacts/mnist-lenet5"),
        description="Bundle folder to serve; verified against its manifest before anything is loaded.",
    )
    bundle_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Pin: the expected bundle id (sha256 of its manifest.json, as in /v1/model and "
        "pathguard_bundle_info). When set, the server refuses to start on any other bundle.",
    )
    model_repository: Path | None = Field(
        default=None,
        description="A model repository: one bundle per model as DIR/<name>/ or DIR/<name>/<version>/ (the highest "
        "integer version is served); the folder name is the model's name. Set, it replaces PATHGUARD_BUNDLE.",
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        default="none",
        description="How the repository's models are loaded: 'none' (every model at start; a model that fails to "
        "load fails the start), 'poll' (the folder is watched: new, changed and removed models are loaded, "
        "reloaded and unloaded), 'explicit' (only PATHGUARD_LOAD_MODELS at start, then through POST "
        "/v2/repository/models/<name>/load and /unload).",
    )
    load_models: list[str] = Field(
        default_factory=list,
        description='explicit mode: the models loaded at start (a JSON list, e.g. \'["mnist", "cifar"]\'); the '
        "server is ready once they are.",
    )
    repository_poll_s: float = Field(
        default=5.0, gt=0.0, description="poll mode: seconds between two scans of the repository."
    )
    unload_drain_s: float = Field(
        default=30.0,
        ge=0.0,
        description="How long a replaced or unloaded model may finish the requests already on it before its "
        "batchers and runtime stop (requests still on it then fail with 503).",
    )
    engine: Literal["onnx", "torch"] = Field(
        default="onnx",
        description="Classifier runtime: 'onnx' (onnxruntime on the bundle's ONNX export, split into stages at the "
        "checked taps) or 'torch' (the bundle's safetensors weights, stepping through the named layers).",
    )
    mode: Literal["enforce", "shadow"] = Field(
        default="enforce",
        description="'enforce': /v1/detect answers with the verdict. 'shadow': the prediction is answered at once, "
        "the verdict is computed afterwards and only recorded (metrics and the flagged stream).",
    )
    target_fpr: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Override of the bundle's target false-positive rate (the threshold is re-derived from the "
        "bundle's calibration scores). Unset: the bundle's own threshold.",
    )
    noise_seed: int | None = Field(
        default=None,
        ge=0,
        description="Seed of the randomized components' noise (the consistency family's noise copies). Unset: "
        "drawn afresh for every batch, so a detector-aware attacker must average over it; set it for reproducible "
        "responses (tests, reports). A cached verdict is served as first computed either way.",
    )
    nic_members: Literal["fixed", "random"] = Field(
        default="fixed",
        description="NIC's detector member: 'fixed' scores every input with the unrandomized member; 'random' with "
        "one of the bundle's randomized members (NIC paper III-D: randomized quantization of each layer's "
        "activations), drawn per input (from the noise seed and the pixels when PATHGUARD_NOISE_SEED is set), so a "
        "detector-aware attacker must average over the members. Needs a bundle built with randomized members "
        "(--nic '{\"n_random\": 3}'); a bundle without them fails to load. NIC's per-layer checks then run after "
        "the forward pass (they depend on the member); not with PATHGUARD_NIC_IN_GRAPH.",
    )

    # --- network -------------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address `pathguard serve` binds to.")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port `pathguard serve` listens on.")
    grpc_port: int = Field(
        default=8081,
        ge=0,
        le=65535,
        description="TCP port of the Open Inference Protocol's gRPC service (GRPCInferenceService) on the same host; "
        "0 turns it off.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="If set, every route except /v2/health/* and the page (/, /static) needs "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>' (compared in constant time); otherwise 401. That "
        "includes /docs and /openapi.json.",
    )
    insecure: bool = Field(
        default=False,
        description="Allow `pathguard serve` to bind an address beyond loopback (e.g. 0.0.0.0) without "
        "PATHGUARD_API_KEY, i.e. with /v1, /v2, /metrics, /docs and /openapi.json open to the network. Without it, "
        "such a start is refused.",
    )
    docs: bool = Field(
        default=True,
        description="Serve the interactive API docs (/docs) and the OpenAPI schema (/openapi.json); behind the API "
        "key when one is set. False: both answer 404.",
    )

    # --- input limits --------------------------------------------------------------------------------
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest accepted request body in bytes; larger bodies get 413."
    )
    max_image_pixels: int = Field(
        default=4_000_000,
        ge=1,
        description="Largest accepted image (width x height), checked from the header before decoding; else 413.",
    )
    input_policy: Literal["convert", "strict"] = Field(
        default="convert",
        description="'convert': grayscale/RGB converted to the bundle's channels and images of the same aspect ratio "
        "resized to the bundle's height x width (other sizes: 422). 'strict': channels and size must match (else 422).",
    )
    max_request_images: int = Field(
        default=64,
        ge=1,
        description="Most images in one /v1/detect/batch or Open Inference Protocol request; else 413. At most "
        "PATHGUARD_MAX_BATCH_SIZE, so that no batch ever runs more images than that.",
    )
    max_concurrent_requests: int = Field(
        default=64,
        ge=1,
        description="Most HTTP requests (other than /v2/health/*, /metrics and the page) processed at once; beyond "
        "that, 503 + Retry-After before the body is read, so memory for request bodies stays under about this "
        "times PATHGUARD_MAX_BODY_BYTES. Also the gRPC server's maximum_concurrent_rpcs.",
    )

    # --- batching and parallelism ------------------------------------------------------------------
    max_batch_size: int = Field(
        default=64,
        ge=1,
        description="Most images the micro-batcher runs through the model at once (a hard cap: warm-up runs a batch "
        "of this size, and no request may carry more, see PATHGUARD_MAX_REQUEST_IMAGES).",
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="How long the micro-batcher waits for more requests after the first one arrived. 0 batches "
        "only what queued up while the previous batch ran (no added latency at low load).",
    )
    queue_size: int = Field(
        default=256,
        ge=1,
        description="Requests allowed to wait for the model; when full, new requests get 503 + Retry-After.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After value (seconds) sent with 503 answers.")
    worker_threads: int = Field(
        default=2,
        ge=1,
        description="Threads running the per-layer checks (and shadow-mode detection) beside the forward pass.",
    )
    parallel_checks: bool = Field(
        default=True,
        description="Start each layer's checks as soon as its activation exists, while the forward pass continues. "
        "False runs the checks serially after the forward pass (for comparison).",
    )
    shadow_backlog: int = Field(
        default=64,
        ge=1,
        description="Shadow mode: most batches whose verdicts may wait for the background finisher; the verdicts of "
        "a batch beyond that are dropped (pathguard_shadow_dropped_total) while its predictions are still answered.",
    )
    engine_threads: int = Field(
        default=1, ge=1, description="onnxruntime intra-op threads per stage session (1 is fastest for small models)."
    )
    onnx_providers: list[str] = Field(
        default=["auto"],
        min_length=1,
        description="onnx engine: onnxruntime execution providers in order of preference, as a JSON list, e.g. "
        '["CUDAExecutionProvider", "CPUExecutionProvider"]; ["auto"] (the default): CUDA where this onnxruntime '
        "build has it (the onnxruntime-gpu package), else the CPU. Providers this build lacks are left out with a "
        "warning; the CPU provider is always the last fallback. The detectors' own work stays on the CPU.",
    )
    detect_graph: Literal["auto", "on", "off", "stored"] = Field(
        default="auto",
        description="Serve detection from the guarded graph (the classifier, its consistency copies and every "
        "component with an in-graph form in ONE onnxruntime run per batch, built in memory at load from the bundle; "
        "`pathguard export --guarded` writes the same graph); the components with none (the supervised detector) and "
        "the exact Effective Path walk (faster outside the graph) then run beside it in Python. 'auto' (the "
        "default): when the onnx engine is used, NIC's members are fixed and the graph builds, else the Python "
        "pipeline "
        "(the reason is logged and shown by /v1/model); 'on': the same, but a model that cannot is refused at load; "
        "'off': always the Python pipeline. Scores agree with the pipeline's to float32 rounding (the graph's "
        "forward pass and softmax are onnxruntime's); the noise is drawn as the pipeline draws it. 'stored': the "
        "graph stored in the bundle (`pathguard export BUNDLE --in-bundle`), every component in it, noise drawn "
        "with numpy, nothing in Python beside it; components with no in-graph form are not reported. 'auto' "
        "serves a bundle's stored graph when it holds every component the answers report "
        "(PATHGUARD_REPORTED_COMPONENTS), and the engine is onnx and NIC's members fixed. A server without torch "
        "installed always serves the stored graph (and refuses a bundle without one, naming the command that "
        "stores it).",
    )
    reported_components: Literal["all", "graph", "verdict"] = Field(
        default="all",
        description="With detection served from the guarded graph, which components a response reports beside the "
        "verdict: 'all' (the default) every component of the bundle, those not in the graph (the exact "
        "Effective Path walk, the supervised detector) computed beside it; 'graph' those in the graph; "
        "'verdict' the verdict's own only. A component left out is not computed: its part of the response is null "
        "(effective_path, nic) or absent, and so are its OIP outputs, metrics and flagged-stream fields. The "
        "verdict is the same either way. No effect on the Python pipeline.",
    )
    nic_in_graph: bool = Field(
        default=False,
        description="onnx engine: compute NIC (reductions, value and provenance invariants, derived heads) inside the "
        "served ONNX graph, built in memory at start-up from the bundle's classifier.onnx and NIC arrays, so one "
        "onnxruntime run returns logits, taps and NIC's scores; only the softmax layer's checks and the final model "
        "run in torch afterwards. Scores agree with the per-layer torch checks to float32 rounding (a violation "
        "probability may move by one calibration step). False: NIC runs as per-layer torch checks "
        "(PATHGUARD_PARALLEL_CHECKS). No effect with the torch engine, nor with detection on the guarded graph "
        "(PATHGUARD_DETECT_GRAPH; NIC is in it).",
    )
    graph_inter_op_threads: int = Field(
        default=1,
        ge=1,
        description="With PATHGUARD_NIC_IN_GRAPH: onnxruntime inter-op threads of the session on the graph with NIC; "
        "above 1 its parallel executor runs each layer's checks beside the rest of the forward pass.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch.set_num_threads(value) at startup (torch engine and layer checks). Unset: the CPU cores "
        "available to the process divided by the threads that run torch beside each other (PATHGUARD_WORKER_THREADS "
        "plus the batcher's), at least 1, so they do not oversubscribe the cores.",
    )
    warmup_rounds: int = Field(
        default=3, ge=0, description="Forward + detection passes run at startup before ready flips."
    )

    access_log: bool = Field(
        default=True,
        description="One log line per request on the 'pathguard.access' logger (method, route template, status, "
        "duration, request id; never image data). `pathguard serve` prints it at --log-level info or lower.",
    )

    # --- Redis, cache and flagged stream ------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis URL, e.g. redis://127.0.0.1:6379/0. Unset: in-memory verdict cache, and flagged entries "
        "are only logged and counted.",
    )
    redis_timeout_s: float = Field(
        default=0.25,
        gt=0.0,
        description="Socket connect/read timeout of Redis calls: the most a dead Redis adds to one request "
        "(once per retry interval).",
    )
    redis_retry_s: float = Field(
        default=2.0,
        gt=0.0,
        description="After a Redis error, Redis is skipped for this long; then it is pinged and, once it answers, the "
        "spool is replayed into the stream.",
    )
    cache: bool = Field(
        default=True, description="Verdict cache on/off (enforce mode; keyed by bundle and image sha256)."
    )
    cache_ttl_s: int = Field(
        default=3600, ge=1, description="Lifetime of a cached verdict (Redis TTL / in-memory expiry)."
    )
    cache_max_entries: int = Field(default=10_000, ge=1, description="Capacity of the in-memory verdict cache (LRU).")
    stream_maxlen: int = Field(
        default=100_000, ge=1, description="Approximate cap of the flagged stream (XADD MAXLEN ~ value)."
    )
    stream_image_max_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        description="Images up to this size are stored in the flagged entry; larger ones are omitted.",
    )
    spool_path: Path = Field(
        default=Path(".pathguard/flagged-spool.jsonl"),
        description="File where flagged entries wait (JSON lines) while Redis is unreachable; replayed into the stream "
        "when Redis answers again.",
    )
    spool_max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=4096,
        description="Largest spool file in bytes; flagged entries beyond it are dropped and counted "
        '(pathguard_flagged_dropped_total{reason="spool_full"}).',
    )
    spool_max_entries: int = Field(
        default=100_000,
        ge=1,
        description="Most entries waiting in the spool; beyond it flagged entries are dropped and counted "
        "(reason spool_full).",
    )
    flag_backlog: int = Field(
        default=1024,
        ge=1,
        description="Most flagged entries waiting in memory for their XADD or spool write; beyond it they are dropped "
        "and counted (reason backlog_full).",
    )
    flag_backlog_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Most bytes of flagged entries (images included) waiting in memory; beyond it they are dropped "
        "and counted (reason backlog_full).",
    )
    max_background_tasks: int = Field(
        default=1024,
        ge=1,
        description="Most after-response tasks (cache writes, flagged entries, shadow-mode verdicts) running at once; "
        "beyond it new ones are not started and counted in pathguard_background_dropped_total.",
    )

    # --- CloudEvents: payload-logger events in (POST /), detection results out ---------------------
    events_backlog: int = Field(
        default=256,
        ge=1,
        description="Most accepted logger events (POST /) whose detection has not finished; beyond it new events get "
        "503 + Retry-After (counted in pathguard_events_rejected_total), as they do when the detection queue "
        "(PATHGUARD_QUEUE_SIZE) is full.",
    )
    events_sink: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="URL that receives one 'pathguard.detection.result' CloudEvent per image of every logger event "
        "(e.g. a Knative broker). Unset: results go to the metrics and the flagged stream only.",
    )
    events_sink_mode: Literal["binary", "structured"] = Field(
        default="binary",
        description="CloudEvents HTTP content mode of the result events: 'binary' (attributes in ce-* headers, the "
        "result as the JSON body) or 'structured' (one application/cloudevents+json body).",
    )
    events_source: str | None = Field(
        default=None,
        min_length=1,
        description="The 'source' attribute of the result events. Unset: '/pathguard/<bundle name>'.",
    )
    events_sink_timeout_s: float = Field(
        default=2.0, gt=0.0, description="Connect and read timeout of one delivery to the sink."
    )
    events_sink_attempts: int = Field(
        default=6,
        ge=1,
        description="Deliveries tried per result event (connection errors, timeouts, 408, 429 and 5xx are retried); "
        "a result still undelivered after them is dropped and counted "
        '(pathguard_events_dropped_total{reason="retries_exhausted"}). Another 4xx drops it at once '
        '(reason "sink_rejected").',
    )
    events_sink_backoff_s: float = Field(
        default=0.1,
        gt=0.0,
        description="Wait after the first failed delivery; doubled after each further consecutive failure up to "
        "PATHGUARD_EVENTS_SINK_BACKOFF_MAX_S. While the sink fails, one delivery at a time probes it; the first "
        "success resets the wait and restores PATHGUARD_EVENTS_SINK_CONCURRENCY.",
    )
    events_sink_backoff_max_s: float = Field(
        default=2.0, gt=0.0, description="Longest wait between two delivery attempts while the sink fails."
    )
    events_sink_concurrency: int = Field(default=4, ge=1, description="Deliveries to a healthy sink in flight at once.")
    events_sink_backlog: int = Field(
        default=10_000,
        ge=1,
        description="Most result events waiting for delivery in memory; beyond it new results are dropped and "
        'counted (pathguard_events_dropped_total{reason="sink_backlog_full"}).',
    )
    events_drain_s: float = Field(
        default=10.0,
        ge=0.0,
        description="At shutdown: how long pending logger events may finish and waiting results be delivered; what "
        'is left is counted as dropped (reason "shutdown").',
    )

    @model_validator(mode="after")
    def _members_outside_the_graph(self) -> Settings:
        if self.nic_members == "random" and self.nic_in_graph:
            raise ValueError(
                "nic_members 'random' needs NIC outside the graph (the served graph scores the fixed member): "
                "unset PATHGUARD_NIC_IN_GRAPH"
            )
        return self

    @model_validator(mode="after")
    def _request_fits_a_batch(self) -> Settings:
        if self.max_request_images > self.max_batch_size:
            raise ValueError(
                f"max_request_images ({self.max_request_images}) must not exceed max_batch_size "
                f"({self.max_batch_size}): one request runs as one batch"
            )
        return self
