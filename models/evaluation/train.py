"""Classifier training (the only place with optimizers for classifiers).

Deterministic given the seed: data order, augmentation and initialization all come from seeded
generators. Writes ``classifier.safetensors`` + ``classifier.json`` (config, accuracy, timing) and
the ONNX export with taps into the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pathguard.models.data import Split, load_dataset
from pathguard.models.networks import CONFIGS, TappedSequential, build_classifier, fold_batchnorm, save_classifier

__all__ = ["TrainConfig", "accuracy", "train_classifier"]


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


DEFAULTS = {
    "mnist": TrainConfig(epochs=12, batch_size=128, lr=3e-3, weight_decay=0.0, optimizer="adam", augment=False),
    "cifar10": TrainConfig(epochs=10, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd", augment=True),
}


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


def train_classifier(dataset: str, out_dir: Path, cfg: TrainConfig | None = None) -> dict[str, object]:
    """Train the dataset's classifier, save it (folded, eval mode) to ``out_dir`` and return its report."""
    cfg = cfg or DEFAULTS[dataset]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
    model = build_classifier(CONFIGS[dataset]).to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # ~15% faster convs on CPU
    opt = _optimizer(model, cfg)
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.25)
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y.astype(np.int64))
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
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
        tqdm.write(f"epoch {epoch + 1}: test accuracy {accuracy(model, test):.4f}")
    seconds = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format)
    served: TappedSequential = fold_batchnorm(model) if model.config.batchnorm else model.eval()
    report: dict[str, object] = {
        "dataset": dataset,
        "test_set": "MNIST test" if dataset == "mnist" else "CIFAR-10 (JPEG copy) test",
        "test_accuracy": accuracy(served, test),
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "train_config": cfg.__dict__,
    }
    save_classifier(served, out_dir, extra=report)
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
