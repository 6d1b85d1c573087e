"""The guarded graph stored in a bundle, scored without torch.

A bundle may hold its guarded graph (:func:`pathguard.models.guarded.guarded_model` with every in-graph component,
noise read from inputs and the components' response fields as outputs) as ``guarded.onnx``, with ``guarded.json``
saying what it holds: its components, the layout of the response fields among its outputs, and what a server
reports of the bundle beyond them (layers, Effective Path's benign statistics). ``pathguard export BUNDLE
--in-bundle`` writes both (it needs torch, as the builder does). This module needs only numpy and onnxruntime:

- :func:`load_stored` verifies the bundle (every file against its manifest) and reads what serving needs;
- :class:`StoredDetector` runs the graph on a batch and returns the same
  :class:`~pathguard.models.bundle.result.DetectionResult` as the Python pipeline, in the same response shape.

Differences from the Python pipeline, by construction: the noise copies are drawn with numpy (seeded from the seed
and the input's pixels as the pipeline seeds its torch generators, so reproducible, but not the same numbers); every
number comes from onnxruntime's kernels (NIC's softmax-layer scores included, see
:mod:`pathguard.models.bundle.pipeline`); a component with no in-graph form (a walk over the synapse budget, the
supervised detector) is not reported, and a bundle whose verdict fuses one has no stored graph.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort

from pathguard.models.bundle.format import ManifestFacts, read_verified
from pathguard.models.bundle.result import DetectionResult, softmax
from pathguard.models.errors import BundleError
from pathguard.models.verdict.calibration import empirical_p_values, threshold_at_fpr

__all__ = [
    "GUARDED_JSON",
    "GUARDED_ONNX",
    "StoredBundle",
    "StoredDetector",
    "StoredInfo",
    "has_stored_graph",
    "input_seeds",
    "load_stored",
    "store_command",
    "stored_graph_spec",
]

GUARDED_ONNX, GUARDED_JSON = "guarded.onnx", "guarded.json"


def store_command(path: str | Path) -> str:
    """The command that stores the guarded graph in the bundle at ``path``."""
    return f"pathguard export {path} --in-bundle  (with torch: pip install 'pathguard[build]')"


def has_stored_graph(path: str | Path) -> bool:
    """Whether the bundle at ``path`` lists a stored guarded graph in its manifest (not verified here)."""
    try:
        files = json.loads((Path(path) / "manifest.json").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return False
    return GUARDED_ONNX in files and GUARDED_JSON in files


def stored_graph_spec(path: str | Path) -> dict[str, Any] | None:
    """``guarded.json`` of the bundle at ``path`` as it lies on disk (not verified: to choose how to serve it; the
    load verifies every file), or None when the bundle has no stored graph or it cannot be read."""
    if not has_stored_graph(path):
        return None
    try:
        spec = json.loads((Path(path) / GUARDED_JSON).read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) and {"components", "all_components"} <= set(spec) else None


def input_seeds(x: np.ndarray, seed: int | None) -> list[int]:
    """One 63-bit seed per input of the batch ``x``: from ``seed`` and the input's pixels (an input gets the same
    noise alone or in any batch), or fresh entropy when ``seed`` is None."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(len(x))]
    key = str(seed).encode()
    out = []
    for xi in np.ascontiguousarray(x, dtype=np.float32):
        digest = hashlib.blake2b(xi.tobytes(), digest_size=8, key=key).digest()
        out.append(int.from_bytes(digest, "little") >> 1)
    return out


@dataclass
class StoredInfo:
    """What the server reports of the bundle beside the graph's outputs (the parts of the Python pipeline that
    ``GET /v1/model`` and the OIP metadata read): layers, Effective Path's benign score, the operating point."""

    ep_layers: list[str]
    nic_value_layers: list[str]
    nic_provenance_pairs: list[str]
    ep_score: Any  # median_, scale_, orientation_ (2L,) and tail, as BenignEPScore names them
    fused_calibration: np.ndarray  # sorted clean split-B fused scores
    target_fpr: float
    threshold: float
    components: list[str]  # every component of the bundle, in its order
    supervised: None = None  # a supervised detector is never in the graph


@dataclass
class StoredBundle(ManifestFacts):
    """A verified bundle with a stored guarded graph: what a server without torch needs of it."""

    path: Path
    manifest: dict[str, Any]
    sha256: str
    onnx_bytes: bytes  # the plain classifier (``/v1/predict``)
    guarded_bytes: bytes
    graph: dict[str, Any]  # guarded.json
    info: StoredInfo
    benign_ranges: Any = None  # tail, count_, median_, bound_ (bundles with per-class ranges)

    @property
    def graph_components(self) -> list[str]:
        """The components in the stored graph (``info.components``: every component of the bundle)."""
        return list(self.graph["components"])


