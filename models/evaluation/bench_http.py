"""``pathguard bench``: latency and throughput of /v1/predict and /v1/detect over real HTTP.

For every bundle and check mode (parallel, serial) a real ``pathguard serve`` process is started on a spare port
(verdict cache off, no Redis, so every request does the full work), fed distinct PNG-encoded test images of the
bundle's dataset over keep-alive HTTP/1.1 connections, at concurrency 1 and 16. Predict and detect are measured
in alternating rounds so slow drifts of the machine hit both alike. The client runs on the same machine: its
own CPU use is part of the figures (the same for both routes).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pathguard.models.data import load_dataset

__all__ = ["MODES", "BenchConfig", "render_markdown", "run_bench"]

MODES = ("parallel", "serial", "graph", "guarded", "guarded-graph", "guarded-verdict", "stored")
STAGES = (
    "decode", "queue", "classify", "checks", "checks_wait", "nic", "effective_path", "mahalanobis", "consistency",
    "total",
)  # fmt: skip


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Parameters
    ----------
    bundles : sequence of Path
        Bundle folders to serve, one after the other.
    requests : int
        Timed requests per (route, concurrency, check mode), split over ``rounds`` alternating rounds.
    concurrency : sequence of int
        Client concurrency levels.
    modes : sequence of str
        Check modes, each served by its own server: ``parallel`` (per-layer checks beside the forward pass),
        ``serial`` (after it), ``graph`` (NIC's per-layer checks inside the onnx engine's graph,
        ``PATHGUARD_NIC_IN_GRAPH``), all three on the Python pipeline (``PATHGUARD_DETECT_GRAPH=off``);
        ``guarded`` (detection on the guarded graph, ``PATHGUARD_DETECT_GRAPH=on``, every component reported),
        ``guarded-graph`` and ``guarded-verdict`` (the same, reporting the graph's or the verdict's components only,
        ``PATHGUARD_REPORTED_COMPONENTS``); ``stored`` (the bundle's stored guarded graph, nothing beside it,
        ``PATHGUARD_DETECT_GRAPH=stored``).
    images : int
        Distinct test images cycled through.
    warmup : int
        Untimed requests per route before measuring.
    engine : str
        Classifier engine of the served bundle ('onnx' or 'torch').
    server_python : str, optional
        The interpreter that runs the servers (e.g. that of a virtualenv without torch, serving stored graphs);
        default: this one.
    """

    bundles: Sequence[Path]
    requests: int = 2000
    concurrency: Sequence[int] = (1, 16)
    modes: Sequence[str] = ("parallel", "serial")
    images: int = 1000
    warmup: int = 100
    rounds: int = 4
    engine: str = "onnx"
    extra_env: dict[str, str] = field(default_factory=dict)
    server_python: str | None = None


