"""The static description of a classifier: architecture name, input shape, classes, in-model normalization."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ClassifierConfig"]


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
