"""In-process latency of one batch-1 detection, NIC as per-layer torch checks vs NIC inside the ONNX graph.

For each bundle, on the same test images, measures ``DetectionRuntime.detect`` (onnx engine) with NIC's per-layer
torch checks (parallel and serial) and with NIC's per-layer checks computed in the served graph (sequential executor
and, with ``--inter-op 2``, onnxruntime's parallel executor), and checks that every variant gives the same verdicts.
Besides the total, the medians of three parts: the forward pass (with the in-graph checks where they run there),
the NIC work after it, and Effective Path.
Medians over ``--runs`` detections after a warm-up, one configuration after the other, interleaved in rounds so
that a change of load on a shared machine hits every configuration alike.

    PATHGUARD_DATA_DIR=... python scripts/nic-graph-latency.py --runs 300
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pathguard.models.bundle import load_bundle
from pathguard.models.data import load_dataset
from pathguard.service.runtime import DetectionRuntime, OnnxEngine

BUNDLES = {"artifacts/mnist-lenet5": "mnist", "artifacts/cifar10-cnn": "cifar10"}


def _runtimes(bundle, inter_op: list[int]) -> dict[str, DetectionRuntime]:
    pipe, taps = bundle.pipeline, bundle.pipeline.checked_taps
    out = {
        "torch checks, parallel": DetectionRuntime(OnnxEngine(bundle.onnx_bytes, taps), pipe, 2, parallel=True),
        "torch checks, serial": DetectionRuntime(OnnxEngine(bundle.onnx_bytes, taps), pipe, 2, parallel=False),
    }
    for k in inter_op:
        engine = OnnxEngine(bundle.onnx_bytes, [], nic=pipe.nic, inter_op_threads=k)
        out[f"NIC in graph, inter-op {k}"] = DetectionRuntime(engine, pipe, 2, parallel=True)
    return out


def measure(path: str, dataset: str, runs: int, rounds: int, inter_op: list[int]) -> dict[str, object]:
    bundle = load_bundle(path)
    x = load_dataset(dataset, "test").x[:runs]
    runtimes = _runtimes(bundle, inter_op)
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    parts: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runtimes}
    verdicts: dict[str, list[bool]] = {name: [] for name in runtimes}
    for rt in runtimes.values():
        rt.warm_up(bundle.input_shape, [1], 20)
    for r in range(rounds):
        for name, rt in runtimes.items():
            for i in range(r, len(x), rounds):
                t0 = time.perf_counter()
                det = rt.detect(x[i : i + 1])
                times[name].append(time.perf_counter() - t0)
                verdicts[name].append(bool(det.result.adversarial[0]))
                ep = det.result.timings_s["effective_path"]
                parts[name].append((det.classify_s, det.checks_s - ep, ep))
    for rt in runtimes.values():
        rt.close()
    ref = verdicts["torch checks, parallel"]
    return {
        "bundle": path,
        "images": len(x),
        "median_ms": {n: round(1e3 * float(np.median(t)), 3) for n, t in times.items()},
        "p90_ms": {n: round(1e3 * float(np.quantile(t, 0.9)), 3) for n, t in times.items()},
        "median_ms_forward_nic_after_ep": {
            n: [round(1e3 * float(v), 3) for v in np.median(np.array(p), axis=0)] for n, p in parts.items()
        },
        "verdicts_equal": {n: v == ref for n, v in verdicts.items()},
        "flagged": {n: int(sum(v)) for n, v in verdicts.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300, help="detections per configuration (distinct test images)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the runs are split into")
    ap.add_argument("--inter-op", type=int, nargs="+", default=[1, 2], help="inter-op threads of the NIC graph")
    args = ap.parse_args()
    for path, dataset in BUNDLES.items():
        print(json.dumps(measure(path, dataset, args.runs, args.rounds, args.inter_op), indent=1))


if __name__ == "__main__":
    main()
