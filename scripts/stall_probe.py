"""Event-loop stall probe: starts `pathguard serve` on 127.0.0.1 and, for a fixed time, sends at once the inputs that
are expensive to read (64-image batches of decode-heavy PNGs, 4 MB JSON bodies, deeply nested JSON, a lying
binary-extension header, a slow-drip upload) while probing /v2/health/live. Prints health p50 / p99 / max and the
status codes of everything sent; exits 1 when a target is missed (health p99 < 50 ms, max < 250 ms, no 5xx).

    .venv/bin/python scripts/stall_probe.py --seconds 30

Traffic goes to loopback only, from a bounded number of sender threads.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import reliability  # scripts/reliability.py: this script's folder is on sys.path when it runs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mnist-lenet5"


def _heavy_png() -> bytes:
    """2000x2000 of one colour: about 12 KB on the wire, 4 megapixels to decode."""
    buf = io.BytesIO()
    Image.new("L", (2000, 2000), 128).save(buf, format="PNG")
    return buf.getvalue()


def _bodies() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (path, httpx request keywords)."""
    infer = f"/v2/models/{MODEL}/infer"
    png = _heavy_png()
    numbers = json.dumps(
        {"inputs": [{"name": "input", "shape": [64, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 1_000_000}]}
    ).encode()[: 4 * 1024 * 1024 - 1]
    x = np.random.default_rng(0).random((64, 1, 28, 28)).astype(np.float32)
    valid = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 3136}}]}).encode()  # fmt: skip
    return {
        "png_batch": ("/v1/detect/batch", {"files": [("images", (f"{i}.png", png, "image/png")) for i in range(64)]}),
        "json_4mb": (infer, {"content": numbers}),
        "json_valid_64": (infer, {"content": valid}),
        "json_nested": (infer, {"content": b"[" * 200_000 + b"]" * 200_000}),
        "lying_header": (
            infer,
            {"content": header + bytes(3136), "headers": {"inference-header-content-length": str(len(header) + 999)}},
        ),
    }


def _sender(url: str, name: str, path: str, kw: dict[str, Any], stop: threading.Event, codes: Any) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            try:
                codes[name][c.post(path, **kw).status_code] += 1
            except httpx.HTTPError as exc:
                codes[name][type(exc).__name__] += 1


def _slow_drip(port: int, stop: threading.Event, codes: Any) -> None:
    """A PNG upload that declares 60 KB and sends 100 bytes every 50 ms, again and again."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                          b"Content-Length: 60000\r\n\r\n")  # fmt: skip
                for _ in range(40):
                    if stop.is_set():
                        break
                    s.sendall(b"\0" * 100)
                    time.sleep(0.05)
                codes["slow_drip"]["sent"] += 1
        except OSError as exc:
            codes["slow_drip"][type(exc).__name__] += 1


def _traffic(url: str, port: int, senders: int, seconds: float, out: Any) -> None:
    """Every kind of expensive input, from its own threads, for ``seconds``; status counts put into ``out``."""
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    stop = threading.Event()
    threads = [
        threading.Thread(target=_sender, args=(url, name, path, kw, stop, codes), daemon=True)
        for name, (path, kw) in _bodies().items()
        for _ in range(senders)
    ]
    threads.append(threading.Thread(target=_slow_drip, args=(port, stop, codes), daemon=True))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    out.put({k: dict(v) for k, v in codes.items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--senders", type=int, default=1, help="threads per kind of traffic")
    ap.add_argument("--bundle", default=str(ROOT / "artifacts" / MODEL))
    args = ap.parse_args()
    rel = reliability
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory() as tmp:
        server = rel.Server(Path(args.bundle), Path(tmp), {"PATHGUARD_WARMUP_ROUNDS": "1"}).start()
        try:
            # the traffic comes from another process, so the probe's own timings do not wait for its GIL
            queue: Any = multiprocessing.Queue()
            sender = multiprocessing.Process(
                target=_traffic, args=(server.url, server.port, args.senders, args.seconds + 2.0, queue)
            )
            sender.start()
            health: list[float] = []
            time.sleep(2.0)  # let every sender get going
            with httpx.Client(base_url=server.url, timeout=30) as c:
                deadline = time.perf_counter() + args.seconds
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    r = c.get("/v2/health/live")
                    health.append(time.perf_counter() - t0)
                    codes["health"][r.status_code] += 1
                    time.sleep(0.01)
            for name, counts in queue.get(timeout=180).items():
                codes[name].update(counts)
            sender.join(timeout=30)
        finally:
            server.stop()
    ms = np.array(health) * 1000.0
    p50, p99, worst = np.percentile(ms, 50), np.percentile(ms, 99), ms.max()
    fivexx = sum(n for c in codes.values() for code, n in c.items() if isinstance(code, int) and code >= 500)
    print(f"health: n={len(ms)} p50={p50:.1f} ms p99={p99:.1f} ms max={worst:.1f} ms")
    for name, counter in sorted(codes.items()):
        print(f"  {name}: {dict(counter)}")
    print(f"5xx: {fivexx}")
    ok = p99 < 50.0 and worst < 250.0 and fivexx == 0
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
