"""Compilation of an ``nn.Module`` into a flat plan of steps, once per input shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pathguard.models.effective_path.paths import LayerInfo
from pathguard.models.effective_path.steps import (
    AvgPoolStep,
    ConvStep,
    LinearStep,
    MaxPoolStep,
    PassStep,
    PrefixStep,
    ResidualStep,
    Step,
)
from pathguard.models.networks import Residual, folded_parameters
from pathguard.models.networks.taps import ACTIVATIONS, IDENTITIES, POOLS, WEIGHTED

__all__ = ["Compiler", "Plan"]

_PASS_THROUGH = (*ACTIVATIONS, *IDENTITIES, nn.Flatten)  # no effect on which synapses carry the prediction
_PREFIX_OK = "only before the first Conv2d/Linear layer"


@dataclass
class Plan:
    steps: list[Step]
    layers: list[LayerInfo]
    input_shape: tuple[int, ...]


class Compiler:
    def __init__(self) -> None:
        self.uid = 0
        self.layers: list[LayerInfo] = []

    def compile(self, model: nn.Module, input_shape: tuple[int, ...]) -> Plan:
        children = list(model.named_children()) if isinstance(model, nn.Sequential) else [("", model)]
        steps, _ = self._sequence(children, "", input_shape, top=True)
        if not self.layers:
            raise NotImplementedError("the model has no Conv2d or Linear layer")
        return Plan(steps, self.layers, input_shape)

    def _sequence(
        self, children: list[tuple[str, nn.Module]], prefix: str, shape: tuple[int, ...], top: bool = False
    ) -> tuple[list[Step], tuple[int, ...]]:
        steps: list[Step] = []
        i = 0
        while i < len(children):
            name, mod = children[i]
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            new, consumed = self._module(prefix + name, mod, nxt, shape)
            for step in new:
                step.child = i + consumed - 1 if top else -1
                shape = step.out_shape
            steps += new
            i += consumed
        return steps, shape

    def _module(
        self, name: str, mod: nn.Module, nxt: nn.Module | None, shape: tuple[int, ...]
    ) -> tuple[list[Step], int]:
        """Steps for ``mod`` (and a BatchNorm ``nxt`` folded into it); returns (steps, children consumed)."""
        if isinstance(mod, nn.Sequential):
            steps, _ = self._sequence(list(mod.named_children()), name + ".", shape)
            return steps, 1
        if isinstance(mod, Residual):
            body, out = self._sequence(_children(mod.body), name + ".body" + ("." if _is_seq(mod.body) else ""), shape)
            short: list[Step] = []
            if mod.shortcut is not None:
                sc_prefix = name + ".shortcut" + ("." if _is_seq(mod.shortcut) else "")
                short, _ = self._sequence(_children(mod.shortcut), sc_prefix, shape)
            return [self._finish(ResidualStep(body, short), shape, out, weighted=False)], 1
        fold = isinstance(mod, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d)
        fold |= isinstance(mod, nn.Linear) and isinstance(nxt, nn.BatchNorm1d)
        step = self._leaf(name, mod, nxt if fold else None, shape)
        out = tuple(step.compute(torch.zeros(1, *shape)).shape[1:])
        if isinstance(step, (ConvStep, AvgPoolStep, MaxPoolStep)):
            step.setup(shape, out)
        weighted = isinstance(step, (ConvStep, LinearStep))
        if weighted:
            self.layers.append(step.info)  # type: ignore[attr-defined]
        return [self._finish(step, shape, out, weighted)], 2 if fold else 1

    def _finish(self, step: Step, shape: tuple[int, ...], out: tuple[int, ...], weighted: bool) -> Step:
        step.uid, self.uid = self.uid, self.uid + 1
        step.in_shape, step.out_shape = shape, out
        step.w_end = len(self.layers)
        return step

    def _leaf(self, name: str, mod: nn.Module, bn: nn.Module | None, shape: tuple[int, ...]) -> Step:
        if isinstance(mod, WEIGHTED):
            weight, bias = folded_parameters(mod, bn)
            if isinstance(mod, nn.Conv2d):
                return ConvStep(name, mod, weight, bias)
            return LinearStep(name, weight, bias)
        if isinstance(mod, nn.MaxPool2d):
            return MaxPoolStep(mod)
        if isinstance(mod, POOLS):  # the average pools (max pooling is handled above)
            return AvgPoolStep(mod)
        if isinstance(mod, _PASS_THROUGH):
            if isinstance(mod, nn.Flatten) and mod.start_dim != 1:
                raise NotImplementedError(f"{name}: Flatten must keep the batch axis (start_dim=1)")
            return PassStep(mod)
        if not self.layers:
            return PrefixStep(mod)
        raise NotImplementedError(f"{name}: {type(mod).__name__} is supported {_PREFIX_OK}")


def _is_seq(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Sequential)


def _children(mod: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(mod.named_children()) if isinstance(mod, nn.Sequential) else [("", mod)]
