#!/usr/bin/env python3
"""Reliability runs against a real `pathguard serve` process on localhost; prints the figures as JSON.

Scenarios (each starts its own server on a free port and stops it afterwards):

  schemathesis   property-based requests generated from the service's OpenAPI schema; counts cases and 5xx
  load           fixed request rate on /v1/detect (open loop), then an overload burst: errors, p50/p99, RSS trend,
                 503 + Retry-After when the queue is full, recovery afterwards
  redis-outage   load while a private redis-server is stopped and restarted: failed requests, flagged entries
                 answered vs. entries in the stream (lost must be 0)
  sigterm        SIGTERM during load: readiness, in-flight requests, exit code and time against the grace period
  tampered       start-up on a bundle with a flipped bit, a deleted or an unlisted file, a broken manifest, or a
                 consistently forged file + manifest under PATHGUARD_BUNDLE_SHA256: refused, naming the file

Examples (figures in docs/reliability.md):

  .venv/bin/python scripts/reliability.py load --rate 40 --duration 600 --json /tmp/load.json
  .venv/bin/python scripts/reliability.py redis-outage --rate 20 --duration 30 --down-at 8 --up-at 18
"""

# ruff: noqa: S603 - every command is built here from fixed executables and temporary paths

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pathguard.models.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "artifacts" / "mnist-lenet5"
FLAGGED_STREAM = "pathguard:flagged"
if "PATHGUARD_DATA_DIR" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["PATHGUARD_DATA_DIR"] = str(ROOT.parent / "shared" / "data")  # as the Makefile and tests do


# --- processes -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pathguard_command() -> list[str]:
    """The `pathguard` console script next to this interpreter, else the module entry point."""
    exe = Path(sys.executable).parent / "pathguard"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "pathguard.service.cli"]


