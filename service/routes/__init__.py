"""HTTP routes: health, the v1 REST API, the Open Inference Protocol (v2) and /metrics."""
