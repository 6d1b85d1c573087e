#!/usr/bin/env python3
"""Regenerate the page's bundled samples: clean MNIST test digits and adversarial ones, as the served bundle sees them.

Writes ``service/static/samples/*.png`` (28 x 28 grayscale) and ``service/static/samples/index.json``. Clean samples
are test images the bundle classifies correctly and does *not* flag; adversarial samples are made with the
evaluation attacks (``pathguard.models.evaluation.attacks.run_attack``, the `eval` extra) from correctly classified
test images, and kept only when, after the 8-bit PNG rounding the page uploads, the attack still changes the
prediction and the bundle flags the image. Everything is checked on the PNG pixels, exactly what the server decodes.

    .venv/bin/python scripts/make-samples.py                     # artifacts/mnist-lenet5, the default bundle
    .venv/bin/python scripts/make-samples.py --clean 4 --attacks fgsm,bim,cw_linf_ll,jsma_next
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "service" / "static" / "samples"
if "PATHGUARD_DATA_DIR" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["PATHGUARD_DATA_DIR"] = str(ROOT.parent / "shared" / "data")  # as the Makefile and tests do


def png_bytes(x: np.ndarray) -> bytes:
    """(1, H, W) float in [0, 1] -> 8-bit grayscale PNG (deterministic bytes: no metadata)."""
    img = Image.fromarray(np.round(np.clip(x[0], 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def as_served(x: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) -> the float32 pixels the server decodes from the 8-bit PNGs."""
    return (np.round(np.clip(x, 0.0, 1.0) * 255) / 255.0).astype(np.float32)


def detect_each(bundle: Any, xs: np.ndarray) -> Any:
    """The bundle's verdict on every image alone (batch 1, noise seed 0), as the server scores one upload with
    ``PATHGUARD_NOISE_SEED=0``: the noise copies depend on the batch's shape."""
    from types import SimpleNamespace

    parts = [bundle.pipeline.detect(xs[i : i + 1]) for i in range(len(xs))]
    cat = {k: np.concatenate([getattr(r, k) for r in parts]) for k in ("predicted", "adversarial", "score")}
    return SimpleNamespace(threshold=parts[0].threshold, **cat)


def _entry(kind: str, attack: str | None, index: int, y: int, res: Any, i: int, classes: list[str]) -> dict[str, Any]:
    return {
        "kind": kind,
        "attack": attack,
        "test_index": index,
        "true_label": classes[y],
        "predicted": classes[int(res.predicted[i])],
        "adversarial": bool(res.adversarial[i]),
        "score": round(float(res.score[i]), 4),
    }


def pick_clean(
    bundle: Any, x: np.ndarray, y: np.ndarray, n: int, margin: float = 0.5
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """The first ``n`` test images with distinct labels, classified correctly, scored under ``margin`` x threshold."""
    xs = as_served(x)
    res = detect_each(bundle, xs)
    out, labels = [], set()
    for i in range(len(xs)):
        clear = res.score[i] <= margin * res.threshold  # well below the threshold, not a borderline case
        if res.predicted[i] == y[i] and clear and int(y[i]) not in labels:
            labels.add(int(y[i]))
            out.append((xs[i], _entry("clean", None, i, int(y[i]), res, i, bundle.classes)))
        if len(out) == n:
            break
    return out


def pick_adversarial(
    bundle: Any, attack: str, x: np.ndarray, y: np.ndarray, per_attack: int
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Up to ``per_attack`` successful adversarial images of ``attack`` that the bundle flags."""
    from pathguard.models.evaluation.attacks import run_attack

    result = run_attack(bundle.classifier, attack, bundle.dataset, x, y, batch_size=len(x))
    xs = as_served(result.x_adv)
    res = detect_each(bundle, xs)
    out = []
    for i in np.flatnonzero(result.attempted):
        if res.predicted[i] != y[i] and res.adversarial[i]:
            out.append((xs[i], _entry("adversarial", attack, int(i), int(y[i]), res, int(i), bundle.classes)))
        if len(out) == per_attack:
            break
    if not out:
        print(f"warning: no {attack} example among {len(x)} images is both successful and flagged", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "artifacts" / "mnist-lenet5"))
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--clean", type=int, default=3, help="clean samples (distinct labels)")
    parser.add_argument("--attacks", default="fgsm,bim,cw_linf_ll", help="comma-separated attack names")
    parser.add_argument("--per-attack", type=int, default=1)
    parser.add_argument("--n", type=int, default=4, help="test images each attack is run on (CW-Linf: ~20 s each here)")
    args = parser.parse_args(argv)

    import torch

    from pathguard.models.bundle import load_bundle
    from pathguard.models.data import load_dataset

    torch.manual_seed(0)
    bundle = load_bundle(args.bundle, seed=0)
    test = load_dataset(bundle.dataset, "test")
    x, y = test.x[: args.n].astype(np.float32), np.asarray(test.y[: args.n], dtype=np.int64)
    picked = pick_clean(bundle, test.x[:200].astype(np.float32), np.asarray(test.y[:200]), args.clean)
    for attack in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        picked += pick_adversarial(bundle, attack, x, y, args.per_attack)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    samples = []
    for pixels, entry in picked:
        name = f"{entry['attack'] or 'clean'}-{entry['test_index']:04d}.png"
        (out / name).write_bytes(png_bytes(pixels))
        samples.append({"file": name, **entry})
    index = {
        "bundle": {"name": bundle.name, "version": str(bundle.version), "bundle_sha256": bundle.sha256},
        "made_by": "scripts/make-samples.py",
        "note": "MNIST test images; 'adversarial' ones were made with the named evaluation attack. 'score' and "
        "'adversarial' are the bundle's verdict on these PNG pixels at its own threshold, each image alone with the "
        "noise seed 0 (PATHGUARD_NOISE_SEED=0).",
        "samples": samples,
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    for s in samples:
        print(f"{s['file']:24s} {s['kind']:11s} true {s['true_label']} predicted {s['predicted']} "
              f"score {s['score']:.4f} flagged {s['adversarial']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
