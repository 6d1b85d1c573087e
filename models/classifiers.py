"""Supported classifiers and the one tap mechanism both detectors read activations through.

Every classifier is a :class:`TappedSequential`: an ``nn.Sequential`` whose children carry stable
names (``conv1``, ``relu1``, ``pool1``, ...). Module names are part of the public contract: the
Effective Path API keys its output by them and the bundle records them.

Taps are the activations a detector may look at, in forward order:

- every Conv2d / Linear output, taken *after* its ReLU when one follows (named after the layer,
  e.g. ``conv1``); the last Linear has no ReLU, so its tap is the logits;
- every pooling output (``pool1``, ...);
- the flatten output (``flatten``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = [
    "ClassifierConfig",
    "TappedSequential",
    "build_classifier",
    "fold_batchnorm",
    "tap_points",
]

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_WEIGHTED = (nn.Conv2d, nn.Linear)
_PASS_THROUGH = (nn.ReLU, nn.Dropout, nn.BatchNorm2d, nn.BatchNorm1d)


@dataclass(frozen=True)
class ClassifierConfig:
    """Static description of a supported classifier.

    Parameters
    ----------
    arch : str
        ``"lenet5"`` (MNIST, the network of the Effective Path paper) or ``"cifar_cnn"``
        (a CIFAR-10 CNN after the Carlini/Wagner model, with batch norm during training).
    in_channels, height, width : int
        Input shape (C, H, W); inputs are float32 in [0, 1].
    num_classes : int
        Number of output logits.
    batchnorm : bool
        Whether conv layers are followed by BatchNorm2d. Trained CIFAR weights are saved with the
        batch norm folded into the convolutions, i.e. as ``batchnorm=False``.
    mean, std : tuple of float
        Per-channel normalization applied inside the model (so callers always pass [0, 1] pixels).
    """

    arch: str
    in_channels: int
    height: int
    width: int
    num_classes: int = 10
    batchnorm: bool = False
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.height, self.width)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ClassifierConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["mean"] = tuple(known.get("mean", ()))  # type: ignore[arg-type]
        known["std"] = tuple(known.get("std", ()))  # type: ignore[arg-type]
        return cls(**known)  # type: ignore[arg-type]


LENET5 = ClassifierConfig("lenet5", 1, 28, 28, mean=(0.1307,), std=(0.3081,))
CIFAR_CNN = ClassifierConfig(
    "cifar_cnn", 3, 32, 32, batchnorm=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
CONFIGS = {"mnist": LENET5, "cifar10": CIFAR_CNN}


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; an affine map the detectors treat as part of the input."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def tap_points(seq: nn.Sequential) -> dict[int, str]:
    """Map child index -> tap name for the children whose *output* is a tap.

    A Conv2d/Linear is tapped at the output of the last pass-through module (BatchNorm, ReLU,
    Dropout) that directly follows it, so the tap is its post-ReLU activation.
    """
    names = list(seq._modules.keys())
    mods = list(seq._modules.values())
    points: dict[int, str] = {}
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, _WEIGHTED):
            j = i
            while j + 1 < len(mods) and isinstance(mods[j + 1], _PASS_THROUGH):
                j += 1
            points[j] = names[i]
            i = j + 1
            continue
        if isinstance(m, (_POOLS, nn.Flatten)):
            points[i] = names[i]
        i += 1
    return points


class TappedSequential(nn.Sequential):
    """``nn.Sequential`` with named taps. ``forward`` returns logits; ``forward_with_taps`` also
    returns an ordered ``name -> activation`` dict."""

    def __init__(self, layers: OrderedDict[str, nn.Module], config: ClassifierConfig) -> None:
        super().__init__(layers)
        self.config = config
        self._taps = tap_points(self)

    @property
    def tap_names(self) -> list[str]:
        return [self._taps[i] for i in sorted(self._taps)]

    @property
    def weighted_layer_names(self) -> list[str]:
        return [n for n, m in self.named_children() if isinstance(m, _WEIGHTED)]

    def forward_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the network on ``x`` (N, C, H, W) in [0, 1].

        Returns
        -------
        logits : torch.Tensor
            (N, num_classes).
        taps : dict[str, torch.Tensor]
            Activations in forward order, keyed by :attr:`tap_names`.
        """
        taps: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self):
            x = module(x)
            name = self._taps.get(i)
            if name is not None:
                taps[name] = x
        return x, taps


