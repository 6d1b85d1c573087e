#!/usr/bin/env python3
"""Effective Path's exact walk in the graph against the compiled walk outside it: batch-1 latency (p50 over distinct
test images, one onnxruntime / torch thread) and agreement of the features, per bundle.

    scripts/bench_ep_ingraph.py --bundle artifacts/mnist-lenet5 --bundle artifacts/cifar10-cnn \\
        --bundle artifacts/cifar10-resnet20 --images 50

A bundle over the in-graph walk's synapse budget is measured anyway (the budget is lifted here), so the table shows
what the budget keeps out of the served graph.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from pathguard.models.bundle import load_bundle
from pathguard.models.data import interleaved_order, load_dataset
from pathguard.models.effective_path.ingraph import GraphEffectivePath, GraphWalk
from pathguard.models.networks import tap_points


def _p50(fn, items) -> float:
    fn(items[0])  # warm-up
    times = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", required=True)
    p.add_argument("--images", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| bundle | layers | synapses (M) | graph bytes (MB) | in graph p50 ms | compiled walk p50 ms |", end="")
    print(" features equal |")
    print("|---|---|---|---|---|---|---|")
    for path in args.bundle:
        bundle = load_bundle(path)
        ep = bundle.pipeline.components["effective_path"]
        ex = ep.extractor
        walk = GraphWalk(ex.model, ex.input_shape, ex.theta, ex.last_k, tap_points(ex.model), budget=10**12)
        blob = GraphEffectivePath(walk, ep.class_paths, ep.ep_score).to_onnx()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        test = load_dataset(bundle.manifest["dataset"], "test")
        x = torch.from_numpy(test.x[interleaved_order(test.y)[: args.images]])
        with torch.no_grad():
            logits, taps = ex.model.forward_with_taps(x)
        start = x if walk.start_tap is None else taps[walk.start_tap]
        items = list(range(len(x)))
        feeds = [{"input": start[i : i + 1].numpy(), "logits": logits[i : i + 1].numpy()} for i in items]
        one = [(x[i : i + 1], logits[i : i + 1], {k: v[i : i + 1] for k, v in taps.items()}) for i in items]
        graph_ms = _p50(lambda f, s=sess: s.run(None, f), feeds)
        ex.warm_up()
        walk_ms = _p50(lambda a, e=ep: e.extract(*a), one)
        got = np.concatenate([sess.run(None, f)[0] for f in feeds])
        want = np.concatenate([np.concatenate([ep.extract(*a).sims[1], ep.extract(*a).sims[2]], 1) for a in one])
        print(
            f"| {bundle.name} | {len(walk.layers)} | {sum(walk.synapses.values()) / 1e6:.2f} | {len(blob) / 1e6:.1f} "
            f"| {graph_ms:.2f} | {walk_ms:.2f} | {bool(np.array_equal(got, want))} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
