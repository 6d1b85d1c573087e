#!/usr/bin/env python3
"""What each verdict component costs in the detection pipeline, in process (no HTTP): p50 of
``DetectionPipeline.finish`` on distinct test images at batch 1 and 16, with and without each component.

The bundle's own components are the baseline; each consistency component (or the whole family) is added to the
same pipeline and the difference of the medians is its cost. The forward pass with taps is done once per batch
outside the timed part (the server runs it before ``finish``).

    scripts/bench_components.py --bundle artifacts/cifar10-resnet20 --out docs/figures/bench-components.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pathguard.models.bundle import DetectionPipeline, load_bundle
from pathguard.models.components import component_class
from pathguard.models.components.consistency import (
    MarginComponent,
    NoiseDropComponent,
    NoiseFlipComponent,
    NoiseL1Component,
    SqueezeComponent,
    default_squeezers,
)
from pathguard.models.data import load_dataset

FAMILY = ("margin", "noise_flip", "noise_l1", "noise_drop", "squeeze")


def family(bundle_input: tuple[int, int, int], sigma: float, copies: int) -> dict:
    return {
        "margin": MarginComponent(),
        "noise_flip": NoiseFlipComponent(sigma, copies),
        "noise_l1": NoiseL1Component(sigma, copies),
        "noise_drop": NoiseDropComponent(sigma, copies),
        "squeeze": SqueezeComponent(*default_squeezers(bundle_input)),
    }


def p50(pipe: DetectionPipeline, x: np.ndarray, batch: int, rounds: int) -> float:
    times = []
    for r in range(rounds):
        xb = torch.from_numpy(x[(r * batch) % (len(x) - batch) :][:batch])
        with torch.no_grad():
            logits, taps = pipe.classifier.forward_with_taps(xb)
        t0 = time.perf_counter()
        obs = pipe.observe(xb, logits, taps)
        for c in pipe.components.values():
            c.raw(obs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--sigma", type=float, help="noise sigma (default: the bundle's, else 0.03)")
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    bundle = load_bundle(args.bundle, seed=0)
    base = {k: v for k, v in bundle.pipeline.components.items() if component_class(k).family != "consistency"}
    noise = bundle.pipeline.components.get("noise_flip")
    sigma = args.sigma or (noise.sigma if isinstance(noise, NoiseFlipComponent) else 0.03)
    fam = family(bundle.input_shape, sigma, args.copies)
    x = load_dataset(bundle.dataset, "test").x[:2000]
    variants = {"bundle's layer components": base} | {f"+ {k}": base | {k: fam[k]} for k in FAMILY}
    variants["+ whole family"] = base | fam
    rows = {}
    for label, comps in variants.items():
        pipe = DetectionPipeline(bundle.classifier, comps, None, 0.05, seed=0)
        rows[label] = {f"batch {b}": p50(pipe, x, b, args.rounds if b == 1 else args.rounds // 4) for b in (1, 16)}
        print(label, {k: round(v, 2) for k, v in rows[label].items()}, flush=True)
    base_row = rows["bundle's layer components"]
    result = {
        "bundle": str(args.bundle),
        "bundle_sha256": bundle.sha256,
        "sigma": sigma,
        "copies": args.copies,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "p50_ms": rows,
        "added_ms": {k: {b: v[b] - base_row[b] for b in v} for k, v in rows.items()},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| components | p50 batch 1 (ms) | added | p50 batch 16 (ms) | added |")
    print("|---|---|---|---|---|")
    for k, v in rows.items():
        a = result["added_ms"][k]
        print(f"| {k} | {v['batch 1']:.2f} | {a['batch 1']:+.2f} | {v['batch 16']:.2f} | {a['batch 16']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
