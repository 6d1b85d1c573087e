"""Classifier persistence: safetensors weights + JSON config, and the ONNX export with named taps.

A classifier folder holds ``classifier.json`` (the :class:`ClassifierConfig` plus training facts),
``classifier.safetensors`` (weights; cannot execute code) and ``classifier.onnx`` (logits plus every
tap as a named output, dynamic batch axis).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from pathguard.models.errors import ClassifierLoadError
from pathguard.models.networks.architectures import build_classifier
from pathguard.models.networks.config import ClassifierConfig
from pathguard.models.networks.onnx_import import import_onnx
from pathguard.models.networks.taps import OnnxTapWrapper, TappedSequential

__all__ = [
    "CLASSIFIER_FILES",
    "ONNX_SOURCE",
    "classifier_from_bytes",
    "classifier_from_files",
    "export_onnx",
    "imported_classifier_meta",
    "onnx_of_module",
    "save_classifier",
]

CLASSIFIER_FILES = ("classifier.json", "classifier.safetensors", "classifier.onnx")
ONNX_SOURCE = "source.onnx"  # an imported classifier: the user's own file, from which the torch graph is rebuilt


def save_classifier(model: TappedSequential, out_dir: Path, extra: dict[str, object] | None = None) -> None:
    """Write weights, config and ONNX export of an eval-mode ``model`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "classifier.safetensors"))
    meta = {"config": model.config.to_dict(), "taps": model.tap_names, **(extra or {})}
    (out_dir / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
    export_onnx(model, out_dir / "classifier.onnx")


def classifier_from_bytes(meta_json: bytes, weights: bytes) -> TappedSequential:
    """Build the classifier described by ``classifier.json`` bytes and load safetensors ``weights``.

    Raises
    ------
    ClassifierLoadError
        ``classifier.json`` is not JSON or lacks a complete ``config``.
    ValueError
        The config names an architecture this pathguard does not build.
    """
    try:
        config = ClassifierConfig.from_dict(json.loads(meta_json)["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise ClassifierLoadError(f"classifier.json is not a pathguard classifier config ({exc})") from None
    model = build_classifier(config)
    model.load_state_dict(load_safetensors(weights))
    return model.eval()


def classifier_from_files(meta_json: bytes, read: Callable[[str], bytes]) -> TappedSequential:
    """The classifier a ``classifier.json`` describes, its other files read through ``read(name)``.

    A bundled architecture is rebuilt from its config and ``classifier.safetensors``; an imported one
    (``"format": "onnx"``) from the user's ONNX file it names.
    """
    meta = json.loads(meta_json)
    if meta.get("format") == "onnx":
        return import_onnx(read(str(meta["source"])))
    return classifier_from_bytes(meta_json, read("classifier.safetensors"))


def imported_classifier_meta(
    model: TappedSequential, tensors: dict[str, str], source: str = ONNX_SOURCE
) -> dict[str, object]:
    """``classifier.json`` of an imported classifier: its config, taps (with the user's ONNX tensor behind each),
    and the ONNX file it is rebuilt from."""
    return {
        "format": "onnx",
        "source": source,
        "config": model.config.to_dict(),
        "taps": model.tap_names,
        "onnx_tensors": tensors,
    }


def export_onnx(model: TappedSequential, path: Path, opset: int = 17) -> None:
    """Export ``model`` to ONNX with outputs ``logits`` and one per tap, batch axis dynamic."""
    c, h, w = model.config.input_shape
    names = ["logits", *model.tap_names]
    dummy = torch.zeros(2, c, h, w)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, dummy, path, names, opset)


def onnx_of_module(module: torch.nn.Module, input_shape: tuple[int, int, int], opset: int = 17) -> bytes:
    """A torch image classifier as the ONNX file a user would export: input ``input`` (N, C, H, W) with a dynamic
    batch axis, one output ``logits``, the module in eval mode (its batch norms then fold into the convolutions
    on import). This is how a torch ``nn.Module`` enters the same import path as any ONNX file."""
    was_training = module.training
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter needs no onnxscript
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                module.eval(),
                (torch.zeros(1, *input_shape),),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
            return path.read_bytes()
    finally:
        module.train(was_training)


def _export(model: TappedSequential, dummy: torch.Tensor, path: Path, names: list[str], opset: int) -> None:
    torch.onnx.export(
        OnnxTapWrapper(model).eval(),
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=names,
        dynamic_axes={n: {0: "batch"} for n in ["input", *names]},
        opset_version=opset,
        dynamo=False,
    )
