"""The verdict id (``verdict_sha256``): what the verdict's decisions depend on, and nothing else. Reports of the
verdict alone (the adaptive attacks) name it, so a bundle rebuilt with another reported-only component, or given
its stored graph, keeps them; any change the verdict can see gives another id."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pathguard.models.bundle import bundle_sha256, read_verified, verdict_sha256, write_bundle
from tests.conftest import ARTIFACTS

MNIST = ARTIFACTS / "mnist-lenet5"
FUSED = ["noise_drop", "squeeze"]  # the variant below fuses these two: Effective Path and NIC are reported only


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _flip(blob: bytes) -> bytes:
    out = bytearray(blob)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


@pytest.fixture(scope="module")
def source():
    files = read_verified(MNIST)
    manifest = {k: v for k, v in files.manifest.items() if k not in ("files", "schema_version", "created_at")}
    manifest["verdict"] = {**manifest["verdict"], "components": FUSED, "rule": "fisher"}
    return dict(files.blobs), manifest


def _write(tmp_path, name, blobs, manifest):
    out = tmp_path / name
    write_bundle(out, blobs, manifest)
    return out


def test_the_committed_bundles_have_an_id_apart_from_their_sha256():
    ids = {verdict_sha256(ARTIFACTS / b) for b in ("mnist-lenet5", "cifar10-cnn", "cifar10-resnet20")}
    assert len(ids) == 3 and not ids & {bundle_sha256(ARTIFACTS / b) for b in ("mnist-lenet5", "cifar10-cnn")}
    assert verdict_sha256(MNIST) == verdict_sha256(MNIST)


def test_what_the_verdict_does_not_read_leaves_the_id(tmp_path, source):
    blobs, manifest = source
    base = _write(tmp_path, "base", blobs, manifest)
    calib = read_verified(base).npz("calibration.npz")
    other = dict(blobs)
    other["class_paths.npz"] = _flip(blobs["class_paths.npz"])  # a rebuilt reported-only component
    other["nic.npz"] = _flip(blobs["nic.npz"])
    other["benign_similarity.npz"] = _flip(blobs["benign_similarity.npz"])
    other["calibration.npz"] = _npz({**calib, "calib_a/effective_path": calib["calib_a/effective_path"][::-1]})
    other["guarded.onnx"], other["guarded.json"] = b"graph", b"{}\n"  # files the verdict never reads
    rebuilt = _write(tmp_path, "rebuilt", other, {**manifest, "build": {"seconds": {"load": 1.0}}})
    assert bundle_sha256(rebuilt) != bundle_sha256(base)
    assert verdict_sha256(rebuilt) == verdict_sha256(base)


@pytest.mark.parametrize(
    "change",
    ["threshold", "rule", "fused file", "calibration of a fused component", "fused calibration", "classifier",
     "component entry", "fused list"],
)  # fmt: skip
def test_what_the_verdict_reads_changes_the_id(tmp_path, source, change):
    blobs, manifest = source
    base = _write(tmp_path, "base", blobs, manifest)
    calib = read_verified(base).npz("calibration.npz")
    blobs, manifest = dict(blobs), json.loads(json.dumps(manifest))
    if change == "threshold":
        manifest["verdict"]["threshold"] = np.nextafter(manifest["verdict"]["threshold"], 1.0)
    elif change == "rule":
        manifest["verdict"]["rule"] = "harmonic"
    elif change == "fused file":
        blobs["squeeze.json"] = json.dumps({**json.loads(blobs["squeeze.json"]), "bits": 4}).encode()
    elif change == "calibration of a fused component":
        blobs["calibration.npz"] = _npz({**calib, "calib_a/squeeze": calib["calib_a/squeeze"] + 1e-9})
    elif change == "fused calibration":
        blobs["calibration.npz"] = _npz({**calib, "calib_b/fused": calib["calib_b/fused"][:-1]})
    elif change == "classifier":
        blobs["classifier.safetensors"] = _flip(blobs["classifier.safetensors"])
    elif change == "component entry":
        manifest["components"]["noise_drop"] = {**manifest["components"]["noise_drop"], "copies": 2}
    else:
        manifest["verdict"]["components"] = [*FUSED, "effective_path"]
    changed = _write(tmp_path, "changed", blobs, manifest)
    assert verdict_sha256(changed) != verdict_sha256(base)
