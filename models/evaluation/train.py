"""Classifier training (the only place with optimizers for classifiers).

Deterministic given the seed: data order, augmentation and initialization all come from seeded
generators. Writes ``classifier.safetensors`` + ``classifier.json`` (config, accuracy, timing) and
the ONNX export with taps into the output folder.

Resumable: after every epoch the model, optimizer, schedule and random-generator states are written to
``<out>/checkpoint/`` (safetensors + JSON, no pickle); ``resume=True`` continues from the last completed epoch and
ends with the same weights as an uninterrupted run. ``holdout`` images are never trained on: exactly the
calibration images that ``pathguard build`` (same seed, ``n_calib`` = holdout) holds out of the training set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pathguard.models.data import Split, load_dataset
from pathguard.models.networks import (
    ARCHITECTURES,
    CONFIGS,
    TappedSequential,
    build_classifier,
    fold_batchnorm,
    save_classifier,
)

__all__ = ["ARCH_DEFAULTS", "DEFAULTS", "TrainConfig", "accuracy", "train_classifier"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (defaults per dataset in :data:`DEFAULTS`)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str  # "adam" | "sgd"
    augment: bool  # random crop (pad 4) + horizontal flip
    seed: int = 0
    holdout: int = 0  # training images never trained on (the builder's calibration split, same seed)
    n_train: int | None = None  # train on a seeded subset of this many images (tests)
    n_test: int | None = None  # report the accuracy on the first this many test images (tests; default: all)


DEFAULTS = {
    "mnist": TrainConfig(
        epochs=12, batch_size=128, lr=3e-3, weight_decay=0.0, optimizer="adam", augment=False, holdout=5000
    ),
    "cifar10": TrainConfig(epochs=10, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd", augment=True),
}
# per architecture, where it differs from the dataset's default
ARCH_DEFAULTS = {
    "resnet20": TrainConfig(
        epochs=120, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd", augment=True, holdout=5000
    ),
}
CHECKPOINT = "checkpoint"


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    model.eval()
    correct = 0
    for i in range(0, len(split), batch_size):
        x = torch.from_numpy(split.x[i : i + batch_size])
        correct += int((model(x).argmax(1).numpy() == split.y[i : i + batch_size]).sum())
    return correct / len(split)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per image. x: (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")  # (B, C, H+8, W+8)
    dy = torch.randint(0, 9, (b,), generator=gen)
    dx = torch.randint(0, 9, (b,), generator=gen)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w)
    bidx = torch.arange(b).view(b, 1, 1, 1)
    out = padded.permute(0, 2, 3, 1)[bidx, rows, cols].squeeze(1).permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)


def _training_images(train: Split, cfg: TrainConfig) -> Split:
    """The images a run trains on: all but the builder's calibration split (same permutation), optionally fewer."""
    perm = np.random.default_rng(cfg.seed).permutation(len(train))
    kept = np.sort(perm[cfg.holdout :]) if cfg.holdout else np.arange(len(train))
    return train.subset(kept[: cfg.n_train])


def _save_checkpoint(
    folder: Path, epoch: int, seconds: float, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, gen: Any
) -> None:
    """Everything a resumed run needs, as safetensors (tensors) + JSON (the rest); written atomically."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for i, state in opt_state["state"].items():
        tensors |= {f"opt.{i}.{k}": v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    tensors["generator"] = gen.get_state()
    meta = {
        "epoch": epoch,
        "seconds": seconds,
        "param_groups": opt_state["param_groups"],
        "opt_scalars": {
            str(i): {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
            for i, s in opt_state["state"].items()
        },
        "scheduler": sched.state_dict(),
    }
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def _load_checkpoint(
    folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, gen: Any
) -> tuple[int, float]:
    """Restore a checkpoint written by :func:`_save_checkpoint`; returns (epochs done, seconds so far)."""
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in meta["opt_scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    gen.set_state(tensors["generator"])
    return int(meta["epoch"]), float(meta["seconds"])


def train_classifier(
    dataset: str, out_dir: Path, cfg: TrainConfig | None = None, arch: str | None = None, resume: bool = False
) -> dict[str, object]:
    """Train a classifier on ``dataset`` (default architecture: the dataset's), save it (folded, eval mode) to
    ``out_dir`` and return its report. ``resume`` continues from ``out_dir/checkpoint`` when it exists."""
    config = ARCHITECTURES[arch] if arch is not None else CONFIGS[dataset]
    cfg = cfg or ARCH_DEFAULTS.get(config.arch, DEFAULTS[dataset])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    full, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    test = test if cfg.n_test is None else test.subset(np.arange(min(cfg.n_test, len(test))))
    train = _training_images(full, cfg)
    model = build_classifier(config).to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # ~15% faster convs on CPU
    opt = _optimizer(model, cfg)
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.25)
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y.astype(np.int64))
    checkpoint = Path(out_dir) / CHECKPOINT
    done, before = (0, 0.0)
    if resume and (checkpoint / "state.json").is_file():
        done, before = _load_checkpoint(checkpoint, model, opt, sched, gen)
        tqdm.write(f"resuming after epoch {done} ({before:.0f} s so far)")
    start = time.perf_counter() - before
    for epoch in range(done, cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        bar = tqdm(range(len(train) // cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        for b in bar:
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            if cfg.augment:
                x = _augment(x, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if b % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        _save_checkpoint(checkpoint, epoch + 1, time.perf_counter() - start, model, opt, sched, gen)
        tqdm.write(f"epoch {epoch + 1}: test accuracy {accuracy(model, test):.4f}")
    seconds = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format)
    served: TappedSequential = fold_batchnorm(model) if model.config.batchnorm else model.eval()
    report: dict[str, object] = {
        "dataset": dataset,
        "architecture": config.arch,
        "test_set": "MNIST test" if dataset == "mnist" else "CIFAR-10 (JPEG copy) test",
        "test_accuracy": accuracy(served, test),
        "train_images": len(train),
        "held_out": {"images": cfg.holdout, "seed": cfg.seed, "rule": "pathguard build's calibration split"},
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "train_config": cfg.__dict__,
    }
    save_classifier(served, out_dir, extra=report)
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