class OnnxTapWrapper(nn.Module):
    """Forward returning ``(logits, *taps)`` for ONNX export with named outputs."""

    def __init__(self, model: TappedSequential) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, taps = self.model.forward_with_taps(x)
        return (logits, *taps.values())


def _lenet5(cfg: ClassifierConfig) -> OrderedDict[str, nn.Module]:
    return OrderedDict(
        [
            ("normalize", Normalize(cfg.mean, cfg.std)),
            ("conv1", nn.Conv2d(cfg.in_channels, 6, 5, padding=2)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(6, 16, 5)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(16 * 5 * 5, 120)),
            ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(120, 84)),
            ("relu4", nn.ReLU()),
            ("fc3", nn.Linear(84, cfg.num_classes)),
        ]
    )


def _cifar_cnn(cfg: ClassifierConfig) -> OrderedDict[str, nn.Module]:
    """Carlini/Wagner CIFAR layout (conv64-conv64-pool-conv128-conv128-pool-fc256-fc256-fc10), 'same'
    padding; batch norm after each conv while training (folded away for serving)."""
    layers: list[tuple[str, nn.Module]] = [("normalize", Normalize(cfg.mean, cfg.std))]
    chans = [(cfg.in_channels, 64), (64, 64), (64, 128), (128, 128)]
    for k, (cin, cout) in enumerate(chans, start=1):
        layers.append((f"conv{k}", nn.Conv2d(cin, cout, 3, padding=1)))
        if cfg.batchnorm:
            layers.append((f"bn{k}", nn.BatchNorm2d(cout)))
        layers.append((f"relu{k}", nn.ReLU()))
        if k % 2 == 0:
            layers.append((f"pool{k // 2}", nn.MaxPool2d(2)))
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(128 * (cfg.height // 4) * (cfg.width // 4), 256)),
        ("relu5", nn.ReLU()),
        ("drop1", nn.Dropout(0.5)),
        ("fc2", nn.Linear(256, 256)),
        ("relu6", nn.ReLU()),
        ("drop2", nn.Dropout(0.5)),
        ("fc3", nn.Linear(256, cfg.num_classes)),
    ]
    return OrderedDict(layers)


_BUILDERS = {"lenet5": _lenet5, "cifar_cnn": _cifar_cnn}


def build_classifier(config: ClassifierConfig) -> TappedSequential:
    """Instantiate an untrained classifier for ``config``."""
    try:
        builder = _BUILDERS[config.arch]
    except KeyError:
        raise ValueError(f"unknown architecture {config.arch!r}; supported: {sorted(_BUILDERS)}") from None
    return TappedSequential(builder(config), config)


@torch.no_grad()
def fold_batchnorm(model: TappedSequential) -> TappedSequential:
    """Return an equivalent eval-mode model with every ``Conv2d -> BatchNorm2d`` pair folded into the conv.

    ``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``.
    """
    items = list(model.named_children())
    out: OrderedDict[str, nn.Module] = OrderedDict()
    i = 0
    while i < len(items):
        name, m = items[i]
        nxt = items[i + 1][1] if i + 1 < len(items) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            assert nxt.running_var is not None and nxt.running_mean is not None
            scale = nxt.weight / torch.sqrt(nxt.running_var + nxt.eps)  # (O,)
            conv = copy.deepcopy(m)
            bias = m.bias if m.bias is not None else torch.zeros_like(scale)
            conv.weight = nn.Parameter(m.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - nxt.running_mean) * scale + nxt.bias)
            out[name] = conv
            i += 2
            continue
        out[name] = m
        i += 1
    cfg = ClassifierConfig(**{**model.config.__dict__, "batchnorm": False})
    folded = TappedSequential(out, cfg)
    return folded.eval()
