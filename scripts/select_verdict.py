#!/usr/bin/env python3
"""Choose a bundle's verdict (components and fusion rule) on attacks of held-out TRAINING images.

Candidates: the bundle's own components (Effective Path, NIC, NIC VI, class Gaussians where it has them) and the
prediction-consistency family (logit margin; noise flip share, softmax L1 change and logit drop at the sigmas
chosen on benign data for several flip rates; feature squeezing), every subset of the consistency family beside a
few layer-statistics groups, under every fusion rule. Each component's p-values are taken against its raw scores on
the bundle's clean ``calib_a`` split, as the built verdict computes them.

Data: the attacks cached by ``scripts/heldout_attacks.py`` (the first ``n`` images of ``calib_b``; only
successful adversarial examples count), and as clean negatives the rest of ``calib_b``. No test image is touched.

The rule: the highest mean detection rate at 5% FPR over the standard attacks (every attack weighs the same, so
lifting one attack from 13% to 80% counts for what it is); among the candidates within one binomial standard error
of that best mean (which these attacks cannot tell apart), the highest mean AUC.

    scripts/select_verdict.py --bundle artifacts/cifar10-resnet20 \\
        --attacks ~/.cache/pathguard/heldout/cifar10-resnet20 --out docs/reports/validation/cifar10-resnet20-consistency
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pathguard.models.bundle import DetectionPipeline, load_bundle
from pathguard.models.bundle.splits import training_split_indices
from pathguard.models.components.consistency import (
    MarginComponent,
    NoiseDropComponent,
    NoiseFlipComponent,
    NoiseL1Component,
    SqueezeComponent,
    default_squeezers,
    flip_rates,
    pick_sigma,
)
from pathguard.models.data import load_dataset
from pathguard.models.verdict.calibration import columnwise_p_values
from pathguard.models.verdict.fusion import FusedVerdict

SMALL_BUDGETS = ("fgsm 2/255", "bim 2/255")  # reported, not in the rule (their targets are relative)
RULES = ("fisher", "tippett", "harmonic", "tippett(fisher)", "harmonic(fisher)", "fisher(tippett)")


def dr_at(clean: np.ndarray, adv: np.ndarray, fpr: float = 0.05) -> float:
    thr = np.quantile(clean, 1 - fpr)
    return float((adv > thr).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--attacks", type=Path, required=True, help="folder of scripts/heldout_attacks.py")
    p.add_argument("--flip-rates", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    p.add_argument("--cache", type=Path, help="folder keeping every scored set's raw scores (same bundle and options)")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle)
    model, pipe = bundle.classifier, bundle.pipeline
    cfg = bundle.manifest["build"]["config"]
    train = load_dataset(bundle.dataset, "train")
    idx = training_split_indices(len(train), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))
    calib_a = train.x[idx["calib_a"]]

    files = sorted(args.attacks.glob("*.npz"))
    attacks = {}
    n_attacked = 0
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            attacks[meta["label"]] = (z["x_adv"][z["success"]], int(z["attempted"].sum()), meta)
            n_attacked = max(n_attacked, len(z["positions"]))
    clean = train.x[idx["calib_b"][n_attacked:]]

    # consistency candidates: noise at the sigma each flip rate gives on benign fit images
    fit = train.x[idx["fit"][:1000]]
    comps = dict(pipe.components)
    sigmas = {}
    rates = flip_rates(model, fit, args.copies, cfg["seed"], stop_above=max(args.flip_rates))
    print("benign flip rates by sigma:", rates, flush=True)
    for rate in args.flip_rates:
        sigma = pick_sigma(rates, rate)
        sigmas[rate] = sigma
        for cls in (NoiseFlipComponent, NoiseL1Component, NoiseDropComponent):
            comps[f"{cls.name}@{rate:g}"] = cls(sigma, args.copies)
    comps["margin"] = MarginComponent()
    comps["squeeze"] = SqueezeComponent(*default_squeezers(bundle.input_shape))
    scorer = DetectionPipeline(model, comps, None, 0.05, seed=cfg["seed"])

    def raw(x: np.ndarray, key: str) -> dict[str, np.ndarray]:
        """Every candidate's raw scores of ``x``, kept in ``--cache`` under ``key`` (re-runs score new sets only)."""
        path = args.cache / f"{key.replace(' ', '_').replace('/', '-')}.npz" if args.cache else None
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as z:
                if set(z.files) == set(comps) and len(z[z.files[0]]) == len(x):
                    return {k: z[k] for k in z.files}
        out = scorer.raw_components(x, batch_size=250)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **out)
        return out

    calib_s = {k: np.sort(v) for k, v in raw(calib_a, "calib_a").items()}
    names = list(calib_s)

    def p_values(s: dict[str, np.ndarray]) -> np.ndarray:
        return columnwise_p_values(np.stack([calib_s[k] for k in names], 1), np.stack([s[k] for k in names], 1))

    clean_p = p_values(raw(clean, "clean"))
    adv_p = {label: p_values(raw(x, f"attack {label}")) for label, (x, _, _) in attacks.items() if len(x) >= 20}
    scored_s = time.perf_counter() - t0

    layer_groups = {"EP+NIC": ["effective_path", "nic"], "EP+NIC+NIC VI": ["effective_path", "nic", "nic_vi"]}
    if "mahalanobis" in comps:
        layer_groups["EP+NIC+Gaussian"] = ["effective_path", "nic", "mahalanobis"]
        layer_groups["Gaussian"] = ["mahalanobis"]
    layer_groups["none"] = []
    cons_sets: list[list[str]] = []
    for rate in args.flip_rates:
        family = [f"noise_flip@{rate:g}", f"noise_l1@{rate:g}", f"noise_drop@{rate:g}", "margin", "squeeze"]
        for k in range(1, len(family) + 1):
            cons_sets += [list(s) for s in itertools.combinations(family, k)]
    cons_sets = [list(s) for s in dict.fromkeys(tuple(s) for s in cons_sets)]
    standard = [a for a in adv_p if a not in SMALL_BUDGETS]
    rows = {}
    for (lname, layer), cons in itertools.product(layer_groups.items(), [[], *cons_sets]):
        parts = layer + cons
        if not parts:
            continue
        cols = [names.index(k) for k in parts]
        fams = {k: ("consistency" if k in cons else "layer") for k in parts}
        for rule in RULES if len(parts) > 1 else ("fisher",):
            v = FusedVerdict({k: calib_s[k] for k in parts}, np.empty(0), 0.05, rule, fams)
            c_score = v.combine(clean_p[:, cols])
            cells = {}
            for label, ap in adv_p.items():
                a_score = v.combine(ap[:, cols])
                y = np.r_[np.zeros(len(c_score)), np.ones(len(a_score))]
                cells[label] = {"auc": float(roc_auc_score(y, np.r_[c_score, a_score])), "dr": dr_at(c_score, a_score)}
            key = f"{rule}: {' + '.join(parts)}"
            rows[key] = {
                "parts": parts,
                "rule": rule,
                "layer_group": lname,
                "cells": cells,
                "mean_dr": float(np.mean([cells[a]["dr"] for a in standard])),
                "mean_auc": float(np.mean([cells[a]["auc"] for a in standard])),
            }
    ranked = sorted(rows, key=lambda k: (rows[k]["mean_dr"], rows[k]["mean_auc"]), reverse=True)
    # one standard error: candidates whose mean detection rate is within one binomial standard error of the best
    # one's are not told apart by these attacks; among them the highest mean AUC is chosen
    counts = {a: len(attacks[a][0]) for a in standard}
    best_cells = rows[ranked[0]]["cells"]
    var = sum(best_cells[a]["dr"] * (1 - best_cells[a]["dr"]) / counts[a] for a in standard)
    se = float(np.sqrt(var)) / len(standard)
    tied = [k for k in ranked if rows[k]["mean_dr"] >= rows[ranked[0]]["mean_dr"] - se]
    chosen = max(tied, key=lambda k: (rows[k]["mean_auc"], rows[k]["mean_dr"]))
    ranked = [chosen, *(k for k in ranked if k != chosen)]
    singles = {k: rows[f"fisher: {k}"] for k in names if f"fisher: {k}" in rows}
    m = bundle.manifest["verdict"]
    before = f"{m.get('rule', 'fisher')}: {' + '.join(m.get('components', ['effective_path', 'nic']))}"
    best = {g: next(k for k in ranked if rows[k]["layer_group"] == g) for g in layer_groups}
    kept = dict.fromkeys([*ranked[:40], *best.values(), *(k for k in [before] if k in rows)])
    result = {
        "bundle": str(args.bundle),
        "bundle_sha256": bundle.sha256,
        "n_calib_a": len(calib_a),
        "n_clean": len(clean),
        "sigmas": {f"{r:g}": s for r, s in sigmas.items()},
        "copies": args.copies,
        "attacks": {
            a: {"successful": len(x), "attempted": n, "params": m["params"]} for a, (x, n, m) in attacks.items()
        },
        "standard_attacks": standard,
        "seconds": round(time.perf_counter() - t0, 1),
        "scoring_seconds": round(scored_s, 1),
        "chosen": ranked[0],
        "best_mean_dr": max(r["mean_dr"] for r in rows.values()),
        "standard_error": se,
        "within_one_se": len(tied),
        "bundle_verdict": before,
        "best_per_layer_group": best,
        "n_candidates": len(rows),
        "singles": singles,
        "rows": {k: rows[k] for k in kept},  # the 40 best, the best of each layer group and the bundle's verdict
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    attacks_order = list(adv_p)

    def line(label: str, row: dict) -> str:
        cells = " | ".join(f"{row['cells'][a]['auc']:.3f} / {100 * row['cells'][a]['dr']:.0f}%" for a in attacks_order)
        return f"| {label} | {cells} | {100 * row['mean_dr']:.1f}% | {row['mean_auc']:.3f} |"

    head = "| candidate | " + " | ".join(attacks_order) + " | mean DR (standard) | mean AUC |"
    md = [head, "|---|" + "---|" * (len(attacks_order) + 2)]
    md += [line(f"single: {k}", r) for k, r in singles.items()]
    md += [line(("**chosen** " if i == 0 else "") + k, rows[k]) for i, k in enumerate(ranked[:25])]
    for lname, k in best.items():  # the best of each layer group, and the bundle's verdict before
        md.append(line(f"best with layer group {lname}: {k}", rows[k]))
    if before in rows:
        md.append(line(f"the bundle's verdict before: {before}", rows[before]))
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:2] + md[2 + len(singles) : 2 + len(singles) + 5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
