#!/usr/bin/env python3
"""In-process cost of the guarded graph against the bare classifier and the Python detection pipeline.

For a bundle whose verdict is in the graph: p50 latency per batch of 1 and images per second at batch 256, with
``--threads`` onnxruntime intra-op threads (torch gets as many), of

- ``classifier``: the served classifier graph alone (logits; what /v1/predict runs);
- ``guarded``: the guarded graph (the verdict's components, calibration, fusion and threshold);
- ``pipeline``: the Python pipeline's ``detect`` (every component of the bundle, the reported ones included).

    scripts/bench_guarded.py --bundle artifacts/cifar10-resnet20 --out docs/figures/guarded-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pathguard.models.bundle import load_bundle
from pathguard.models.data import interleaved_order, load_dataset
from pathguard.models.guarded import guarded_model


def p50_ms(fn, x: np.ndarray, runs: int) -> float:
    fn(x[:1])
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(x[i % len(x) : i % len(x) + 1])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def per_second(fn, x: np.ndarray, rounds: int) -> float:
    fn(x)
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn(x)
    return float(rounds * len(x) / (time.perf_counter() - t0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    test = load_dataset(bundle.dataset, "test")
    x = test.x[interleaved_order(test.y)[:256]]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    clf = ort.InferenceSession(bundle.onnx_bytes, opts, providers=["CPUExecutionProvider"])
    guarded = ort.InferenceSession(guarded_model(bundle).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    runs = {
        "classifier": lambda b: clf.run(["logits"], {"input": b}),
        "guarded": lambda b: guarded.run(["is_adversarial"], {"input": b}),
        "pipeline": lambda b: bundle.pipeline.detect(b),
    }
    out = {
        "bundle": {"name": bundle.name, "sha256": bundle.sha256},
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "p50_ms_batch1": {k: p50_ms(fn, x, args.runs) for k, fn in runs.items()},
        "images_per_s_batch256": {k: per_second(fn, x, args.rounds) for k, fn in runs.items()},
    }
    out["machine"]["load_avg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
