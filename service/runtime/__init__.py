"""The serving runtime: classifier engines, the parallel layer-check runtime, and the micro-batcher."""

from pathguard.service.runtime.batcher import BatchSlice, MicroBatcher
from pathguard.service.runtime.checks import Classified, Detected, DetectionRuntime, ShadowStarted
from pathguard.service.runtime.engines import ClassifierEngine, GuardedEngine, OnnxEngine, TorchEngine, softmax

__all__ = [
    "BatchSlice",
    "Classified",
    "ClassifierEngine",
    "Detected",
    "DetectionRuntime",
    "GuardedEngine",
    "MicroBatcher",
    "OnnxEngine",
    "ShadowStarted",
    "TorchEngine",
    "softmax",
]
