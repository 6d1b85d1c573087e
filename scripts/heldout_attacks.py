#!/usr/bin/env python3
"""Attack held-out TRAINING images of a bundle once and keep the results on disk (the validation split's attacks).

The attacked images are the first ``--n-attack`` images of the bundle's ``calib_b`` split (training images that
neither the classifier nor the bundle fitted on); the rest of ``calib_b`` are the clean negatives of
``scripts/validate_components.py``. Every attack is written as ``DIR/<label>.npz`` (``x_adv``, ``success``,
``attempted``, the attacked positions and the attack's parameters as JSON): plain arrays, no pickle. An attack
whose file exists is skipped, so an interrupted run continues where it stopped.

    scripts/heldout_attacks.py --bundle artifacts/cifar10-resnet20 --out ~/.cache/pathguard/heldout/cifar10-resnet20

Test images are never touched here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pathguard.models.bundle import load_bundle
from pathguard.models.bundle.splits import training_split_indices
from pathguard.models.data import load_dataset
from pathguard.models.evaluation.attacks import run_attack

# label -> (registered attack, overrides, images attacked at most): CW is slow on CPU, so fewer images and a
# shorter search (3 binary-search steps x 50 iterations instead of 5 x 100)
ATTACKS: dict[str, tuple[str, dict, int | None]] = {
    "fgsm 2/255": ("fgsm_2", {}, None),
    "fgsm 8/255": ("fgsm_8", {}, None),
    "bim 2/255": ("bim_2", {}, None),
    "bim 8/255": ("bim_8", {}, None),
    "pgd-linf 8/255": ("pgd_linf_8", {}, None),
    "pgd-l2 0.5": ("pgd_l2_0.5", {}, None),
    "deepfool": ("deepfool", {}, None),
    "deepfool 0.02": ("deepfool_0.02", {}, None),
    "square 8/255": ("square_8", {}, None),
    "cw-l2 k0": ("cw_l2_next", {"confidence": 0.0, "binary_search_steps": 3, "max_iter": 50}, 150),
    "cw-l2 k20": ("cw_l2_k20", {"binary_search_steps": 3, "max_iter": 50}, 150),
    "cw-linf": ("cw_linf_next", {}, 100),
    # MNIST: the NIC paper's attacks at the registry's MNIST parameters
    "fgsm": ("fgsm", {}, None),
    "bim": ("bim", {}, None),
    "jsma": ("jsma_next", {}, 150),
    "cw-l2": ("cw_l2_next", {"binary_search_steps": 3, "max_iter": 50}, 150),
    "patch": ("patch", {}, None),
    "lighting": ("lighting", {}, None),
    "dirt": ("dirt", {}, None),
    "rectangle": ("rectangle", {}, None),
}
DEFAULTS = {  # per dataset
    "cifar10": [
        "fgsm 2/255", "fgsm 8/255", "bim 2/255", "bim 8/255", "pgd-linf 8/255", "pgd-l2 0.5", "deepfool",
        "square 8/255", "cw-l2 k0", "cw-l2 k20", "cw-linf", "deepfool 0.02",
    ],
    "mnist": [
        "fgsm", "bim", "deepfool", "jsma", "cw-l2", "cw-l2 k20", "cw-linf", "patch", "lighting", "dirt", "rectangle",
    ],
}  # fmt: skip


def attacked_split(bundle_dir: Path, n_attack: int) -> tuple[object, str, np.ndarray, np.ndarray, np.ndarray]:
    """(classifier, dataset, calib_b positions in the training set, their images, labels) of the first
    ``n_attack`` calib_b images."""
    bundle = load_bundle(bundle_dir)
    cfg = bundle.manifest["build"]["config"]
    train = load_dataset(bundle.dataset, "train")
    idx = training_split_indices(len(train), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))["calib_b"][:n_attack]
    return bundle.classifier, bundle.dataset, idx, train.x[idx], train.y[idx]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-attack", type=int, default=400)
    p.add_argument("--attacks", nargs="+", choices=list(ATTACKS), help="default: the dataset's set (DEFAULTS)")
    args = p.parse_args()
    torch.manual_seed(0)
    model, dataset, idx, x, y = attacked_split(args.bundle, args.n_attack)
    args.out.mkdir(parents=True, exist_ok=True)
    for label in args.attacks or DEFAULTS[dataset]:
        path = args.out / f"{label.replace(' ', '_').replace('/', '-')}.npz"
        if path.exists():
            continue
        name, overrides, cap = ATTACKS[label]
        n = len(x) if cap is None else min(cap, len(x))
        t0 = time.perf_counter()
        res = run_attack(model, name, dataset, x[:n], y[:n], **overrides)
        seconds = time.perf_counter() - t0
        meta = {"label": label, "attack": name, "params": res.params, "seconds": round(seconds, 1)}
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp, x_adv=res.x_adv, success=res.success, attempted=res.attempted, positions=idx[:n],
            meta=np.array(json.dumps(meta, default=str)),
        )  # fmt: skip
        tmp.rename(path)
        print(f"{label}: {res.n_successful}/{res.n_attempted} successful, {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
