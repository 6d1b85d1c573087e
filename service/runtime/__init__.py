"""The serving runtime: classifier engines, the parallel layer-check runtime, the stored guarded graph's runtime and
the micro-batcher. The engines and the layer-check runtime need torch and are imported on first use, so a server
with no torch installed serves a stored guarded graph through this package."""

import importlib
from typing import TYPE_CHECKING, Any

from pathguard.models.bundle.result import softmax
from pathguard.service.runtime.batcher import BatchSlice, MicroBatcher
from pathguard.service.runtime.results import Classified, Detected, ShadowBacklog, ShadowStarted
from pathguard.service.runtime.stored import StoredRuntime

if TYPE_CHECKING:
    from pathguard.service.runtime.checks import DetectionRuntime
    from pathguard.service.runtime.engines import ClassifierEngine, GuardedEngine, OnnxEngine, TorchEngine

_LAZY = {
    "DetectionRuntime": "pathguard.service.runtime.checks",
    "ClassifierEngine": "pathguard.service.runtime.engines",
    "GuardedEngine": "pathguard.service.runtime.engines",
    "OnnxEngine": "pathguard.service.runtime.engines",
    "TorchEngine": "pathguard.service.runtime.engines",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchSlice",
    "Classified",
    "ClassifierEngine",
    "Detected",
    "DetectionRuntime",
    "GuardedEngine",
    "MicroBatcher",
    "OnnxEngine",
    "ShadowBacklog",
    "ShadowStarted",
    "StoredRuntime",
    "TorchEngine",
    "softmax",
]
