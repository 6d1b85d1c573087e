#!/usr/bin/env python3
"""Effective Path, exact vs channel-level, on attacks of held-out TRAINING images: agreement, AUC and cost.

For a committed bundle: its exact Effective Path component as built, and the channel-level form
(:mod:`pathguard.models.effective_path.channels`) fitted here on the same bundle's fit split (class profiles on the
first ``--n-fit`` fit images, the benign score on the next ``--n-score``). Both scored on the attacks cached by
``scripts/heldout_attacks.py`` (the first images of ``calib_b``; successful adversarial examples only) against the
rest of ``calib_b`` as clean negatives. No test image is touched.

- agreement: per layer, the Jaccard index between the channel-level rank-1 path and the exact rank-1 path projected
  onto channel pairs (a synapse ``(o, position, c, tap)`` becomes ``(o, c)``), on clean and attacked images;
- detection: AUC and detection rate at 5% FPR on the clean negatives, per attack, for each form's benign score;
- cost: in-process p50 per image at batch 1 (one torch thread): the exact walk (the served compiled walk, ranks 1
  and 2, from the forward pass, plus the class-path similarity), the channel walk in torch and its ONNX form in
  onnxruntime (one thread).

    scripts/compare_ep_forms.py --bundle artifacts/mnist-lenet5 --attacks DIR \\
        --out docs/reports/validation/mnist-lenet5-ep-forms.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.metrics import roc_auc_score

from pathguard.models.bundle import load_bundle
from pathguard.models.bundle.splits import training_split_indices
from pathguard.models.data import load_dataset
from pathguard.models.effective_path import BenignEPScore
from pathguard.models.effective_path.channels import ChannelProfiles, ChannelWalk, DenseChannelWalk
from pathguard.models.effective_path.detectors import ep_features


def exact_scores(ep, x: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for s in range(0, len(x), batch):
        pb = ep.extractor.extract(x[s : s + batch], ranks=(1, 2))
        out.append(ep.ep_score.score(ep_features(ep.class_paths.similarity(pb))))
    return np.concatenate(out)


def channel_scores(dense: DenseChannelWalk, x: np.ndarray, batch: int = 256) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([dense(torch.from_numpy(x[s : s + batch]))[2].numpy() for s in range(0, len(x), batch)])


def projected(ep, walk: ChannelWalk, x: np.ndarray) -> tuple[dict[str, list[set[int]]], dict[str, list[set[int]]]]:
    """Per layer and image: the exact rank-1 path projected onto channel pairs, and the channel-level rank-1 path."""
    pb = ep.extractor.extract(x, ranks=(1,))
    paths = walk.walk(x, ranks=(1,))
    infos = {info.name: info for info in walk.plan.layers}
    exact: dict[str, list[set[int]]] = {}
    chan: dict[str, list[set[int]]] = {}
    for layer in pb.layers:
        info = infos[layer]
        ids, off = pb.ids[1][layer].numpy(), pb.offsets[1][layer].numpy()
        cg = walk.units[layer] // info.out_channels
        taps = info.fan_in // cg
        rows = []
        for i in range(len(x)):
            sid = ids[off[i] : off[i + 1]]
            if info.kind == "conv":
                o, c = (sid // info.fan_in) // info.out_points, (sid % info.fan_in) // taps
                rows.append(set((o * cg + c).tolist()))
            else:
                rows.append(set(sid.tolist()))
        exact[layer] = rows
        chan[layer] = [set(np.flatnonzero(m).tolist()) for m in paths.masks[1][layer]]
    return exact, chan


def jaccard(a: list[set[int]], b: list[set[int]]) -> float:
    return float(np.mean([len(p & q) / max(1, len(p | q)) for p, q in zip(a, b, strict=True)]))


def rates(clean: np.ndarray, adv: np.ndarray) -> dict[str, float]:
    thr = np.quantile(clean, 0.95)
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    return {"auc": float(roc_auc_score(labels, np.r_[clean, adv])), "dr_at_fpr_0.05": float(np.mean(adv > thr))}


def p50_ms(fn, xs: np.ndarray) -> float:
    fn(xs[:1])
    times = []
    for i in range(len(xs)):
        t0 = time.perf_counter()
        fn(xs[i : i + 1])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--attacks", type=Path, required=True, help="scripts/heldout_attacks.py's folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-fit", type=int, default=5000)
    p.add_argument("--n-score", type=int, default=1000)
    p.add_argument("--n-clean", type=int, default=2000)
    p.add_argument("--n-latency", type=int, default=100)
    p.add_argument("--theta", type=float, nargs="+", help="channel-level thresholds to compare (default: the bundle's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle, seed=0)
    ep = bundle.pipeline.components["effective_path"]
    cfg = bundle.manifest["build"]["config"]
    train = load_dataset(bundle.dataset, "train")
    idx = training_split_indices(len(train), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))
    fit = idx["fit"][: args.n_fit + args.n_score]
    files = sorted(args.attacks.glob("*.npz"))
    n_attacked = max(len(np.load(f)["success"]) for f in files)
    x_clean = train.x[idx["calib_b"][n_attacked : n_attacked + args.n_clean]]
    advs = {}
    for f in files:
        with np.load(f) as z:
            label, x_adv = json.loads(str(z["meta"]))["label"], z["x_adv"][z["success"]]
        if len(x_adv) >= 10:
            advs[label] = x_adv
    exact = {"clean": exact_scores(ep, x_clean), **{a: exact_scores(ep, x) for a, x in advs.items()}}
    report: dict = {"bundle": {"name": bundle.name, "sha256": bundle.sha256}, "n_clean": len(x_clean),
                    "exact": {"theta": ep.extractor.theta, "layers": list(ep.layers),
                              "attacks": {a: rates(exact["clean"], v) | {"n": len(advs[a])}
                                          for a, v in exact.items() if a != "clean"}},
                    "channel": {}}  # fmt: skip
    report["exact"]["mean_auc"] = float(np.mean([r["auc"] for r in report["exact"]["attacks"].values()]))
    xs = x_clean[: args.n_latency]
    report["exact"]["latency_ms_batch1"] = p50_ms(lambda x: exact_scores(ep, x), xs)
    for theta in args.theta or [ep.extractor.theta]:
        t0 = time.perf_counter()
        walk = ChannelWalk(bundle.classifier, bundle.input_shape, theta)
        head = fit[: args.n_fit]
        profiles = ChannelProfiles(len(bundle.classes)).fit(walk, train.x[head], train.y[head])
        sims = profiles.similarity(walk.walk(train.x[fit[args.n_fit :]]))
        dense = DenseChannelWalk(walk, profiles, BenignEPScore().fit(ep_features(sims)))
        row: dict = {"fit": {"profile_images": int(profiles.images_.sum()), "score_images": len(fit) - args.n_fit,
                             "seconds": round(time.perf_counter() - t0, 1)}, "attacks": {}}  # fmt: skip
        clean = channel_scores(dense, x_clean)
        e, c = projected(ep, walk, x_clean[:200])
        row["jaccard_clean_per_layer"] = {layer: jaccard(e[layer], c[layer]) for layer in e}
        for a, x_adv in advs.items():
            e, c = projected(ep, walk, x_adv[:100])
            row["attacks"][a] = rates(clean, channel_scores(dense, x_adv)) | {
                "n": len(x_adv),
                "jaccard": float(np.mean([jaccard(e[layer], c[layer]) for layer in e])),
            }
        row["mean_auc"] = float(np.mean([r["auc"] for r in row["attacks"].values()]))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(dense.to_onnx(), so, providers=["CPUExecutionProvider"])
        row["latency_ms_batch1"] = {
            "torch": p50_ms(lambda x, d=dense: channel_scores(d, x), xs),
            "onnx": p50_ms(lambda x, s=sess: s.run(["ep_score"], {"input": x}), xs),
        }
        report["channel"][str(theta)] = row
        print(theta, row["mean_auc"], row["latency_ms_batch1"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
