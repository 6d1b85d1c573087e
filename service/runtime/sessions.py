"""onnxruntime sessions of the serving runtimes: execution providers from the settings, and session options."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnxruntime as ort

__all__ = ["CPU", "resolve_providers", "session_options"]

log = logging.getLogger("pathguard.service")

CPU = "CPUExecutionProvider"
_AUTO = ("CUDAExecutionProvider", CPU)


def resolve_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """The onnxruntime execution providers to ask for: ``requested`` in order (``["auto"]``: CUDA, then CPU), less
    those this onnxruntime build lacks (logged), with the CPU provider always last as the fallback."""
    have = list(ort.get_available_providers() if available is None else available)
    wanted = list(_AUTO) if list(requested) == ["auto"] else list(requested)
    missing = [p for p in wanted if p not in have]
    if missing and list(requested) != ["auto"]:
        log.warning("onnxruntime here has no %s (it has %s); using the others", ", ".join(missing), ", ".join(have))
    chosen = [p for p in wanted if p in have and p != CPU]
    return [*chosen, CPU]


def session_options(threads: int, inter_op_threads: int = 1) -> ort.SessionOptions:
    """Options of a session with ``threads`` intra-op threads and ``inter_op_threads`` inter-op ones (parallel
    execution of independent nodes when more than one); no spinning threads (they would burn the cores the other
    stages of a request need)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_op_threads
    parallel = inter_op_threads > 1
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options
