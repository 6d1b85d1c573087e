"""Payload-logger load: `pathguard serve` (a real server process) receives KServe logger CloudEvents at a fixed rate
while its result sink (a real HTTP server on a local port) is down half the time, then every result is accounted
for: delivered to the sink, or counted as dropped by the bounded retry.

    .venv/bin/python scripts/events_load.py --events 1000 --rate 50 --period 10 --out /tmp/events-load.json

The events alternate binary and structured content mode and V1 ``instances`` / V2 ``inputs`` bodies (MNIST test
images; every tenth one random noise, which the detector flags). The sink is up for ``period / 2`` seconds, then
down for as long (``--down refuse``: its port closed; ``--down 503``: it answers 503), and so on until the server's
backlog is empty. Exit status 1 when a logger request got a 5xx or a result is unaccounted for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import reliability  # scripts/reliability.py: this script's folder is on sys.path when it runs
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

ROOT = Path(__file__).resolve().parents[1]
SINK_DROPS = ("sink_backlog_full", "retries_exhausted", "sink_rejected", "shutdown")
DETECTION_DROPS = ("detection_failed", "shadow_backlog", "unfinished")


class FlakySink:
    """Records the result events it receives (id -> first arrival time, duplicates counted); :meth:`set_up`
    opens or closes its port (``refuse``) or switches it between 200 and 503 answers (``503``)."""

    def __init__(self, port: int, down: str) -> None:
        self.port, self.down = port, down
        self.url = f"http://127.0.0.1:{port}/"
        self.arrivals: dict[str, float] = {}
        self.duplicates = 0
        self.refused_503 = 0
        self.up = False
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if not sink.up:  # the 503 mode's down phase
                    sink.refused_503 += 1
                    self.send_response(503)
                else:
                    event = from_http_event(HTTPMessage({k.lower(): v for k, v in self.headers.items()}, body))
                    with sink._lock:
                        if event.get_id() in sink.arrivals:
                            sink.duplicates += 1
                        else:
                            sink.arrivals[event.get_id()] = time.monotonic()
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def set_up(self, up: bool) -> None:
        self.up = up
        if self.down == "503":
            if self._server is None:
                self._listen()
            return
        if up and self._server is None:
            self._listen()
        elif not up and self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _listen(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.down = "refuse"
        self.set_up(False)


def _events(n: int) -> list[tuple[str, CloudEvent]]:
    """``n`` logger events: (content mode, event), alternating modes and payload versions."""
    from pathguard.models.data import load_dataset

    x = load_dataset("mnist", "test").x  # (10000, 1, 28, 28)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.random((1, 28, 28)).astype(np.float32) if i % 10 == 9 else x[i % len(x)]
        if i % 2:
            data: dict[str, Any] = {"instances": [img.tolist()]}
        else:
            data = {
                "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": img.ravel().tolist()}]
            }
        attrs = {
            "type": "org.kubeflow.serving.inference.request",
            "source": "http://localhost:9081/",
            "id": f"load-{i}",
            "datacontenttype": "application/json",
            "inferenceservicename": "mnist-classifier",
            "namespace": "load",
        }
        out.append(("structured" if i % 4 >= 2 else "binary", CloudEvent(attrs, data)))
    return out


def _metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("pathguard_event") and not line.endswith("_created"):
            name, value = line.rsplit(" ", 1)
            if "_created" not in name:
                out[name] = float(value)
    return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=50.0, help="events per second")
    ap.add_argument("--period", type=float, default=10.0, help="sink up for half of it, then down for half")
    ap.add_argument("--down", choices=("refuse", "503"), default="refuse")
    ap.add_argument("--sink-attempts", type=int, help="PATHGUARD_EVENTS_SINK_ATTEMPTS (default: the server's)")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rel = reliability
    events = _events(args.events)
    sink = FlakySink(rel.free_port(), args.down)
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "PATHGUARD_WARMUP_ROUNDS": "1",
            "PATHGUARD_CACHE": "false",
            "PATHGUARD_ACCESS_LOG": "false",
            "PATHGUARD_EVENTS_SINK": sink.url,
        }
        if args.sink_attempts is not None:
            env["PATHGUARD_EVENTS_SINK_ATTEMPTS"] = str(args.sink_attempts)
        server = rel.Server(ROOT / "artifacts" / "mnist-lenet5", Path(tmp), env).start()
        stop = threading.Event()
        t0 = time.monotonic()

        def toggle() -> None:
            while not stop.is_set():
                phase = int((time.monotonic() - t0) / (args.period / 2))
                want = phase % 2 == 0  # up first
                if want != sink.up or (want and sink._server is None):
                    sink.set_up(want)
                time.sleep(0.01)

        toggler = threading.Thread(target=toggle, daemon=True)
        toggler.start()
        statuses: dict[int, int] = {}
        ack_s: list[float] = []
        sent_at: dict[str, float] = {}
        client = httpx.Client(base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=16))

        def send(i: int) -> None:
            mode, event = events[i]
            message = to_binary_event(event) if mode == "binary" else to_structured_event(event)
            start = time.monotonic()
            sent_at[event.get_id()] = start
            try:
                code = client.post("/", content=message.body, headers=message.headers).status_code
            except httpx.HTTPError:
                code = -1
            ack_s.append(time.monotonic() - start)
            statuses[code] = statuses.get(code, 0) + 1

        try:
            with ThreadPoolExecutor(16) as pool:
                for i in range(args.events):
                    delay = t0 + i / args.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(send, i)
            sent_s = time.monotonic() - t0
            deadline = time.monotonic() + args.drain_timeout
            m = _metrics(server.url)
            while time.monotonic() < deadline:
                m = _metrics(server.url)
                if m["pathguard_events_pending"] == 0 and m["pathguard_events_sink_backlog"] == 0:
                    break
                time.sleep(0.25)
            drained_s = time.monotonic() - t0
            rss_mb = server.rss_mb()
        finally:
            stop.set()
            toggler.join(timeout=5)
            client.close()
            server.stop()
            sink.close()
    summary = _summary(args, m, statuses, ack_s, sent_at, sink, sent_s, drained_s, rss_mb)
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["ok"] else 1


def _summary(args: Any, m: dict[str, float], statuses: dict[int, int], ack_s: list[float], sent_at: dict[str, float],
             sink: FlakySink, sent_s: float, drained_s: float, rss_mb: float) -> dict[str, Any]:  # fmt: skip
    accepted = m['pathguard_events_received_total{type="request"}']
    results = m["pathguard_event_results_total"]
    delivered = m["pathguard_events_delivered_total"]
    sink_dropped = {r: m[f'pathguard_events_dropped_total{{reason="{r}"}}'] for r in SINK_DROPS}
    detection_dropped = {r: m[f'pathguard_events_dropped_total{{reason="{r}"}}'] for r in DETECTION_DROPS}
    waiting = m["pathguard_events_sink_backlog"] + m["pathguard_events_pending"]
    delivery_s = [sink.arrivals[i] - sent_at[i] for i in sink.arrivals if i in sent_at]
    fivexx = sum(n for code, n in statuses.items() if code >= 500 or code < 0)
    accounted = (
        accepted == results + sum(detection_dropped.values())
        and results == delivered + sum(sink_dropped.values())
        and len(sink.arrivals) == delivered
        and waiting == 0
    )
    return {
        "events": args.events,
        "rate_per_s": args.rate,
        "sink_down": f"{args.down}, half of every {args.period:g} s",
        "sink_attempts": args.sink_attempts or "default (6)",
        "logger_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "logger_5xx": fivexx,
        "ack_ms_p50": round(_percentile(ack_s, 50) * 1000, 1),
        "ack_ms_p99": round(_percentile(ack_s, 99) * 1000, 1),
        "accepted": accepted,
        "results": results,
        "delivered": delivered,
        "received_by_sink": len(sink.arrivals),
        "duplicates_at_sink": sink.duplicates,
        "dropped": {**detection_dropped, **sink_dropped},
        "sink_failures": m["pathguard_events_sink_failures_total"],
        "delivery_s_p50": round(_percentile(delivery_s, 50), 2),
        "delivery_s_p99": round(_percentile(delivery_s, 99), 2),
        "delivery_s_max": round(max(delivery_s, default=float("nan")), 2),
        "sending_s": round(sent_s, 1),
        "all_accounted_s": round(drained_s, 1),
        "server_rss_mb": round(rss_mb, 1),
        "ok": accounted and fivexx == 0 and accepted == args.events,
    }


if __name__ == "__main__":
    sys.exit(main())