def load_stored(path: str | Path, target_fpr: float | None = None) -> StoredBundle:
    """Verify the bundle at ``path`` and read its stored guarded graph. ``target_fpr`` overrides the manifest's
    operating point (refused below 1/n of the calibration split). Raises :class:`BundleError` naming the command
    that stores the graph when the bundle has none."""
    files = read_verified(path)
    if not (files.has(GUARDED_ONNX) and files.has(GUARDED_JSON)):
        raise BundleError(f"bundle {path} has no stored guarded graph; store it with: {store_command(path)}")
    m, graph = files.manifest, files.json(GUARDED_JSON)
    serving = graph["serving"]
    fpr = float(target_fpr if target_fpr is not None else m["verdict"]["target_fpr"])
    fused = np.sort(np.asarray(serving["fused_calibration"], dtype=np.float64))
    try:
        threshold = threshold_at_fpr(fused, fpr)
    except ValueError as exc:
        raise BundleError(f"bundle {path}: {exc}") from None
    ep = serving["ep_score"]
    info = StoredInfo(
        ep_layers=list(serving["ep_layers"]),
        nic_value_layers=list(serving["nic_value_layers"]),
        nic_provenance_pairs=list(serving["nic_provenance_pairs"]),
        ep_score=SimpleNamespace(
            median_=np.asarray(ep["median"], dtype=np.float64),
            scale_=np.asarray(ep["scale"], dtype=np.float64),
            orientation_=np.asarray(ep["orientation"], dtype=np.float64),
            tail=float(ep["tail"]),
        ),
        fused_calibration=fused,
        target_fpr=fpr,
        threshold=threshold,
        components=list(graph["all_components"]),
    )
    r = serving.get("benign_ranges")
    ranges = (
        None
        if r is None
        else SimpleNamespace(
            tail=float(r["tail"]),
            count_=np.asarray(r["count"], dtype=np.int64),
            median_=np.asarray(r["median"], dtype=np.float64),
            bound_=np.asarray(r["bound"], dtype=np.float64),
        )
    )
    return StoredBundle(
        path=Path(path),
        manifest=m,
        sha256=files.sha256,
        onnx_bytes=files.bytes("classifier.onnx"),
        guarded_bytes=files.bytes(GUARDED_ONNX),
        graph=graph,
        info=info,
        benign_ranges=ranges,
    )


class StoredDetector:
    """onnxruntime on a bundle's stored guarded graph: :meth:`detect` scores a batch into a
    :class:`~pathguard.models.bundle.result.DetectionResult`. ``seed``: the noise copies' seed (None: fresh noise
    per input). Thread-safe (one onnxruntime session; its runs may overlap)."""

    def __init__(
        self,
        bundle: StoredBundle,
        seed: int | None = None,
        options: ort.SessionOptions | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        self.bundle, self.seed = bundle, seed
        self.session = ort.InferenceSession(bundle.guarded_bytes, options, providers=list(providers))
        self.providers = self.session.get_providers()
        self.components = bundle.graph_components
        self.skipped = [k for k in bundle.info.components if k not in self.components]
        # the noise inputs, (copies, N, C, H, W) each, in the order the pipeline draws its copies
        self._noise = [(i.name, int(i.shape[0])) for i in self.session.get_inputs() if i.name != "input"]
        self._layout: dict[str, Any] = bundle.graph["fields"]
        self._outputs = [
            "logits",
            "verdict_score",
            "verdict_p_value",
            *(f"raw_{c}" for c in self.components),
            *sorted(set().union(*(_outputs_of(f) for f in self._layout.values()))),
        ]

    def noise(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's noise inputs for the batch ``x``: each input's copies from its own generator, input by
        input (transform by transform, as the pipeline draws them)."""
        rngs = [np.random.default_rng(s) for s in input_seeds(x, self.seed)]
        shape = x.shape[1:]
        return {
            name: np.stack([g.standard_normal((copies, *shape), dtype=np.float32) for g in rngs], 1)
            for name, copies in self._noise
        }

    def detect(
        self, x: np.ndarray, probabilities: np.ndarray | None = None, skip: Collection[str] = ()
    ) -> DetectionResult:
        """Score the batch ``x`` (N, C, H, W) float32 in [0, 1]. Components in ``skip`` are not reported (raw score
        NaN, no fields), as those the graph does not hold."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        feed = {"input": x, **self.noise(x)}
        outs = dict(zip(self._outputs, self.session.run(self._outputs, feed), strict=True))
        probs = softmax(outs["logits"]) if probabilities is None else probabilities
        n, info = len(x), self.bundle.info
        shown = [c for c in self.components if c not in skip]
        raw = {c: np.asarray(outs[f"raw_{c}"], dtype=np.float64) if c in shown else np.full(n, np.nan)
               for c in info.components}  # fmt: skip
        fields = {c: _fields(self._layout[c], outs) if c in shown else {} for c in info.components}
        score = np.asarray(outs["verdict_score"], dtype=np.float64)
        p_value = empirical_p_values(info.fused_calibration, score, assume_sorted=True)
        return DetectionResult.of(probs, fields, raw, score, p_value, info.threshold, info.target_fpr)


def _outputs_of(layout: Mapping[str, Any]) -> set[str]:
    """The outputs a component's field layout reads."""
    out: set[str] = set()
    for entry in layout.values():
        if "output" in entry:
            out.add(entry["output"])
        elif "fields" in entry:
            out |= _outputs_of(entry["fields"])
    return out


def _fields(layout: Mapping[str, Any], outs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A component's response fields from the graph's outputs, by its layout (see ``guarded_model(fields=True)``)."""
    out: dict[str, Any] = {}
    for key, entry in layout.items():
        if "columns" in entry:
            values = outs[entry["output"]]
            out[key] = {label: values[:, j] for j, label in enumerate(entry["columns"])}
        elif "output" in entry:
            out[key] = outs[entry["output"]]
        elif "fields" in entry:
            out[key] = _fields(entry["fields"], outs)
        else:
            out[key] = list(entry["const"])
    return out
