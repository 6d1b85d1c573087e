#!/usr/bin/env python3
"""What the consistency copies cost: the p50 of a bundle's guarded graph (its verdict) at batch 1 with its noise
components' copies cut to each given count, against the classifier graph alone. Only the cost is measured: the
copies are changed in memory, with the bundle's calibration unchanged, so the verdicts of these graphs mean nothing.

    scripts/bench_copies.py --bundle artifacts/cifar10-resnet20 --copies 8 4 2 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from pathguard.models.bundle import load_bundle
from pathguard.models.components.consistency import ConsistencyComponent
from pathguard.models.data import load_dataset
from pathguard.models.guarded import guarded_model


def p50_ms(session: ort.InferenceSession, output: str, x: np.ndarray) -> float:
    times = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        session.run([output], {"input": x[i : i + 1]})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--copies", type=int, nargs="+", default=[8, 4, 2, 1])
    p.add_argument("--images", type=int, default=200, help="distinct test images, one run each")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    x = load_dataset(bundle.dataset, "test").x[: args.images].astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    cpu = ["CPUExecutionProvider"]
    base = p50_ms(ort.InferenceSession(bundle.onnx_bytes, opts, providers=cpu), "logits", x)
    print(f"classifier p50 {base:.2f} ms")
    comps = bundle.pipeline.components.values()
    noise = [c for c in comps if isinstance(c, ConsistencyComponent) and hasattr(c, "copies")]
    for k in args.copies:
        for c in noise:
            c.copies = k  # type: ignore[attr-defined]
        model = guarded_model(bundle)
        ms = p50_ms(ort.InferenceSession(model.SerializeToString(), opts, providers=cpu), "verdict_score", x)
        print(f"noise copies {k}: guarded graph p50 {ms:.2f} ms, {ms / base:.1f}x the classifier")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
