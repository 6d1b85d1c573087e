"""The bundled architectures: LeNet-5 (MNIST, the Effective Path paper's network) and a CIFAR-10 CNN after the
Carlini/Wagner model, plus the building blocks they share (in-model normalization, the residual block)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pathguard.models.networks.blocks import Normalize, Residual
from pathguard.models.networks.config import ClassifierConfig
from pathguard.models.networks.taps import TappedSequential

__all__ = ["ARCHITECTURES", "CIFAR_CNN", "CONFIGS", "LENET5", "RESNET20", "Normalize", "Residual", "build_classifier"]

LENET5 = ClassifierConfig("lenet5", 1, 28, 28, mean=(0.1307,), std=(0.3081,))
CIFAR_CNN = ClassifierConfig(
    "cifar_cnn", 3, 32, 32, batchnorm=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
RESNET20 = ClassifierConfig(
    "resnet20", 3, 32, 32, batchnorm=True, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)
CONFIGS = {"mnist": LENET5, "cifar10": CIFAR_CNN}  # the default architecture of each bundled dataset
ARCHITECTURES = {"lenet5": LENET5, "cifar_cnn": CIFAR_CNN, "resnet20": RESNET20}


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


def _resnet20(cfg: ClassifierConfig) -> OrderedDict[str, nn.Module]:
    """ResNet-20 for CIFAR-10 (He et al. 2016, section 4.2): a 3x3 stem, three stages of three basic blocks with
    16, 32 and 64 channels (stride 2 at the first block of stages 2 and 3, a 1x1 projection shortcut there), global
    average pooling and one linear layer. Batch norm after every convolution while training (folded away for
    serving, which leaves biased convolutions)."""

    def conv(cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=not cfg.batchnorm)

    def conv_bn(cin: int, cout: int, k: int, stride: int) -> list[tuple[str, nn.Module]]:
        return [("conv", conv(cin, cout, k, stride))] + ([("bn", nn.BatchNorm2d(cout))] if cfg.batchnorm else [])

    layers: list[tuple[str, nn.Module]] = [("normalize", Normalize(cfg.mean, cfg.std))]
    layers += [(f"{n}1", m) for n, m in conv_bn(cfg.in_channels, 16, 3, 1)] + [("relu1", nn.ReLU())]
    cin = 16
    for stage, cout in enumerate((16, 32, 64), start=1):
        for block in range(3):
            stride = 2 if stage > 1 and block == 0 else 1
            first, second = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1)
            body = [(f"{n}1", m) for n, m in first] + [("relu", nn.ReLU())] + [(f"{n}2", m) for n, m in second]
            short = nn.Sequential(OrderedDict(conv_bn(cin, cout, 1, stride))) if stride != 1 or cin != cout else None
            layers.append((f"block{stage}_{block}", Residual(nn.Sequential(OrderedDict(body)), short)))
            layers.append((f"relu{stage}_{block}", nn.ReLU()))
            cin = cout
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(64, cfg.num_classes))]
    return OrderedDict(layers)


_BUILDERS = {"lenet5": _lenet5, "cifar_cnn": _cifar_cnn, "resnet20": _resnet20}


def build_classifier(config: ClassifierConfig) -> TappedSequential:
    """Instantiate an untrained classifier for ``config``."""
    try:
        builder = _BUILDERS[config.arch]
    except KeyError:
        raise ValueError(f"unknown architecture {config.arch!r}; supported: {sorted(_BUILDERS)}") from None
    return TappedSequential(builder(config), config)
