"""Reproduction of the Effective Path paper's profiling figures (``pathguard ep-report``).

MNIST LeNet-5 (Qiu et al., CVPR 2019): class paths over the training set at theta = 0.5, overall synapse and
weight density (paper: 13.8 % synapses), class-wise Jaccard heatmap (Fig. 2), density growth when merging
classes (Fig. 3), path size against theta (Fig. 11b), and the per-layer rank-1 / rank-2 similarity of clean
test images. For the CIFAR-10 CNN: densities (if the trained model exists) and bitmap sizes.

Writes ``report.json`` and PNG figures into the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathguard.models.bundle import load_classifier
from pathguard.models.data import load_dataset
from pathguard.models.effective_path import ClassPaths, EffectivePathExtractor
from pathguard.models.networks import CONFIGS, build_classifier, fold_batchnorm

__all__ = ["run_report"]

THETAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
PAPER = {"lenet_synapse_density": 0.138, "lenet_jaccard_mean": 0.5, "lenet_most_specialized_digit": 1}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fit(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, theta: float, progress: bool, num_classes: int = 10
) -> tuple[ClassPaths, float]:
    ext = EffectivePathExtractor(model, theta=theta)
    t0 = time.perf_counter()
    cp = ClassPaths(num_classes).fit(ext, x, y, batch_size=512, progress=progress)
    return cp, time.perf_counter() - t0


def _sample(n_total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a seeded random subset of size ``n`` (all, in order, if ``n`` is None or too large).

    Dataset files may be ordered by class (the CIFAR-10 JPEG copy is), so a prefix is not a sample.
    """
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def _summary(cp: ClassPaths, seconds: float, n_images: int) -> dict[str, Any]:
    j = cp.jaccard()
    off = ~np.eye(cp.num_classes, dtype=bool)
    per_class = np.where(off, j, np.nan)
    mean_other = np.nanmean(per_class, axis=1)
    return {
        "images": n_images,
        "fit_seconds": seconds,
        "images_in_class_paths": cp.images_per_class_.tolist(),
        "layers": cp.layers_,
        "synapses_per_layer": cp.layer_sizes_.tolist(),
        "density": cp.densities(),
        "class_synapse_density": cp.class_densities().tolist(),
        "jaccard": j.tolist(),
        "jaccard_mean_offdiag": float(j[off].mean()),
        "jaccard_mean_with_others": mean_other.tolist(),
        "most_specialized_class": int(np.argmin(mean_other)),
        "most_similar_pair": [int(v) for v in np.unravel_index(np.argmax(np.where(off, j, -1)), j.shape)],
        "growth_synapse": cp.growth().tolist(),
        "growth_weight": cp.growth(level="weight").tolist(),
        "bitmap_bytes": cp.nbytes(),
    }


