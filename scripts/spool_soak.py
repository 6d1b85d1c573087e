"""Flagged-spool soak: `pathguard serve` on 127.0.0.1 with Redis configured but unreachable, random-noise images
(all flagged) sent for a fixed time; every interval prints the spool file's size, the server's RSS and the
dropped-entry counter, so one sees the spool reach its bound and stay flat there.

    .venv/bin/python scripts/spool_soak.py --seconds 600 --spool-max-bytes 20000000
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import reliability  # scripts/reliability.py: this script's folder is on sys.path when it runs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _noise(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--spool-max-bytes", type=int, default=20_000_000)
    ap.add_argument("--senders", type=int, default=2)
    args = ap.parse_args()
    rel = reliability
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool.jsonl"
        env = {
            "PATHGUARD_WARMUP_ROUNDS": "1",
            "PATHGUARD_REDIS_URL": f"redis://127.0.0.1:{rel.free_port()}/0",  # nothing listens there
            "PATHGUARD_SPOOL_MAX_BYTES": str(args.spool_max_bytes),
            "PATHGUARD_CACHE": "false",
            "PATHGUARD_ACCESS_LOG": "false",
        }
        server = rel.Server(ROOT / "artifacts" / "mnist-lenet5", Path(tmp), env).start()
        stop = threading.Event()
        sent = [0] * args.senders

        def send(k: int) -> None:
            rng = np.random.default_rng(k)
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    c.post("/v1/detect", content=_noise(rng), headers={"content-type": "image/png"})
                    sent[k] += 1

        threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(args.senders)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        print("t_s  sent  spool_bytes  spool_entries  dropped  rss_mb  log_lines")
        try:
            while time.monotonic() - t0 < args.seconds:
                time.sleep(args.interval)
                m = httpx.get(server.url + "/metrics", timeout=10).text
                size = spool.stat().st_size if spool.exists() else 0
                log_lines = len(server.log_path.read_text(errors="replace").splitlines())
                print(f"{time.monotonic() - t0:5.0f} {sum(sent):6d} {size:12d} "
                      f"{_metric(m, 'pathguard_spool_entries'):13.0f} "
                      f"{_metric(m, 'pathguard_flagged_dropped_total'):8.0f} {server.rss_mb():7.1f} {log_lines:9d}",
                      flush=True)  # fmt: skip
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
