#!/usr/bin/env python3
"""Model repository runs against real `pathguard serve` processes on localhost; prints the figures as JSON.

Scenarios:

  reload   fixed-rate /v1/detect on one model of an explicit-mode repository while it is swapped twice to a new
           version and once offered a corrupt one: failed requests (must be 0), which version answered each
           request (every answer must come from a fully loaded version: one whose load succeeded), the corrupt
           load refused with the old version serving, RSS after each step
  multi    five bundles in one server against five servers of one bundle each: RSS of each (after warm-up and
           the same requests), and the one server's RSS after unloading four of its five models

    .venv/bin/python scripts/repository_load.py reload --rate 20 --duration 60 --json /tmp/reload.json
    .venv/bin/python scripts/repository_load.py multi --models 5 --json /tmp/multi.json

The bundles are copies of artifacts/mnist-lenet5; a new "version" is the same bundle with another ``version`` in
its manifest (so another bundle id), the corrupt one a copy with one byte of an array file flipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import reliability  # scripts/reliability.py: this script's folder is on sys.path when it runs

from pathguard.models.bundle import MANIFEST, bundle_sha256, verify_bundle

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "artifacts" / "mnist-lenet5"


def make_version(dst: Path, version: str, corrupt: bool = False) -> str | None:
    """A copy of the MNIST bundle at ``dst`` whose manifest says ``version``; its bundle id (None if corrupt)."""
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.copytree(BUNDLE, tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    manifest["version"] = version
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if corrupt:
        victim = sorted(p for p in tmp.iterdir() if p.suffix == ".npz")[0]
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        verify_bundle(tmp)
    tmp.rename(dst)  # appears whole
    return None if corrupt else bundle_sha256(dst)


def repository_server(repo: Path, workdir: Path, mode: str, load: list[str]) -> reliability.Server:
    env = {
        "PATHGUARD_MODEL_REPOSITORY": str(repo),
        "PATHGUARD_MODEL_CONTROL_MODE": mode,
        "PATHGUARD_LOAD_MODELS": json.dumps(load),
        "PATHGUARD_CACHE": "false",
    }
    return reliability.Server(BUNDLE, workdir, env)


async def _send(client: httpx.AsyncClient, url: str, body: bytes, i: int, t_run: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"i": i, "sent_s": t0 - t_run}
    try:
        resp = await client.post(url, content=body, headers={"Content-Type": "image/png"})
    except httpx.HTTPError as exc:
        return out | {"status": None, "error": type(exc).__name__, "latency_s": time.perf_counter() - t0}
    out |= {"status": resp.status_code, "latency_s": time.perf_counter() - t0}
    if resp.status_code == 200:
        body_json = resp.json()
        out |= {"version": body_json["model"]["version"], "sha256": body_json["model"]["bundle_sha256"]}
        out["has_verdict"] = body_json.get("verdict") is not None
    else:
        out["error"] = resp.text[:200]
    return out


async def _load_api(url: str, name: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=120.0) as client:
        t0 = time.perf_counter()
        resp = await client.post(f"{url}/v2/repository/models/{name}/load")
        return {"status": resp.status_code, "seconds": round(time.perf_counter() - t0, 2), "body": resp.json()}


def scenario_reload(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    repo = workdir / "repo"
    (repo / "m").mkdir(parents=True)
    good = {"1": make_version(repo / "m" / "1", "1")}
    server = repository_server(repo, workdir, "explicit", ["m"]).start()
    bodies = reliability.mnist_images(64)
    steps: list[dict[str, Any]] = []

    async def step(kind: str, version: str) -> None:
        t = time.perf_counter()
        if kind == "swap":
            good[version] = await asyncio.to_thread(make_version, repo / "m" / version, version)
        else:
            await asyncio.to_thread(make_version, repo / "m" / version, version, True)
        answer = await _load_api(server.url, "m")
        if kind == "corrupt":  # out of the way, so the next swap loads the next good version
            await asyncio.to_thread(shutil.rmtree, repo / "m" / version)
        steps.append({"kind": kind, "version": version, "at_s": round(t - t_run, 2), "load_status": answer["status"],
                      "load_seconds": answer["seconds"], "error": answer["body"].get("error"),
                      "rss_mib": round(server.rss_mb(), 1)})  # fmt: skip

    async def run() -> list[dict[str, Any]]:
        nonlocal t_run
        url = server.url + "/v1/detect?model=m"
        plan = {args.duration * 0.2: ("swap", "2"), args.duration * 0.45: ("corrupt", "3"),
                args.duration * 0.7: ("swap", "4")}  # fmt: skip
        tasks, events = [], []
        async with reliability.new_client(256) as client:
            t_run = time.perf_counter()
            pending = sorted(plan.items())
            for i in range(int(args.rate * args.duration)):
                while pending and pending[0][0] <= i / args.rate:
                    events.append(asyncio.create_task(step(*pending.pop(0)[1])))
                delay = t_run + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_send(client, url, bodies[i % len(bodies)], i, t_run)))
            await asyncio.gather(*events)
            return list(await asyncio.gather(*tasks))

    t_run = 0.0
    rss_start = server.rss_mb()
    try:
        results = asyncio.run(run())
        index = httpx.post(server.url + "/v2/repository/index", timeout=10).json()
        stats = httpx.get(server.url + "/v2/models/m/stats", timeout=10).json()["model_stats"][0]
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
    ok = [r for r in results if r["status"] == 200]
    loaded = {(v, sha) for v, sha in good.items()}
    by_version: dict[str, int] = {}
    for r in ok:
        by_version[r["version"]] = by_version.get(r["version"], 0) + 1
    lat = np.array([r["latency_s"] for r in ok]) * 1000.0
    loads = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("pathguard_model_loads_total{")}  # fmt: skip
    return {
        "rate": args.rate,
        "duration_s": args.duration,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "failures": [r for r in results if r["status"] != 200][:5],
        "answers_by_version": by_version,
        "answers_from_a_loaded_version": sum(1 for r in ok if (r["version"], r["sha256"]) in loaded),
        "answers_without_verdict": sum(1 for r in ok if not r["has_verdict"]),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "max_ms": round(float(lat.max()), 2) if len(lat) else None,
        "steps": steps,
        "rss_start_mib": round(rss_start, 1),
        "final_index": index,
        "final_stats": {k: stats[k] for k in ("version", "inference_count", "execution_count")},
        "model_loads": loads,
    }


def _warm(url: str, bodies: list[bytes], model: str, n: int) -> None:
    with httpx.Client(timeout=60.0) as client:
        for i in range(n):
            resp = client.post(f"{url}/v1/detect?model={model}", content=bodies[i % len(bodies)],
                               headers={"Content-Type": "image/png"})  # fmt: skip
            resp.raise_for_status()


def scenario_multi(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    names = [f"m{i}" for i in range(args.models)]
    repo = workdir / "repo"
    repo.mkdir()
    for name in names:
        shutil.copytree(BUNDLE, repo / name)
    bodies = reliability.mnist_images(64)
    out: dict[str, Any] = {"models": args.models, "requests_per_model": args.requests}

    one = repository_server(repo, workdir, "explicit", names).start()
    try:
        for name in names:
            _warm(one.url, bodies, name, args.requests)
        time.sleep(1.0)
        out["one_server_rss_mib"] = round(one.rss_mb(), 1)
        for name in names[1:]:
            httpx.post(f"{one.url}/v2/repository/models/{name}/unload", timeout=120).raise_for_status()
        time.sleep(1.0)
        out["one_server_after_unloading_all_but_one_rss_mib"] = round(one.rss_mb(), 1)
        for name in names[1:]:
            httpx.post(f"{one.url}/v2/repository/models/{name}/load", timeout=120).raise_for_status()
            _warm(one.url, bodies, name, args.requests)
        time.sleep(1.0)
        out["one_server_after_reloading_them_rss_mib"] = round(one.rss_mb(), 1)
    finally:
        one.stop()

    separate = []
    try:
        for name in names:  # one at a time, all running together at the end (each its own process)
            server = reliability.Server(repo / name, workdir, {"PATHGUARD_CACHE": "false"}).start()
            separate.append(server)
            _warm(server.url, bodies, "", args.requests)
        time.sleep(1.0)
        out["separate_servers_rss_mib"] = [round(s.rss_mb(), 1) for s in separate]
    finally:
        for s in separate:
            s.stop()
    out["separate_servers_sum_mib"] = round(sum(out["separate_servers_rss_mib"]), 1)
    out["one_server_share_of_sum"] = round(out["one_server_rss_mib"] / out["separate_servers_sum_mib"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("reload")
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--json")
    p = sub.add_parser("multi")
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--requests", type=int, default=50, help="warm-up requests per model")
    p.add_argument("--json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pathguard-repo-") as tmp:
        report = (scenario_reload if args.scenario == "reload" else scenario_multi)(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.scenario == "reload":
        return 0 if report["failed"] == 0 and report["answers_from_a_loaded_version"] == report["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
