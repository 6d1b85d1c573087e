#!/usr/bin/env python3
"""Candidate benign-only components on attacks of held-out TRAINING images (the validation split for choices).

For a committed bundle: the bundle's own components (Effective Path, NIC final, NIC value invariants) and
class-conditional Gaussians (tied covariance per tapped layer, per-layer p-values combined by Fisher's method),
fitted on the bundle's fit split (the first ``--n-fit`` images) and calibrated on its ``calib_a`` split. Attacks
run on the first ``--n-attack`` images of its ``calib_b`` split; the clean negatives are the rest of ``calib_b``.
Only successful adversarial examples count. No test image is touched: this is where components and layers are
chosen; the test-set report is made once, after.

    scripts/validate_components.py --bundle artifacts/cifar10-cnn --out docs/reports/validation/cifar10-cnn.json

``--attacks`` adds the field's other budgets (``pgd-linf 8/255``, ``pgd-l2 0.5``, ``square 8/255``);
``--nic-channel-mean`` adds NIC refitted with per-channel-mean reductions and the combinations with it;
``--gaussian-subset NAME=layer,layer`` adds the Gaussians' Fisher statistic over only those layers (repeatable);
``--ep-bundle`` adds the Effective Path score of a second bundle of the same classifier and splits (e.g. one built
with more layers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pathguard.models.bundle import load_bundle
from pathguard.models.bundle.splits import training_split_indices
from pathguard.models.data import load_dataset
from pathguard.models.evaluation.attacks import run_attack
from pathguard.models.mahalanobis import ClassGaussian, fisher
from pathguard.models.nic import NICDetector
from pathguard.models.nic.layers import INPUT, SOFTMAX, default_layers
from pathguard.models.verdict import two_sided_fisher
from pathguard.models.verdict.calibration import columnwise_p_values

ATTACKS = {  # label -> (registered attack, overrides); the first five are the committed report's columns
    "fgsm 2/255": ("fgsm_2", {}),
    "fgsm 8/255": ("fgsm_8", {}),
    "bim 2/255": ("bim_2", {}),
    "bim 8/255": ("bim_8", {}),
    "deepfool": ("deepfool", {}),
    "pgd-linf 8/255": ("pgd_linf_8", {}),
    "pgd-l2 0.5": ("pgd_l2_0.5", {}),
    "square 8/255": ("square_8", {}),
}
DEFAULT_ATTACKS = ["fgsm 2/255", "fgsm 8/255", "bim 2/255", "bim 8/255", "deepfool"]


@torch.no_grad()
def activations(model, x: np.ndarray, layers: list[str], batch: int = 500):
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(x[s : s + batch])
        _, taps = model.forward_with_taps(xb)
        yield {n: taps[n] for n in layers}


def layer_scores(g: ClassGaussian, model, x: np.ndarray) -> np.ndarray:
    return np.concatenate([g.layer_scores(a) for a in activations(model, x, g.layers)])


def dr_at(clean: np.ndarray, adv: np.ndarray, fpr: float) -> float:
    thr = np.quantile(clean, 1 - fpr)
    return float((adv > thr).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("artifacts/cifar10-cnn"))
    p.add_argument("--n-fit", type=int, default=10000)
    p.add_argument("--n-attack", type=int, default=600)
    p.add_argument("--attacks", nargs="+", default=DEFAULT_ATTACKS, choices=list(ATTACKS))
    p.add_argument(
        "--nic-channel-mean",
        action="store_true",
        help="also fit NIC with per-channel-mean reductions (the bundle's layers and settings otherwise)",
    )
    p.add_argument(
        "--gaussian-subset",
        action="append",
        default=[],
        metavar="NAME=LAYER,LAYER",
        help="also score the Gaussians' Fisher statistic over only these layers (repeatable)",
    )
    p.add_argument("--ep-bundle", type=Path, help="a bundle of the same classifier whose Effective Path to add")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    bundle = load_bundle(args.bundle)
    model, pipe = bundle.classifier, bundle.pipeline
    m = bundle.manifest
    cfg = m["build"]["config"]
    train = load_dataset(m["dataset"], "train")
    idx = training_split_indices(len(train), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))
    fit = train.subset(idx["fit"][: args.n_fit])
    calib_a = train.subset(idx["calib_a"])
    held = train.subset(idx["calib_b"])
    attacked, clean = held.subset(np.arange(args.n_attack)), held.subset(np.arange(args.n_attack, len(held)))
    # every tap but a Flatten that repeats a pooling tap (NIC's rule), and the logits
    layers = [t for t in default_layers(model) if t not in (INPUT, SOFTMAX)] + [model.tap_names[-1]]
    t = time.perf_counter()
    candidates: dict[str, ClassGaussian] = {}
    for pool in ("mean", "mean_std"):
        g = ClassGaussian(layers, pool=pool)
        g.fit(zip(activations(model, fit.x, layers), np.array_split(fit.y, -(-len(fit) // 500)), strict=True), 10)
        g.calibrate(layer_scores(g, model, calib_a.x))
        candidates[pool] = g
    fit_s = time.perf_counter() - t
    nic_cm = None
    if args.nic_channel_mean:  # the bundle's NIC with the other reduction: same layers, sizes and seed
        params = {**pipe.nic.get_params(), "reduction": "channel_mean", "layers": list(pipe.nic.layers_)}
        nic_cm = NICDetector(**params)
        sample = train.subset(idx["fit"][: nic_cm.sample_size])
        nic_cm.fit(model, sample.x, sample.y).calibrate(model, calib_a.x)

    subsets = dict(item.split("=", 1) for item in args.gaussian_subset)
    subsets = {k: [layers.index(n) for n in v.split(",")] for k, v in subsets.items()}
    ep_pipe = load_bundle(args.ep_bundle).pipeline if args.ep_bundle else None
    if ep_pipe is not None and ep_pipe.classifier.tap_names != model.tap_names:
        raise SystemExit(f"{args.ep_bundle} has another classifier")
    ep_calib = np.sort(pipe.raw_components(calib_a.x)["effective_path"])

    def two_sided(ref: np.ndarray, v: np.ndarray) -> np.ndarray:
        """-2 log of the two-sided empirical p-value of ``v`` among the sorted clean ``ref``."""
        n = len(ref)
        upper = (1 + n - np.searchsorted(ref, v, side="left")) / (n + 1)
        lower = (1 + np.searchsorted(ref, v, side="right")) / (n + 1)
        return -2 * np.log(np.minimum(1.0, 2 * np.minimum(upper, lower)))

    def harmonic(p: np.ndarray) -> np.ndarray:
        """-log of the harmonic mean of the columns' p-values: one small p-value is not diluted by large ones."""
        return np.log(np.mean(1.0 / p, axis=1))

    def scores(x: np.ndarray) -> dict[str, np.ndarray]:
        raw = pipe.raw_components(x)
        out = {"effective_path": raw["effective_path"], "nic": raw["nic"], "nic_vi": raw["nic_vi"]}
        out["effective_path two-sided"] = two_sided(ep_calib, raw["effective_path"])
        if ep_pipe is not None:
            out["effective_path (other bundle)"] = ep_pipe.raw_components(x)["effective_path"]
        if nic_cm is not None:
            sc = nic_cm.score(model, x)
            out["nic channel-mean"] = sc.final
            out["nic_vi channel-mean"] = two_sided_fisher(sc.value_violation, nic_cm.calibration_size)
        for pool, g in candidates.items():
            ls = layer_scores(g, model, x)
            pv = g.p_values(ls)
            out[f"gaussian_{pool}"] = fisher(pv)
            out[f"gaussian_{pool} two-sided"] = fisher(g.two_sided_p_values(ls))
            out[f"gaussian_{pool} harmonic"] = harmonic(pv)
            for sub, cols in subsets.items():
                out[f"gaussian_{pool} [{sub}]"] = fisher(pv[:, cols])
            for j, name in enumerate(g.layers):
                out[f"gaussian_{pool}/{name}"] = ls[:, j]
        return out

    calib_s = {k: np.sort(v) for k, v in scores(calib_a.x).items()}

    def fused(s: dict[str, np.ndarray], parts: list[str]) -> np.ndarray:
        """Fisher's combination of the parts' upper-tail p-values against their clean calibration scores
        (a leading ``harmonic`` part: their harmonic mean instead)."""
        combine = harmonic if parts[0] == "harmonic" else fisher
        parts = parts[1:] if parts[0] == "harmonic" else parts
        return combine(np.stack([columnwise_p_values(calib_s[k][:, None], s[k][:, None])[:, 0] for k in parts], 1))

    bundle_parts = [{"mahalanobis": "gaussian_mean"}.get(c, c) for c in cfg.get("fusion", ["effective_path", "nic"])]
    combos = {f"bundle verdict ({' + '.join(bundle_parts)})": bundle_parts}
    nics = {"": ["nic", "nic_vi"]} | ({" channel-mean": ["nic channel-mean", "nic_vi channel-mean"]} if nic_cm else {})
    eps = {"EP": ["effective_path"]} | ({"EP (other bundle)": ["effective_path (other bundle)"]} if ep_pipe else {})
    gaussians = ["gaussian_mean", "gaussian_mean_std"] + [f"gaussian_mean [{sub}]" for sub in subsets]
    for nic_label, (nic_final, nic_vi) in nics.items():
        for ep_label, ep in eps.items():
            combos[f"{ep_label} + NIC{nic_label}"] = [*ep, nic_final]
            combos[f"{ep_label} + NIC{nic_label} + NIC VI{nic_label}"] = [*ep, nic_final, nic_vi]
            for g in gaussians:
                combos[f"{ep_label} + NIC{nic_label} + {g}"] = [*ep, nic_final, g]
                combos[f"{ep_label} + NIC{nic_label} + NIC VI{nic_label} + {g}"] = [*ep, nic_final, nic_vi, g]
        for g in gaussians:
            combos[f"NIC{nic_label} + NIC VI{nic_label} + {g}"] = [nic_final, nic_vi, g]
    four = ["effective_path", "nic", "nic_vi", "gaussian_mean"]
    combos["harmonic(EP, NIC, NIC VI, gaussian_mean)"] = ["harmonic", *four]
    combos["EP + NIC + NIC VI + gaussian_mean harmonic"] = [*four[:3], "gaussian_mean harmonic"]
    combos["EP two-sided + NIC + NIC VI + gaussian_mean two-sided"] = [
        "effective_path two-sided",
        "nic",
        "nic_vi",
        "gaussian_mean two-sided",
    ]
    clean_s = scores(clean.x)
    for name, parts in combos.items():
        clean_s[name] = fused(clean_s, parts)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    counts = {}
    for label in args.attacks:
        attack, params = ATTACKS[label]
        t0 = time.perf_counter()
        res = run_attack(model, attack, m["dataset"], attacked.x, attacked.y, **params)
        x_adv = res.x_adv[res.success]
        counts[label] = {"attempted": res.n_attempted, "successful": res.n_successful,
                         "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if len(x_adv) < 20:
            continue
        adv_s = scores(x_adv)
        for name, parts in combos.items():
            adv_s[name] = fused(adv_s, parts)
        rows[label] = {}
        for k in clean_s:
            y = np.r_[np.zeros(len(clean_s[k])), np.ones(len(adv_s[k]))]
            auc = float(roc_auc_score(y, np.r_[clean_s[k], adv_s[k]]))
            rows[label][k] = {"auc": auc, "dr@5%": dr_at(clean_s[k], adv_s[k], 0.05)}
        print(label, counts[label], {k: round(v["auc"], 3) for k, v in rows[label].items() if "/" not in k}, flush=True)
    result = {"bundle": str(args.bundle), "n_fit": len(fit), "n_calib": len(calib_a), "n_clean": len(clean),
              "gaussian_fit_s": round(fit_s, 1), "attacks": counts, "scores": rows}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not rows:
        print("no attack gave 20 successful adversarial examples: nothing to compare", file=sys.stderr)
        return 1
    keys = [k for k in next(iter(rows.values())) if "/" not in k]
    print("| score | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        cells = [f"{rows[a][k]['auc']:.3f} / {100 * rows[a][k]['dr@5%']:.0f}%" for a in rows]
        print(f"| {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