class Server:
    """`pathguard serve` as a subprocess on a free localhost port, with its log in ``workdir``."""

    def __init__(self, bundle: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.bundle = bundle
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"pathguard-{self.port}.log"
        self.grpc_port = free_port()
        self.env = {
            "PATHGUARD_SPOOL_PATH": str(workdir / "spool.jsonl"),
            "PATHGUARD_GRPC_PORT": str(self.grpc_port),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        cmd = [*pathguard_command(), "serve", "--bundle", str(self.bundle), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-level", "info"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_") or k == "PATHGUARD_DATA_DIR"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        return self.proc

    def start(self, timeout_s: float = 240.0) -> Server:
        proc = self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pathguard exited with {proc.returncode} during start-up:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v2/health/ready", timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"pathguard not ready within {timeout_s} s:\n{self.log_tail()}")

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("VmRSS not found")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class RedisServer:
    """A private redis-server on a spare port with an fsync-always append-only file (stop/restart keeps data)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir)]
        args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        for _ in range(200):
            with contextlib.suppress(Exception):
                if client.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2.0)


# --- inputs ----------------------------------------------------------------------------------------------


def png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def mnist_images(n: int, noise_every: int = 0, seed: int = 0) -> list[bytes]:
    """``n`` MNIST test digits as PNG; with ``noise_every`` = k, every k-th image is uniform noise instead."""

    split = load_dataset("mnist", "test")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if noise_every and i % noise_every == noise_every - 1:
            out.append(png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
        else:
            out.append(png(np.round(split.x[i % len(split)][0] * 255).astype(np.uint8)))  # (1, 28, 28) -> (28, 28)
    return out


# --- load generation -------------------------------------------------------------------------------------


@dataclass
class Result:
    index: int
    sent_s: float  # since the start of the run
    latency_s: float
    status: int | None  # None: transport error
    error: str = ""
    retry_after: str | None = None
    request_id: str = ""
    adversarial: bool | None = None


def _record(index: int, t_run: float, t0: float, response: httpx.Response | None, exc: Exception | None) -> Result:
    r = Result(index, t0 - t_run, time.perf_counter() - t0, None)
    if exc is not None:
        r.error = type(exc).__name__
        return r
    assert response is not None
    r.status = response.status_code
    r.retry_after = response.headers.get("retry-after")
    r.request_id = response.headers.get("x-request-id", "")
    if r.status == 200:
        verdict = response.json().get("verdict")
        r.adversarial = None if verdict is None else bool(verdict["adversarial"])
    return r


async def send(client: httpx.AsyncClient, url: str, body: bytes, index: int, t_run: float, rid: str = "") -> Result:
    headers = {"Content-Type": "image/png"} | ({"X-Request-ID": rid} if rid else {})
    t0 = time.perf_counter()
    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return _record(index, t_run, t0, None, exc)
    return _record(index, t_run, t0, response, None)


def new_client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0))


async def fixed_rate(
    url: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    events: dict[float, Callable[[], Any]] | None = None,
    id_prefix: str = "r",
) -> list[Result]:
    """Open-loop load: request i starts at i / rate seconds whatever the answers; ``events`` run at their time."""
    pending = sorted((events or {}).items())
    tasks: list[asyncio.Task[Result]] = []
    async with new_client(512) as client:
        t_run = time.perf_counter()
        for i in range(int(rate * duration_s)):
            while pending and pending[0][0] <= i / rate:
                await _run_event(pending.pop(0)[1])
            delay = t_run + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = bodies[i % len(bodies)]
            tasks.append(asyncio.create_task(send(client, url, body, i, t_run, f"{id_prefix}{i:07d}")))
        for _, action in pending:
            await _run_event(action)
        return list(await asyncio.gather(*tasks))


async def _run_event(action: Callable[[], Any]) -> None:
    """Coroutine functions run on the loop (they must return quickly); blocking ones on a thread."""
    if asyncio.iscoroutinefunction(action):
        await action()
    else:
        await asyncio.to_thread(action)


async def burst(url: str, bodies: list[bytes], n: int) -> list[Result]:
    """``n`` requests at once, each on its own connection."""
    async with new_client(n) as client:
        t_run = time.perf_counter()
        jobs = [send(client, url, bodies[i % len(bodies)], i, t_run, f"b{i:06d}") for i in range(n)]
        return list(await asyncio.gather(*jobs))


def summarize(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    lat = np.array([r.latency_s for r in ok]) * 1000.0
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status is not None else f"error:{r.error}"
        statuses[key] = statuses.get(key, 0) + 1
    out: dict[str, Any] = {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok)}
    out["statuses"] = statuses
    if len(lat):
        for q in (50, 90, 99):
            out[f"p{q}_ms"] = round(float(np.percentile(lat, q)), 2)
        out["max_ms"] = round(float(lat.max()), 2)
    if results:
        span = max(r.sent_s + r.latency_s for r in results) - min(r.sent_s for r in results)
        out["achieved_rps"] = round(len(ok) / span, 2) if span > 0 else None
    return out


# --- scenarios -------------------------------------------------------------------------------------------


@dataclass
class RssTrend:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)

    def summary(self) -> dict[str, Any]:
        t = np.array([s[0] for s in self.samples])
        mb = np.array([s[1] for s in self.samples])
        half = t >= t[-1] / 2
        slope = float(np.polyfit(t[half], mb[half], 1)[0]) * 60.0 if half.sum() >= 3 else None
        return {
            "rss_start_mib": round(float(mb[0]), 1),
            "rss_end_mib": round(float(mb[-1]), 1),
            "rss_max_mib": round(float(mb.max()), 1),
            "rss_slope_second_half_mib_per_min": None if slope is None else round(slope, 3),
            "rss_samples": len(mb),
            "rss_by_minute_mib": [  # the last sample at or before each whole minute
                round(float(mb[max(0, int(np.searchsorted(t, m * 60.0, side="right")) - 1)]), 1)
                for m in range(int(t[-1] // 60) + 1)
            ],
        }


async def _sample_rss(server: Server, trend: RssTrend, every_s: float, stop: asyncio.Event) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        trend.samples.append((time.perf_counter() - t0, server.rss_mb()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    trend.samples.append((time.perf_counter() - t0, server.rss_mb()))


async def _load(server: Server, args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    url = server.url + "/v1/detect"
    await fixed_rate(url, bodies, args.rate, min(5.0, args.duration / 6), id_prefix="w")  # warm the pools
    trend, stop = RssTrend(), asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(server, trend, args.rss_every, stop))
    steady = await fixed_rate(url, bodies, args.rate, args.duration)
    stop.set()
    await sampler
    overload = await burst(url, bodies, args.burst)
    await asyncio.sleep(args.retry_after_s)
    recovery = await fixed_rate(url, bodies, min(args.rate, 20.0), min(5.0, args.duration / 4), id_prefix="c")
    over = summarize(overload)
    over["503_with_retry_after"] = sum(1 for r in overload if r.status == 503 and r.retry_after)
    over["retry_after_values"] = sorted({r.retry_after for r in overload if r.retry_after})
    return {"steady": summarize(steady), **trend.summary(), "overload": over, "recovery": summarize(recovery)}


def scenario_load(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    env = {"PATHGUARD_CACHE": "false", "PATHGUARD_QUEUE_SIZE": str(args.queue_size)}
    env["PATHGUARD_RETRY_AFTER_S"] = str(args.retry_after_s)
    bodies = mnist_images(args.images)
    server = Server(args.bundle, workdir, env).start()
    try:
        figures = asyncio.run(_load(server, args, bodies))
    finally:
        code = server.stop()
    config = {"rate_rps": args.rate, "duration_s": args.duration, "burst": args.burst, "queue_size": args.queue_size}
    return {"config": config, **figures, "exit_code": code}


async def _probe(client: httpx.AsyncClient, url: str, stop: asyncio.Event, every_s: float) -> list[Result]:
    """GET ``url`` every ``every_s`` seconds until ``stop``."""
    out: list[Result] = []
    t_run = time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            out.append(_record(len(out), t_run, t0, await client.get(url), None))
        except httpx.HTTPError as exc:
            out.append(_record(len(out), t_run, t0, None, exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return out


def malformed_oip_body(n_bytes: int) -> bytes:
    """A JSON inference request of about ``n_bytes`` whose data cannot match its declared shape."""
    n = n_bytes // 4
    head = b'{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ['
    return head + b",".join([b"0.5"] * n)[: n_bytes - len(head) - 4] + b"]}]}"


async def _malformed(server: Server, args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    stop = asyncio.Event()
    bad = malformed_oip_body(args.body_mb * 1024 * 1024 - 1024)
    infer = f"{server.url}/v2/models/{args.model}/infer"
    bad_results: list[Result] = []

    async def hammer(client: httpx.AsyncClient) -> None:
        t_run = time.perf_counter()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                bad_results.append(_record(len(bad_results), t_run, t0, await client.post(infer, content=bad), None))
            except httpx.HTTPError as exc:
                bad_results.append(_record(len(bad_results), t_run, t0, None, exc))

    async with new_client(64) as client:
        await fixed_rate(server.url + "/v1/detect", bodies, args.rate, 3.0, id_prefix="w")  # warm up
        tasks = [asyncio.create_task(hammer(client)) for _ in range(args.streams)]
        health = asyncio.create_task(_probe(client, server.url + "/v2/health/live", stop, 0.05))
        detect = await fixed_rate(server.url + "/v1/detect", bodies, args.rate, args.duration)
        stop.set()
        live = await health
        await asyncio.gather(*tasks)
    refused = np.array([r.latency_s for r in bad_results if r.status is not None]) * 1000.0
    latency = {f"refusal_p{q}_ms": round(float(np.percentile(refused, q)), 2) for q in (50, 99)} if len(refused) else {}
    return {"malformed": summarize(bad_results) | latency, "health_live": summarize(live), "detect": summarize(detect)}


def scenario_malformed_oip(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = Server(args.bundle, workdir, {"PATHGUARD_CACHE": "false"}).start()
    try:
        figures = asyncio.run(_malformed(server, args, mnist_images(args.images)))
    finally:
        code = server.stop()
    config = {"body_mib": args.body_mb, "streams": args.streams, "detect_rps": args.rate, "duration_s": args.duration}
    return {"config": config, **figures, "exit_code": code}


def _stream_ids(redis: RedisServer) -> list[str]:
    client = redis.client()
    entries = client.xrange(FLAGGED_STREAM, "-", "+")
    return [fields[b"id"].decode() for _, fields in entries]


def _wait_for_ids(redis: RedisServer, wanted: set[str], timeout_s: float) -> tuple[list[str], float]:
    t0 = time.monotonic()
    ids = _stream_ids(redis)
    while not wanted <= set(ids) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.5)
        ids = _stream_ids(redis)
    return ids, time.monotonic() - t0


def scenario_redis_outage(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    redis = RedisServer(workdir)
    redis.start()
    env = {"PATHGUARD_REDIS_URL": redis.url, "PATHGUARD_CACHE": "false", "PATHGUARD_TARGET_FPR": str(args.target_fpr)}
    bodies = mnist_images(args.images, noise_every=4)
    server = Server(args.bundle, workdir, env).start()
    timeline: dict[str, float] = {}
    t_start = time.perf_counter()

    def down() -> None:
        timeline["redis_stopped_s"] = round(time.perf_counter() - t_start, 2)
        redis.stop()

    def up() -> None:
        redis.start()
        timeline["redis_restarted_s"] = round(time.perf_counter() - t_start, 2)

    try:
        url = server.url + "/v1/detect"
        results = asyncio.run(fixed_rate(url, bodies, args.rate, args.duration, {args.down_at: down, args.up_at: up}))
        flagged = {r.request_id for r in results if r.adversarial}
        ids, waited = _wait_for_ids(redis, flagged, args.replay_timeout)
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
        spool = Path(server.env["PATHGUARD_SPOOL_PATH"])
        spool_left = len(spool.read_text().splitlines()) if spool.exists() else 0
    finally:
        code = server.stop()
        redis.stop()
    in_outage = [r for r in results if args.down_at <= r.sent_s < args.up_at]
    return {
        "config": {
            "rate_rps": args.rate,
            "duration_s": args.duration,
            "down_at_s": args.down_at,
            "up_at_s": args.up_at,
            "target_fpr": args.target_fpr,
        },
        "timeline": timeline,
        "requests": summarize(results),
        "requests_during_outage": summarize(in_outage),
        "flagged_answered": len(flagged),
        "flagged_during_outage": sum(1 for r in in_outage if r.adversarial),
        "flagged_in_stream": len(flagged & set(ids)),
        "lost_flagged": len(flagged - set(ids)),
        "duplicate_stream_entries": len(ids) - len(set(ids)),
        "replay_wait_s": round(waited, 2),
        "spool_lines_left": spool_left,
        "redis_errors_total": _metric(metrics, "pathguard_redis_errors_total"),
        "exit_code": code,
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def _poll_ready(url: str, stop: asyncio.Event, out: list[tuple[float, str]]) -> None:
    """Readiness every 20 ms on a fresh connection: (perf_counter time, status code or error name)."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=1.0) as client:
        while not stop.is_set():
            try:
                outcome = str((await client.get(url + "/v2/health/ready")).status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            out.append((time.perf_counter(), outcome))
            await asyncio.sleep(0.02)


SALVO_LEAD_S = 0.1  # the batch salvo goes out this long before SIGTERM


async def _sigterm_run(server: Server, args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    assert server.proc is not None
    proc = server.proc
    marks: dict[str, float] = {}
    exited = threading.Event()
    salvo: list[asyncio.Task[tuple[float, float, Any]]] = []
    salvo_client = new_client(args.salvo)

    def watch() -> None:
        proc.wait()
        marks["exit"] = time.perf_counter()
        exited.set()

    def term() -> None:
        marks["sigterm"] = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        threading.Thread(target=watch, daemon=True).start()

    async def fire_salvo() -> None:  # long requests that are surely in flight when SIGTERM arrives
        salvo.extend(asyncio.create_task(_batch(salvo_client, server.url, bodies)) for _ in range(args.salvo))

    polls: list[tuple[float, str]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_ready(server.url, stop, polls))
    events = {args.term_at - SALVO_LEAD_S: fire_salvo, args.term_at: term}
    results = await fixed_rate(server.url + "/v1/detect", bodies, args.rate, args.term_at + 2.0, events)
    batches = list(await asyncio.gather(*salvo))
    await salvo_client.aclose()
    in_time = await asyncio.to_thread(exited.wait, max(0.0, marks["sigterm"] + args.grace - time.perf_counter()))
    stop.set()
    await poller
    exit_s = marks["exit"] - marks["sigterm"] if in_time else None
    return _sigterm_figures(results, batches, polls, marks["sigterm"], proc.poll(), exit_s, args)


async def _batch(client: httpx.AsyncClient, url: str, bodies: list[bytes]) -> tuple[float, float, Any]:
    """One 32-image /v1/detect/batch request: (sent, done, status or error name)."""
    files = [("images", (f"{i}.png", bodies[i], "image/png")) for i in range(32)]
    sent = time.perf_counter()
    try:
        status: Any = (await client.post(url + "/v1/detect/batch", files=files)).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return sent, time.perf_counter(), status


def _sigterm_figures(
    results: list[Result],
    batches: list[tuple[float, float, Any]],
    polls: list[tuple[float, str]],
    t_sig: float,
    exit_code: int | None,
    exit_s: float | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    before = [r for r in results if r.sent_s < args.term_at]
    before_salvo = [r for r in before if r.sent_s < args.term_at - SALVO_LEAD_S]
    late = [r for r in before if r.sent_s >= args.term_at - SALVO_LEAD_S]
    in_flight = [r for r in before if r.sent_s + r.latency_s > args.term_at]
    after = [r for r in results if r.sent_s >= args.term_at]
    batch_in_flight = [s for t, done, s in batches if t < t_sig < done]
    after_polls = [(t - t_sig, o) for t, o in polls if t >= t_sig]
    first_not_ready = next(((t, o) for t, o in after_polls if o != "200"), None)
    return {
        "config": {"rate_rps": args.rate, "term_at_s": args.term_at, "grace_s": args.grace},
        "requests_sent_before_sigterm": summarize(before),
        "requests_sent_before_salvo": summarize(before_salvo),
        # sent while the salvo kept the event loop busy: a keep-alive connection whose request bytes the server had
        # not read yet when SIGTERM came is closed by uvicorn's shutdown (the client sees a ReadError)
        "requests_sent_after_salvo_before_sigterm": summarize(late),
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_completed_200": sum(1 for r in in_flight if r.status == 200),
        "in_flight_answered_not_200": sum(1 for r in in_flight if r.status is not None and r.status != 200),
        "batch_requests_sent_before_sigterm": sum(1 for t, _, _ in batches if t < t_sig),
        "batch_in_flight_at_sigterm": len(batch_in_flight),
        "batch_in_flight_completed_200": sum(1 for s in batch_in_flight if s == 200),
        "requests_sent_after_sigterm": summarize(after),
        "readiness_polls_before_sigterm_200": sum(1 for t, o in polls if t < t_sig and o == "200"),
        "readiness_first_not_ready_ms": None if first_not_ready is None else round(first_not_ready[0] * 1000, 1),
        "readiness_first_not_ready_outcome": None if first_not_ready is None else first_not_ready[1],
        "readiness_200_after_sigterm": sum(1 for _, o in after_polls if o == "200"),
        "exit_code": exit_code,
        "exit_after_sigterm_s": None if exit_s is None else round(exit_s, 2),
        "exited_within_grace": exit_s is not None and exit_s <= args.grace,
    }


def scenario_sigterm(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bodies = mnist_images(max(args.images, 32))
    server = Server(args.bundle, workdir, {"PATHGUARD_CACHE": "false"}).start()
    try:
        figures = asyncio.run(_sigterm_run(server, args, bodies))
        log = server.log_tail(6)
        figures["clean_shutdown"] = "Application shutdown complete." in log and "Finished server process" in log
        figures["log_tail"] = log.splitlines()
        return figures
    finally:
        server.stop()


def _tamper_cases(bundle: Path) -> Iterator[tuple[str, str, Callable[[Path], None], dict[str, str]]]:
    """(case, file the message must name, how to damage a copy of the bundle, extra server environment)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    target = sorted(manifest["files"], key=lambda f: (bundle / f).stat().st_size)[-1]  # the largest file
    bundle_id = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()

    def flip(root: Path) -> None:
        data = bytearray((root / target).read_bytes())
        data[len(data) // 2] ^= 0x01
        (root / target).write_bytes(bytes(data))

    def rewrite(root: Path) -> None:  # a consistent forgery: the file and its manifest entry both changed
        flip(root)
        forged = json.loads((root / "manifest.json").read_text())
        forged["files"][target]["sha256"] = hashlib.sha256((root / target).read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(forged, indent=2))

    yield "bit-flip", target, flip, {}
    yield "deleted", target, lambda root: (root / target).unlink(), {}
    yield "unlisted", "extra.bin", lambda root: (root / "extra.bin").write_bytes(b"\x00" * 16), {}
    yield "manifest", "manifest.json", lambda root: (root / "manifest.json").write_text("{"), {}
    yield "forged-pinned", "manifest.json", rewrite, {"PATHGUARD_BUNDLE_SHA256": bundle_id}


TAMPER_CASES = ("bit-flip", "deleted", "unlisted", "manifest", "forged-pinned")


def scenario_tampered(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cases = []
    for name, named_file, damage, env in _tamper_cases(args.bundle):
        if args.case and name not in args.case:
            continue
        copy = workdir / name / args.bundle.name
        shutil.copytree(args.bundle, copy)
        intact = subprocess.run([*pathguard_command(), "verify", str(copy)], capture_output=True, text=True)
        damage(copy)
        damaged = subprocess.run([*pathguard_command(), "verify", str(copy)], capture_output=True, text=True)
        server = Server(copy, workdir, env)
        t0 = time.perf_counter()
        code = server.launch().wait(120)
        message = server.log_tail(3).strip().splitlines()[-1] if server.log_path.stat().st_size else ""
        cases.append({
            "case": name,
            "pinned": bool(env),
            "intact_copy_verified": intact.returncode == 0,
            "damaged_copy_passes_verify": damaged.returncode == 0,
            "exit_code": code,
            "seconds_to_exit": round(time.perf_counter() - t0, 2),
            "message": message,
            "names_the_file": named_file in message,
        })  # fmt: skip
    return {"cases": cases, "refused": sum(1 for c in cases if c["exit_code"] not in (0, None))}


def scenario_schemathesis(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = Server(args.bundle, workdir).start()
    report = workdir / "schemathesis.ndjson"
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    cmd = [exe, "run", server.url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples"]
    cmd += [str(args.max_examples), "--seed", str(args.seed), "--workers", "1", "--no-shrink"]
    cmd += ["--report", "ndjson", "--report-ndjson-path", str(report), "--suppress-health-check", "all"]
    try:
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=args.timeout)  # its cache too
        seconds = time.perf_counter() - t0
        metrics = httpx.get(server.url + "/metrics", timeout=5).text
        schema = httpx.get(server.url + "/openapi.json", timeout=5).json()
    finally:
        server.stop()
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    operations = sum(1 for item in schema["paths"].values() for m in item if m in methods)
    statuses = _statuses_from_metrics(metrics)
    return {
        "config": {"max_examples": args.max_examples, "seed": args.seed},
        "exit_code": run.returncode,
        "seconds": round(seconds, 1),
        "operations_in_schema": operations,
        **_summary_numbers(run.stdout),
        "requests_recorded": _count_cases(report),
        "server_status_counts": statuses,
        "server_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "summary": [line for line in run.stdout.splitlines() if line.strip()][-8:],
    }


def _statuses_from_metrics(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("pathguard_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            status = labels.split('status="', 1)[1].split('"', 1)[0]
            out[status] = out.get(status, 0) + int(float(value))
    return out


def _count_cases(report: Path) -> int:
    """Requests schemathesis sent: the interactions recorded in its ``ScenarioFinished`` events."""
    total = 0
    for line in report.read_text().splitlines() if report.exists() else []:
        finished = json.loads(line).get("ScenarioFinished")
        if finished:
            total += len(finished.get("recorder", {}).get("interactions", {}))
    return total


def _summary_numbers(stdout: str) -> dict[str, int]:
    """'Tested: 12' and '401 generated, 401 passed' (plus failed/errored when present) from the run summary."""
    out: dict[str, int] = {}
    if m := re.search(r"Tested: (\d+)", stdout):
        out["operations_tested"] = int(m.group(1))
    if m := re.search(r"Test cases:\s*\n\s*(.+)", stdout):
        for count, word in re.findall(r"(\d+) (\w+)", m.group(1)):
            out[f"cases_{word}"] = int(count)
    return out


# --- command line ----------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "schemathesis": scenario_schemathesis,
    "load": scenario_load,
    "redis-outage": scenario_redis_outage,
    "sigterm": scenario_sigterm,
    "tampered": scenario_tampered,
    "malformed-oip": scenario_malformed_oip,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (load, redis-outage, sigterm)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of fixed-rate load")
    p.add_argument("--images", type=int, default=1000, help="distinct MNIST test images cycled through")
    p.add_argument("--burst", type=int, default=200, help="load: simultaneous requests of the overload burst")
    p.add_argument("--queue-size", type=int, default=32, help="load: PATHGUARD_QUEUE_SIZE of the server")
    p.add_argument("--retry-after-s", type=int, default=1, help="load: PATHGUARD_RETRY_AFTER_S of the server")
    p.add_argument("--rss-every", type=float, default=5.0, help="load: seconds between RSS samples")
    p.add_argument("--down-at", type=float, default=8.0, help="redis-outage: stop Redis at this second")
    p.add_argument("--up-at", type=float, default=18.0, help="redis-outage: restart Redis at this second")
    p.add_argument("--target-fpr", type=float, default=0.5, help="redis-outage: flag many inputs")
    p.add_argument("--replay-timeout", type=float, default=30.0, help="redis-outage: wait for the spool replay")
    p.add_argument("--term-at", type=float, default=5.0, help="sigterm: send SIGTERM at this second of load")
    p.add_argument("--salvo", type=int, default=8, help="sigterm: 32-image batch requests sent just before SIGTERM")
    p.add_argument("--grace", type=float, default=30.0, help="sigterm: grace period (Kubernetes default 30 s)")
    p.add_argument("--case", action="append", choices=TAMPER_CASES, help="tampered: only these cases (repeatable)")
    p.add_argument("--max-examples", type=int, default=20, help="schemathesis: cases per operation and phase")
    p.add_argument("--body-mb", type=int, default=4, help="malformed-oip: size of each malformed OIP body (MiB)")
    p.add_argument(
        "--streams", type=int, default=2, help="malformed-oip: clients sending malformed bodies back to back"
    )
    p.add_argument("--model", default="mnist-lenet5", help="malformed-oip: the served model's name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="schemathesis: whole-run timeout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pathguard-reliability-") as tmp:
        t0 = time.perf_counter()
        figures = SCENARIOS[args.scenario](args, Path(tmp))
        figures = {"scenario": args.scenario, "wall_s": round(time.perf_counter() - t0, 1), **figures}
    text = json.dumps(figures, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
