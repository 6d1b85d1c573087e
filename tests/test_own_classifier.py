"""Bring your own classifier, end to end in tmp_path: an ONNX ResNet-style net and a folder of PNGs become a
verified bundle, which the service serves (REST image upload and OIP tensors)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pathguard.models.builder import BuildConfig, build_bundle_from_onnx
from pathguard.models.bundle import load_bundle, read_verified, verify_bundle
from pathguard.models.data import ImageFolder
from pathguard.models.errors import DatasetError
from pathguard.service.app import create_app
from pathguard.service.cli import main
from pathguard.service.settings import Settings
from tests.conftest import TINY_NIC
from tests.test_onnx_import import TinyResNet, _export, _randomized

CLASSES = ("circle", "cross", "stripes")
NIC = {**TINY_NIC, "n_fit": 60, "n_final": 50, "n_pca": 60, "n_head": 200, "holdout": 30, "pca_dim": 8}


def _image(k: int, rng: np.random.Generator) -> np.ndarray:
    """A 20x20 RGB pattern of class ``k`` with noise (not the model's 16x16: the loader resizes)."""
    yy, xx = np.mgrid[:20, :20]
    base = [((yy - 10) ** 2 + (xx - 10) ** 2 < 40), (abs(yy - xx) < 3) | (abs(yy + xx - 19) < 3), (yy // 3) % 2 == 0][k]
    rgb = np.stack([base * (0.3 + 0.3 * c) for c in range(3)], -1) + rng.normal(0, 0.1, (20, 20, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _folder(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_image(k, rng)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user")
    net = TinyResNet()
    net.head[-1] = torch.nn.Linear(16, len(CLASSES))
    (root / "model.onnx").write_bytes(_export(_randomized(net, 4), (3, 16, 16)))
    train = _folder(root / "train", 50, 0)
    (train / "circle" / "broken.png").write_bytes(b"not a png")  # unreadable: skipped and counted
    calib = _folder(root / "calib", 20, 1)
    return {"model": root / "model.onnx", "train": train, "calib": calib, "root": root}


@pytest.fixture(scope="module")
def own_bundle(user_files) -> Path:
    out = user_files["root"] / "bundle"
    cfg = BuildConfig(name="tiny-resnet", target_fpr=0.1, nic=NIC)
    report = build_bundle_from_onnx(user_files["model"], user_files["train"], out, cfg, user_files["calib"])
    assert report["sha256"]
    return out


def test_image_folder_scan_and_load(user_files):
    folder = ImageFolder.scan(user_files["train"])
    assert folder.classes == CLASSES and len(folder) == 151
    split, skipped = folder.load((3, 16, 16))
    assert split.x.shape == (150, 3, 16, 16) and split.x.dtype == np.float32
    assert split.x.min() >= 0.0 and split.x.max() <= 1.0
    assert [p.name for p in skipped] == ["broken.png"]
    assert np.bincount(split.y).tolist() == [50, 50, 50]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder.scan(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="holds no .png/.jpg images"):
        ImageFolder.scan(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match="classes.txt"):
        ImageFolder.scan(tmp_path)


def test_the_bundle_verifies_and_records_its_source(own_bundle):
    manifest = verify_bundle(own_bundle)
    assert manifest["classes"] == list(CLASSES) and manifest["input"]["shape"] == [3, 16, 16]
    assert manifest["source"]["skipped_files"] == 1
    assert manifest["calibration"] == {"ep_fit": 12, "calib_a": 24, "calib_b": 24, "fit": 151}  # files
    files = read_verified(own_bundle)
    assert files.has("source.onnx") and not files.has("classifier.safetensors")
    meta = files.json("classifier.json")
    assert meta["format"] == "onnx" and set(meta["onnx_tensors"]) == {*meta["taps"], "logits"}
    bundle = load_bundle(own_bundle)
    x = torch.rand(2, 3, 16, 16)
    result = bundle.pipeline.detect(x.numpy())
    assert result.score.shape == (2,) and ((result.score >= 0) & (result.score <= 1)).all()


def test_the_service_serves_the_own_bundle(own_bundle, tmp_path):
    img = Image.fromarray(_image(1, np.random.default_rng(9)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    settings = Settings(bundle=own_bundle, spool_path=tmp_path / "s.jsonl", warmup_rounds=1, redis_url=None)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/detect", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["prediction"]["label"] in CLASSES and len(body["prediction"]["probabilities"]) == 3
        assert body["effective_path"]["layers"] and set(body["verdict"]) >= {"adversarial", "score", "threshold"}
        assert body["nic"]["value_violation"]
        x = np.random.default_rng(0).random((2, 3, 16, 16)).tolist()
        oip = {"inputs": [{"name": "input", "shape": [2, 3, 16, 16], "datatype": "FP32", "data": x}]}
        r = client.post("/v2/models/tiny-resnet/infer", json=oip)
        assert r.status_code == 200, r.text


def test_cli_builds_from_model_and_data(user_files, tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    args = ["build", "--model", str(user_files["model"]), "--data", str(user_files["train"]), "--out", str(out)]
    args += ["--calibration", str(user_files["calib"]), "--nic", json.dumps(NIC), "--target-fpr", "0.1"]
    assert main(args) == 0
    assert verify_bundle(out)["name"] == "cli-bundle"
    assert main(["build", "--model", str(user_files["model"]), "--out", str(out)]) == 2
    assert "--model MODEL.onnx --data DIR" in capsys.readouterr().err


def test_label_count_must_match_the_model_outputs(user_files, tmp_path):
    two = tmp_path / "two"
    _folder(two, 5, 2)
    (two / "stripes" / "000.png").unlink()
    for p in (two / "stripes").iterdir():
        p.unlink()
    (two / "stripes").rmdir()
    with pytest.raises(DatasetError, match="2 classes but the model has 3 outputs"):
        build_bundle_from_onnx(user_files["model"], two, tmp_path / "b", BuildConfig(name="x", nic=NIC))


def test_the_fit_images_stream_through_in_batches(user_files, tmp_path, monkeypatch):
    """Every pass reads the folder one chunk at a time (class paths over every training image, the calibration
    passes); only NIC's sample is put together from its chunks."""
    from pathguard.models.builder import shards

    sizes: list[int] = []
    load = ImageFolder.load

    def recording_load(self, shape, idx=None):
        sizes.append(len(self) if idx is None else len(idx))
        return load(self, shape, idx)

    monkeypatch.setattr(ImageFolder, "load", recording_load)
    monkeypatch.setattr(shards, "CHUNK", 16)
    nic = {**NIC, "n_fit": 50, "n_pca": 50, "n_final": 40, "n_head": 100}  # NIC's sample: 120 of the 151 files
    out = tmp_path / "streamed"
    cfg = BuildConfig(name="s", nic=nic, target_fpr=0.1)
    build_bundle_from_onnx(user_files["model"], user_files["train"], out, cfg, user_files["calib"])
    assert max(sizes) == 16  # nothing is read more than one chunk at a time
    assert sizes[:10] == [16] * 9 + [7]  # class paths: every training file, 16 at a time
    assert sizes[10] == 12  # the ep_fit calibration images (20% of 60)
    assert sum(sizes[11:19]) == 120 and sizes[19] == 1  # NIC's sample, one more file for the unreadable one
    assert sizes[20:] == [16, 8] * 3  # calib_a (NIC calibration, then the verdict's inputs), then calib_b
    paths = load_bundle(out).pipeline.class_paths
    assert int(paths.images_per_class_.sum()) <= 150


def test_a_misnamed_nic_layer_fails_before_any_image_is_read(user_files, tmp_path, monkeypatch):
    reads: list[int] = []
    load = ImageFolder.load
    monkeypatch.setattr(ImageFolder, "load", lambda self, shape, idx=None: reads.append(1) or load(self, shape, idx))
    cfg = BuildConfig(name="x", nic={**NIC, "layers": ["input", "conv1", "softmax"]})
    with pytest.raises(ValueError, match="bad: \\['conv1'\\]"):
        build_bundle_from_onnx(user_files["model"], user_files["train"], tmp_path / "b", cfg, user_files["calib"])
    assert reads == []


def test_a_torch_module_takes_the_same_import_path(user_files, own_bundle, tmp_path):
    """``build_bundle_from_torch``: the module is exported to ONNX (``onnx_of_module``) and built exactly as that
    file would be by ``build_bundle_from_onnx``; the bundle keeps the export and classifies as the module does."""
    from pathguard.models import load_classifier
    from pathguard.models.builder import build_bundle_from_torch
    from pathguard.models.networks import onnx_of_module

    net = load_classifier(own_bundle).train()  # the user's network as a torch module, left in training mode
    cfg = BuildConfig(name="tiny-resnet", target_fpr=0.1, nic=NIC)
    build_bundle_from_torch(net, (3, 16, 16), user_files["train"], tmp_path / "torch", cfg, user_files["calib"])
    assert net.training  # exported in eval mode, the module's own mode restored
    net.eval()
    (tmp_path / "module.onnx").write_bytes(onnx_of_module(net, (3, 16, 16)))
    build_bundle_from_onnx(tmp_path / "module.onnx", user_files["train"], tmp_path / "file", cfg, user_files["calib"])
    ours, theirs = read_verified(tmp_path / "torch"), read_verified(tmp_path / "file")
    assert ours.manifest["source"]["model"] == "module.onnx"
    assert ours.bytes("source.onnx") == (tmp_path / "module.onnx").read_bytes()
    for name in ("classifier.onnx", "classifier.json", "class_paths.npz", "nic.npz", "nic.json", "calibration.npz"):
        assert ours.bytes(name) == theirs.bytes(name), name
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(x).softmax(1).numpy()
    np.testing.assert_allclose(load_bundle(tmp_path / "torch").pipeline.detect(x.numpy()).probabilities, expected,
                               atol=1e-5)  # fmt: skip
