"""NIC benchmark: per-image scoring latency against the classifier's forward pass, fit time, head accuracies.

Run with ``pathguard bench-nic`` (see ``docs/nic.md``). Timings are medians over ``repeats`` calls at
batch 1 with torch's default thread count, after a warm-up; ``share`` is NIC time / forward time.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathguard.models.bundle import load_classifier
from pathguard.models.data import load_dataset
from pathguard.models.evaluation.attacks import run_attack
from pathguard.models.networks import CONFIGS, build_classifier, fold_batchnorm
from pathguard.models.nic import NICDetector

__all__ = ["bench_randomization", "bench_scoring", "fit_for_bench", "load_bench_classifier", "run_benchmark", "time_ms"]

QUICK = dict(pca_dim=16, n_fit=200, n_final=100, n_pca=100, n_head=500, head_epochs=1, holdout=200)


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 20) -> dict[str, float]:
    """Minimum, median and 90th percentile wall time of ``fn()`` in milliseconds (on a shared CPU the
    minimum is the closest to the uncontended cost)."""
    for _ in range(warmup):
        fn()
    t = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        t[i] = time.perf_counter() - t0
    return {
        "min_ms": float(t.min() * 1e3),
        "p50_ms": float(np.median(t) * 1e3),
        "p90_ms": float(np.quantile(t, 0.9) * 1e3),
    }


def load_bench_classifier(dataset: str, classifier_dir: Path) -> tuple[Any, str]:
    """The trained classifier when ``classifier_dir`` exists, else a random-weight one of the same
    architecture (batch norm folded). Returns ``(model, description)``."""
    if (classifier_dir / "classifier.safetensors").is_file():
        return load_classifier(classifier_dir), f"trained ({classifier_dir})"
    torch.manual_seed(0)
    model = fold_batchnorm(build_classifier(CONFIGS[dataset]).eval())
    return model, "random weights (no trained classifier found; same architecture, batch norm folded)"


def fit_for_bench(model: Any, dataset: str, params: dict[str, Any], n_calib: int = 1000) -> tuple[NICDetector, dict]:
    """Fit (timed) and calibrate a detector on ``dataset`` (calibration: ``n_calib`` random training images
    left out of the fit); head accuracies on 2000 random test images."""
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    # CIFAR-10 splits are stored class by class: always subsample with a seeded permutation
    perm, tperm = np.random.default_rng(0).permutation(len(train.x)), np.random.default_rng(1).permutation(len(test.x))
    fit_idx, calib_idx, val_idx = np.sort(perm[n_calib:]), np.sort(perm[:n_calib]), np.sort(tperm[:2000])
    t0 = time.perf_counter()
    det = NICDetector(**params).fit(
        model, train.x[fit_idx], train.y[fit_idx], x_val=test.x[val_idx], y_val=test.y[val_idx]
    )
    fit_s = time.perf_counter() - t0
    det.calibrate(model, train.x[calib_idx])
    with torch.no_grad():
        model_acc = float((model(torch.from_numpy(test.x[val_idx])).argmax(1).numpy() == test.y[val_idx]).mean())
    facts = {
        "fit_seconds": round(fit_s, 1),
        "params": det.get_params(),
        "layers": det.layers_,
        "head_accuracy_test2000": {k: round(v, 4) for k, v in det.head_accuracy_.items()},
        "model_accuracy_test2000": round(model_acc, 4),
        "support_vectors": {
            "value": [int(det.members_[0].stages[n].vi.n_support) for n in det.layers_],  # type: ignore[union-attr]
            "provenance": [int(s.n_support) for s in det.members_[0].pi],
        },
    }
    return det, facts


@torch.no_grad()
def bench_scoring(det: NICDetector, model: Any, x1: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Per-image latency (batch 1) of the classifier and of NIC scoring given the layer activations."""
    acts = det.activations(model, x1)[1]

    def per_layer() -> None:
        checks = [det.check_layer(n, acts[n]) for n in det.layers_]
        prov = [det.provenance_score(i, checks[i][1], checks[i + 1][1]) for i in range(len(det.pairs_))]
        det.final_score(torch.stack([v for v, _ in checks], 1), torch.stack(prov, 1))

    fwd = time_ms(lambda: model(x1), repeats)
    res: dict[str, Any] = {
        "forward": fwd,
        "forward_with_taps": time_ms(lambda: model.forward_with_taps(x1), repeats),
        "nic_raw_batched": time_ms(lambda: det.raw_scores(acts, batched=True), repeats),
        "nic_raw_per_layer": time_ms(lambda: det.raw_scores(acts, batched=False), repeats),
        "nic_streaming_api": time_ms(per_layer, repeats),
        "nic_calibrated_scores": time_ms(lambda: det.score_activations(acts), repeats),
        "nic_with_forward": time_ms(lambda: det.score(model, x1), repeats),
    }
    base = fwd["p50_ms"]
    res["share_of_forward"] = {
        k: round(v["p50_ms"] / base, 2) for k, v in res.items() if k.startswith("nic") and isinstance(v, dict)
    }
    res["share_of_forward_min"] = {
        k: round(v["min_ms"] / fwd["min_ms"], 2) for k, v in res.items() if k.startswith("nic") and "min_ms" in v
    }
    res["cpu_shared_with_training"] = _training_running()
    reduce_ms: dict[str, float] = {}
    for name in det.layers_:
        reduce_ms[name] = time_ms(functools.partial(det.reduce, name, acts[name]), max(repeats // 4, 20))["p50_ms"]
    res["reduce_p50_ms_per_layer"] = {k: round(v, 4) for k, v in reduce_ms.items()}
    return res


def _training_running() -> bool:
    """Whether a ``pathguard train`` process shares the CPU (figures are then taken under contention)."""
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"pathguard\x00train" in proc.read_bytes() or b"pathguard train" in proc.read_bytes():
                return True
        except OSError:
            continue
    return False


def run_benchmark(
    repeats: int = 300,
    quick: bool = False,
    cifar_dir: Path | None = None,
    mnist_dir: Path | None = None,
    randomization: bool = False,
    datasets: tuple[str, ...] = ("mnist", "cifar10"),
) -> dict[str, Any]:
    """Fit on MNIST (LeNet-5) and CIFAR-10, then time per-image scoring. ``quick`` uses tiny fit sizes
    (for checking the command, not for figures)."""
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "quick": quick,
    }
    for dataset, folder in (("mnist", mnist_dir), ("cifar10", cifar_dir)):
        if dataset not in datasets:
            continue
        default = "artifacts/classifiers/mnist-lenet5" if dataset == "mnist" else "artifacts/classifiers/cifar10-cnn"
        model, desc = load_bench_classifier(dataset, Path(folder or default))
        params = dict(QUICK) if quick else {}
        det, facts = fit_for_bench(model, dataset, params)
        x1 = torch.from_numpy(load_dataset(dataset, "test").x[:1])
        report[dataset] = {"classifier": desc, **facts, "latency": bench_scoring(det, model, x1, repeats)}
        if randomization and dataset == "mnist":
            report["mnist_randomization"] = bench_randomization(
                model, dataset, n_eval=100 if quick else 500, params=dict(QUICK) if quick else None
            )
    return report


def _member_scores(det: NICDetector, model: Any, x: np.ndarray) -> np.ndarray:
    """(N, M) final violation probability of every member."""
    acts = det.activations(model, x)[1]
    return np.stack([det.final_violation(det.raw_scores(acts, k)[2], k) for k in range(det.n_members)], 1)


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _pick(scores: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Per-input random member choice (as the server does per request): (N, M) -> (N,)."""
    pool = np.arange(1, scores.shape[1])
    if mode == "plain":
        return scores[:, 0]
    if mode == "one":
        return scores[np.arange(len(scores)), rng.choice(pool, size=len(scores))]
    picks = np.stack([rng.choice(pool, size=3, replace=False) for _ in range(len(scores))])  # (N, 3)
    return np.median(np.take_along_axis(scores, picks, axis=1), axis=1)


def bench_randomization(
    model: Any,
    dataset: str = "mnist",
    n_random: int = 3,
    n_eval: int = 500,
    attacks: tuple[str, ...] = ("fgsm", "bim"),
    target_fpr: float = 0.05,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Clean FPR and detection rate at ``target_fpr`` (threshold from the calibration split) of the plain
    detector vs one / majority-of-three randomized members picked per input. Needs the ``eval`` extra."""

    det, facts = fit_for_bench(model, dataset, {**(params or {}), "n_random": n_random})
    test = load_dataset(dataset, "test")
    idx = np.sort(np.random.default_rng(2).permutation(len(test.x))[:n_eval])
    clean = _member_scores(det, model, test.x[idx])
    thr = det.threshold(target_fpr)
    out: dict[str, Any] = {"fit_seconds": facts["fit_seconds"], "threshold": thr, "n_clean": len(idx), "modes": {}}
    adv = {}
    for name in attacks:
        res = run_attack(model, name, dataset, test.x[idx], test.y[idx])
        adv[name] = (_member_scores(det, model, res.x_adv[res.success]), res.n_successful)
    for mode in ("plain", "one", "majority3"):
        c = _pick(clean, mode, np.random.default_rng(7))
        row: dict[str, Any] = {"clean_fpr": round(float(np.mean(c > thr)), 4)}
        for name, (a_scores, n_succ) in adv.items():
            a = _pick(a_scores, mode, np.random.default_rng(8))
            row[name] = {"n": n_succ, "detection": round(float(np.mean(a > thr)), 4), "auc": round(_auc(c, a), 4)}
        out["modes"][mode] = row
    return out