@dataclass
class Measurement:
    bundle: str
    mode: str
    route: str
    concurrency: int
    latencies_s: list[float]
    wall_s: float
    server_ms: dict[str, float]

    def row(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) * 1000.0
        return {
            "bundle": self.bundle,
            "checks": self.mode,
            "route": self.route,
            "concurrency": self.concurrency,
            "requests": len(lat),
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "throughput_rps": len(lat) / self.wall_s,
            "server_ms": self.server_ms,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _encode_images(dataset: str, n: int) -> list[bytes]:
    from PIL import Image

    split = load_dataset(dataset, "test")
    out = []
    for x in split.x[:n]:
        arr = np.round(x * 255).astype(np.uint8)  # (C, H, W)
        img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class _Server:
    """A ``pathguard serve`` subprocess."""

    def __init__(
        self, bundle: Path, mode: str, engine: str, extra_env: dict[str, str], python: str | None = None
    ) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_") or k.endswith("_DIR")}
        env.update(
            PATHGUARD_BUNDLE=str(bundle),
            PATHGUARD_PORT=str(self.port),
            PATHGUARD_PARALLEL_CHECKS=str(mode != "serial").lower(),
            PATHGUARD_NIC_IN_GRAPH=str(mode == "graph").lower(),
            PATHGUARD_DETECT_GRAPH="stored" if mode == "stored" else "on" if mode.startswith("guarded") else "off",
            PATHGUARD_REPORTED_COMPONENTS=mode.split("-", 1)[1] if "-" in mode else "all",
            PATHGUARD_CACHE="false",
            PATHGUARD_ENGINE=engine,
            **extra_env,
        )
        self.python = python or sys.executable
        cmd = [self.python, "-m", "pathguard.service.cli", "serve", "--log-level", "warning"]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env)  # noqa: S603 - our own interpreter and module
        self.ready_s = float("nan")

    def wait_ready(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pathguard serve exited with code {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    self.ready_s = time.perf_counter() - self.started
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def rss_mb(self) -> float:
        """The server process's resident memory now, in MB (NaN where /proc is not there)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
        return float("nan") if kb is None else kb / 1000.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _worker(port: int, route: str, images: list[bytes], start: int, n: int, out: list[float], srv: list[dict]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "image/png"}
    for k in range(n):
        body = images[(start + k) % len(images)]
        t0 = time.perf_counter()
        conn.request("POST", route, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise RuntimeError(f"{route}: HTTP {resp.status}: {data[:200]!r}")
        srv.append(json.loads(data)["timings_ms"])
    conn.close()


Loaded = tuple[list[float], float, list[dict[str, float]]]


def _load(port: int, route: str, images: list[bytes], n: int, conc: int, offset: int) -> Loaded:
    """``n`` requests spread over ``conc`` connections; returns latencies, wall time, server timings."""
    lats: list[list[float]] = [[] for _ in range(conc)]
    srv: list[list[dict]] = [[] for _ in range(conc)]
    per = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]
    threads = [
        threading.Thread(target=_worker, args=(port, route, images, offset + i * 7919, per[i], lats[i], srv[i]))
        for i in range(conc)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for lat in lats for x in lat], time.perf_counter() - t0, [x for s in srv for x in s]


def _median_timings(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: round(statistics.median(r[k] for r in rows if k in r), 3) for k in keys}


def _measure_server(
    cfg: BenchConfig, bundle: Path, mode: str, images: list[bytes], servers: list[dict[str, Any]]
) -> list[Measurement]:
    """Measure one server; its start-up (process start to ready: imports, verification, load, warm-up) and its
    resident memory after the measurements go to ``servers``."""
    server = _Server(bundle, mode, cfg.engine, cfg.extra_env, cfg.server_python)
    try:
        server.wait_ready()
        for route in ("/v1/predict", "/v1/detect"):
            _load(server.port, route, images, cfg.warmup, 1, 0)
        out = []
        for conc in cfg.concurrency:
            acc: dict[str, Loaded] = {r: ([], 0.0, []) for r in ("predict", "detect")}
            for rnd in range(cfg.rounds):
                for route in ("predict", "detect"):
                    n = cfg.requests // cfg.rounds
                    lat, wall, srv = _load(server.port, f"/v1/{route}", images, n, conc, rnd * n)
                    prev = acc[route]
                    acc[route] = (prev[0] + lat, prev[1] + wall, prev[2] + srv)
            for route, (lat, wall, srv) in acc.items():
                out.append(Measurement(bundle.name, mode, route, conc, lat, wall, _median_timings(srv)))
        servers.append({
            "bundle": bundle.name, "checks": mode, "python": server.python, "torch": _has_torch(server.python),
            "ready_s": round(server.ready_s, 2), "rss_mb": round(server.rss_mb(), 1),
        })  # fmt: skip
        return out
    finally:
        server.stop()


def _load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _contention() -> str:
    try:
        found = subprocess.run(["pgrep", "-af", "pathguard train"], capture_output=True, text=True, check=False)  # noqa: S607
    except OSError:
        return "unknown"
    lines = [ln for ln in found.stdout.splitlines() if "pgrep" not in ln]
    return "; ".join(f"{ln} ({_state(ln.split()[0])})" for ln in lines) if lines else "none"


def _state(pid: str) -> str:
    """``stopped`` for a process paused with SIGSTOP (it uses no CPU), else ``running``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "state unknown"
    return "stopped" if fields and fields[0] in ("T", "t") else "running"


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every measurement; returns a JSON-able report."""
    unknown = set(cfg.modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown check mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    names = [Path(b).name for b in cfg.bundles]
    same = sorted({n for n in names if names.count(n) > 1})
    if same:  # the rows and ratios are labelled by the bundle's folder name
        raise ValueError(f"two bundles in folders named {same}: give each its own folder name")
    rows = []
    servers: list[dict[str, Any]] = []
    load_before = _load_average()
    for bundle in cfg.bundles:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        images = _encode_images(str(manifest["dataset"]), cfg.images)
        for mode in cfg.modes:
            rows += [m.row() for m in _measure_server(cfg, Path(bundle), mode, images, servers)]
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "engine": cfg.engine,
        "requests_per_cell": cfg.requests,
        "training_running": _contention(),
        "load_average": {"before": load_before, "after": _load_average()},
        "rows": rows,
        "ratios": _ratios(rows),
        "servers": servers,
    }


def _has_torch(python: str) -> bool:
    """Whether torch is importable by the interpreter ``python``."""
    code = "import importlib.util as u; print(u.find_spec('torch') is not None)"
    found = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)  # noqa: S603
    return found.stdout.strip() == "True"


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """p50(detect) / p50(predict) per bundle, check mode and concurrency."""
    index = {(r["bundle"], r["checks"], r["route"], r["concurrency"]): r for r in rows}
    out = []
    for (b, checks, route, conc), r in index.items():
        if route != "detect" or (b, checks, "predict", conc) not in index:
            continue
        base = index[(b, checks, "predict", conc)]
        out.append({
            "bundle": b, "checks": checks, "concurrency": conc, "p50_ratio": r["p50_ms"] / base["p50_ms"],
            "throughput_ratio": r["throughput_rps"] / base["throughput_rps"],
        })  # fmt: skip
    return out


def render_markdown(report: dict[str, Any], command: str) -> str:
    """The report as the docs/bench.md page: latency and throughput per cell, the ratios of detect to predict,
    and the server's median stage times of every detect cell (``timings_ms`` of the responses)."""
    load = report.get("load_average", {})
    lines = [
        "# Detection overhead benchmark",
        "",
        f"Measured {report['created_at']} on {report['machine']['cpus']} CPU cores "
        f"({report['machine']['platform']}, Python {report['machine']['python']}), engine `{report['engine']}`, "
        f"{report['requests_per_cell']} requests per cell, distinct test images, verdict cache off, no Redis.",
        f"Other load on the machine (`pathguard train`): {report['training_running']}; load average (1, 5, 15 min) "
        f"before {load.get('before', 'unknown')}, after {load.get('after', 'unknown')}.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| bundle | checks | route | concurrency | p50 ms | p99 ms | throughput req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['bundle']} | {r['checks']} | /v1/{r['route']} | {r['concurrency']} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['throughput_rps']:.0f} |"
        )
    lines += [
        "",
        "| bundle | checks | concurrency | p50(detect) / p50(predict) | throughput(detect) / throughput(predict) |",
        "|---|---|---|---|---|",
    ]
    for q in report["ratios"]:
        lines.append(
            f"| {q['bundle']} | {q['checks']} | {q['concurrency']} | {q['p50_ratio']:.2f} | "
            f"{q.get('throughput_ratio', float('nan')):.2f} |"
        )
    if report.get("servers"):
        lines += [
            "",
            "Servers: start-up (process start to ready: imports, bundle verification and load, warm-up) and resident "
            "memory after the measurements:",
            "",
            "| bundle | checks | torch installed | ready s | RSS MB |",
            "|---|---|---|---|---|",
        ]
        for s in report["servers"]:
            lines.append(
                f"| {s['bundle']} | {s['checks']} | {'yes' if s['torch'] else 'no'} | {s['ready_s']:.2f} | "
                f"{s['rss_mb']:.0f} |"
            )
    lines += [
        "",
        "Server-side stages (median `timings_ms` of the responses; `classify`, `checks` and its parts are per "
        "batch; `checks_wait`, `nic` and `effective_path` are parts of `checks`):",
        "",
    ]
    stages = [k for k in STAGES if any(k in r["server_ms"] for r in report["rows"])]  # those some server reported
    lines += [
        "| bundle | checks | route | concurrency | " + " | ".join(stages) + " |",
        "|---|---|---|---|" + "---|" * len(stages),
    ]
    for r in report["rows"]:
        srv = r["server_ms"]
        cells = " | ".join(f"{srv[k]:.2f}" if k in srv else "" for k in stages)
        lines.append(f"| {r['bundle']} | {r['checks']} | /v1/{r['route']} | {r['concurrency']} | {cells} |")
    return "\n".join(lines) + "\n"