def _plot_jaccard(j: np.ndarray, labels: Sequence[str], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    im = ax.imshow(j, cmap="viridis", vmin=min(0.0, float(j.min())), vmax=1.0)
    for a in range(j.shape[0]):
        for b in range(j.shape[1]):
            ax.text(b, a, f"{j[a, b]:.2f}", ha="center", va="center", fontsize=7, color="w" if j[a, b] < 0.6 else "k")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if max(map(len, labels)) > 2 else 0, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_growth(syn: Sequence[float], wts: Sequence[float], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    k = np.arange(1, len(syn) + 1)
    ax.plot(k, syn, "o-", label="synapse density")
    ax.plot(k, wts, "s-", label="weight density")
    ax.set_xlabel("classes merged")
    ax.set_ylabel("density of the merged path")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_theta(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    th = [r["theta"] for r in rows]
    ax.semilogy(th, [r["overall_synapses"] for r in rows], "o-", label="synapses (overall path)")
    ax.semilogy(th, [r["overall_weights"] for r in rows], "s-", label="weights (overall path)")
    ax.semilogy(th, [r["synapses_per_image"] for r in rows], "^--", label="synapses per image path")
    ax.set_xlabel("theta")
    ax.set_ylabel("path size")
    ax.set_title("LeNet-5 path size vs theta (cf. paper Fig. 11b)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_similarity(sims: dict[int, np.ndarray], layers: Sequence[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = np.arange(len(layers))
    for r, style in ((1, "o-"), (2, "s-")):
        m, s = sims[r].mean(0), sims[r].std(0)
        ax.plot(x, m, style, label=f"rank-{r} similarity")
        ax.fill_between(x, m - s, np.minimum(m + s, 1.0), alpha=0.2)
    ax.set_xticks(x, layers)
    ax.set_ylabel("|S ∩ C| / |S|")
    ax.set_title("Clean MNIST test images, per-layer similarity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _theta_sweep(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for theta in THETAS:
        cp, secs = _fit(model, x, y, theta, progress=False)
        ext = EffectivePathExtractor(model, theta=theta)
        pb = ext.extract(x[:1000], ranks=(1,))
        per_image = sum(pb.ids[1][n].numel() for n in pb.layers) / len(pb)
        dens = cp.densities()
        n_syn = int(cp.layer_sizes_.sum())
        n_w = sum(i.n_weights for i in cp.layer_info_.values())
        rows.append(
            {
                "theta": theta,
                "images": len(x),
                "seconds": secs,
                "synapse_density": dens["synapse"]["overall"],
                "weight_density": dens["weight"]["overall"],
                "overall_synapses": round(dens["synapse"]["overall"] * n_syn),
                "overall_weights": round(dens["weight"]["overall"] * n_w),
                "synapses_per_image": per_image,
            }
        )
        log(f"  theta {theta}: synapse density {dens['synapse']['overall']:.4f}, {per_image:.0f} synapses/image")
    return rows


def mnist_report(
    classifier_dir: Path,
    out: Path,
    theta_images: int,
    log: Callable[[str], None],
    progress: bool,
    train_images: int | None = None,
    test_images: int | None = None,
) -> dict[str, Any]:

    model = load_classifier(classifier_dir)
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    train, test = train.subset(_sample(len(train), train_images)), test.subset(_sample(len(test), test_images))
    log(f"MNIST LeNet-5: class paths over {len(train)} training images, theta 0.5")
    cp, secs = _fit(model, train.x, train.y, 0.5, progress)
    res = _summary(cp, secs, len(train))
    labels = [str(c) for c in range(10)]
    jac = np.array(res["jaccard"])
    _plot_jaccard(jac, labels, "LeNet-5 class-wise path Jaccard (cf. paper Fig. 2)", out / "jaccard_mnist.png")
    growth_title = "LeNet-5 density growth (cf. paper Fig. 3)"
    _plot_growth(res["growth_synapse"], res["growth_weight"], growth_title, out / "growth_mnist.png")
    ext = EffectivePathExtractor(model)
    sims = cp.similarity(ext.extract(test.x))
    res["test_similarity_mean"] = {str(r): sims[r].mean(0).tolist() for r in sims}
    res["test_similarity_std"] = {str(r): sims[r].std(0).tolist() for r in sims}
    _plot_similarity(sims, cp.layers_, out / "similarity_mnist.png")
    log(f"theta sweep on the first {theta_images} training images")
    sweep = train.subset(_sample(len(train), theta_images))
    res["theta_sweep"] = _theta_sweep(model, sweep.x, sweep.y, log)
    _plot_theta(res["theta_sweep"], out / "theta_mnist.png")
    return res


def cifar_report(
    classifier_dir: Path, out: Path, images: int, log: Callable[[str], None], progress: bool
) -> dict[str, Any]:

    if not (classifier_dir / "classifier.safetensors").is_file():
        log(f"no trained CIFAR-10 model in {classifier_dir}: geometry and bitmap sizes only")
        model = fold_batchnorm(build_classifier(CONFIGS["cifar10"]).eval())
        ext = EffectivePathExtractor(model)
        info = ext.layer_info
        sizes = {n: info[n].n_synapses for n in ext.layers}
        nbytes = {
            "synapse": sum(10 * ((s + 7) // 8) for s in sizes.values()),
            "weight": sum(10 * ((info[n].n_weights + 7) // 8) for n in ext.layers),
        }
        return {"trained_model": False, "synapses_per_layer": sizes, "bitmap_bytes": nbytes}

    model = load_classifier(classifier_dir)
    train = load_dataset("cifar10", "train")
    sub = train.subset(_sample(len(train), images))
    log(f"CIFAR-10 CNN: class paths over {len(sub)} training images (seeded random subset), theta 0.5")
    cp, secs = _fit(model, sub.x, sub.y, 0.5, progress, num_classes=len(train.classes))
    res = _summary(cp, secs, len(sub))
    res["trained_model"] = True
    jac = np.array(res["jaccard"])
    _plot_jaccard(jac, list(train.classes), "CIFAR-10 CNN class-wise path Jaccard", out / "jaccard_cifar10.png")
    _plot_growth(res["growth_synapse"], res["growth_weight"], "CIFAR-10 CNN density growth", out / "growth_cifar10.png")
    return res


def run_report(
    out: Path,
    mnist_dir: Path,
    cifar_dir: Path,
    theta_images: int = 10000,
    cifar_images: int = 50000,
    skip_mnist: bool = False,
    skip_cifar: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    mnist_images: int | None = None,
    test_images: int | None = None,
) -> dict[str, Any]:
    """Compute the requested sections, write figures and ``report.json`` into ``out``; return the report.

    Sections of an existing ``report.json`` that are skipped are kept.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report["paper"] = PAPER
    if not skip_mnist:
        report["mnist"] = mnist_report(mnist_dir, out, theta_images, log, progress, mnist_images, test_images)
        report["mnist"]["threads"] = torch.get_num_threads()
    if not skip_cifar:
        report["cifar10"] = cifar_report(cifar_dir, out, cifar_images, log, progress)
        report["cifar10"]["threads"] = torch.get_num_threads()
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report
