"""The serving runtime: classifier engines, the parallel layer-check runtime, the stored guarded graph's runtime and
the micro-batcher. The engines and the layer-check runtime need torch and are imported on first use, so a server
with no torch installed serves a stored guarded graph through this package."""

from typing import TYPE_CHECKING

from pathguard.models.bundle.result import softmax
from pathguard.models.lazy import lazy_attributes
from pathguard.service.runtime.batcher import BatchSlice, MicroBatcher
from pathguard.service.runtime.results import BaseRuntime, Classified, Detected, ShadowStarted
from pathguard.service.runtime.stored import StoredRuntime

if TYPE_CHECKING:
    from pathguard.service.runtime.checks import DetectionRuntime
    from pathguard.service.runtime.engines import ClassifierEngine, GuardedEngine, OnnxEngine, TorchEngine

__getattr__ = lazy_attributes(
    __name__,
    {
        "DetectionRuntime": "pathguard.service.runtime.checks",
        **dict.fromkeys(
            ("ClassifierEngine", "GuardedEngine", "OnnxEngine", "TorchEngine"), "pathguard.service.runtime.engines"
        ),
    },
)


__all__ = [
    "BaseRuntime",
    "BatchSlice",
    "Classified",
    "ClassifierEngine",
    "Detected",
    "DetectionRuntime",
    "GuardedEngine",
    "MicroBatcher",
    "OnnxEngine",
    "ShadowStarted",
    "StoredRuntime",
    "TorchEngine",
    "softmax",
]
