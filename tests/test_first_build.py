"""A new user's first build: a 3-class image folder with 150 training images per class and the README's command
(`pathguard build --model model.onnx --data train/ --calibration holdout/ --out ...`, no NIC flag) builds,
verifies and serves; NIC's sizes scale to the images given, with a warning that states the cost, and below
NIC's true minimum the error is one line saying how many images are needed and why."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pathguard.models.bundle import bundle_sha256
from pathguard.models.bundle.stored import has_stored_graph, load_stored
from pathguard.models.errors import DatasetError
from pathguard.models.nic import MIN_IMAGES, NICDetector, NICSizes, NICSizeWarning, size_to_data
from pathguard.service.app import create_app
from pathguard.service.cli import main
from pathguard.service.settings import Settings
from tests.test_onnx_import import TinyResNet, _export, _randomized
from tests.test_own_classifier import CLASSES, _folder, _image

DEFAULTS = NICSizes(n_fit=2000, n_final=1000, n_pca=1000, holdout=2000, pca_dim=64)


@pytest.fixture(scope="module")
def first_folder(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first")
    net = TinyResNet()
    net.head[-1] = torch.nn.Linear(16, len(CLASSES))
    (root / "model.onnx").write_bytes(_export(_randomized(net, 5), (3, 16, 16)))
    return {"root": root, "model": root / "model.onnx", "train": _folder(root / "train", 150, 0)}


def _readme_build(files: dict[str, Path], train: Path, holdout: Path, out: Path) -> int:
    args = ["build", "--model", str(files["model"]), "--data", str(train), "--calibration", str(holdout)]
    return main([*args, "--out", str(out)])


def test_the_readme_command_builds_verifies_and_serves_150_images_per_class(first_folder, capsys):
    out = first_folder["root"] / "bundle"
    holdout = _folder(first_folder["root"] / "holdout", 50, 1)
    assert _readme_build(first_folder, first_folder["train"], holdout, out) == 0
    captured = capsys.readouterr()
    err, report = captured.err, json.loads(captured.out)
    # stored in the bundle: a server without torch serves it too
    assert report["stored_graph"]["stored"] and report["sha256"] == bundle_sha256(out)
    assert has_stored_graph(out) and "effective_path" in load_stored(out).graph_components
    warning = [line for line in err.splitlines() if "warning: NIC scaled to 450 training images" in line]
    assert len(warning) == 1, err
    assert "instead of 2000" in warning[0] and "Cost:" in warning[0] and "5000 or more" in warning[0]
    nic = json.loads((out / "nic.json").read_text())
    assert nic["fitted_sizes"] == {"n_fit": 270, "n_final": 135, "n_pca": 270, "holdout": 45, "pca_dim": 64}
    assert nic["params"]["n_fit"] == 2000  # the configured parameters stay as given

    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith("OK:")

    buf = io.BytesIO()
    Image.fromarray(_image(2, np.random.default_rng(7))).save(buf, format="PNG")
    settings = Settings(bundle=out, spool_path=first_folder["root"] / "spool.jsonl", warmup_rounds=1, redis_url=None)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/detect", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["prediction"]["label"] in CLASSES and body["nic"]["value_violation"]
        assert 0.0 <= body["verdict"]["score"] <= 1.0


def test_below_the_minimum_the_error_is_one_line_with_the_count_and_why(first_folder, capsys):
    few = _folder(first_folder["root"] / "few", 20, 2)  # 60 images, fewer than MIN_IMAGES
    holdout = _folder(first_folder["root"] / "few-holdout", 50, 3)
    assert _readme_build(first_folder, few, holdout, first_folder["root"] / "few-bundle") == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress bars, then the error
    err = [line for line in lines if "error" in line]
    assert len(err) == 1 and lines[-1] == err[0] and err[0].startswith("pathguard build: error: "), lines
    assert f"NIC needs at least {MIN_IMAGES} training images" in err[0] and "and got 60" in err[0]
    assert "value and provenance models" in err[0] and "final model" in err[0]
    assert not (first_folder["root"] / "few-bundle").exists()


def test_sizes_are_unchanged_when_the_images_suffice():
    assert size_to_data(DEFAULTS, 5000) == (DEFAULTS, None)
    assert size_to_data(DEFAULTS, 60000) == (DEFAULTS, None)
    sizes, note = size_to_data(DEFAULTS, 3000, has_validation=True)  # nothing held out: 3,000 suffice
    assert note is None and sizes.holdout == 0 and sizes.n_fit == 2000


@pytest.mark.parametrize("n", [MIN_IMAGES, 100, 450, 1000, 4999])
def test_scaled_sizes_fit_the_images_and_keep_their_proportions(n):
    sizes, note = size_to_data(DEFAULTS, n)
    assert note is not None and note.startswith(f"NIC scaled to {n} training images")
    assert sizes.holdout + sizes.n_fit + sizes.n_final <= n
    assert sizes.n_fit >= 40 and sizes.n_final >= 20 and sizes.holdout >= 10
    assert abs(sizes.n_fit / (sizes.n_fit + sizes.n_final) - 2 / 3) < 0.05
    assert sizes.n_pca <= sizes.n_fit and 1 <= sizes.pca_dim <= sizes.n_pca // 4


def test_too_few_images_is_refused_with_the_minimum():
    with pytest.raises(DatasetError, match=f"at least {MIN_IMAGES} training images .* and got {MIN_IMAGES - 1}"):
        size_to_data(DEFAULTS, MIN_IMAGES - 1)
    with pytest.raises(DatasetError, match="at least 60 training images"):  # nothing held out with validation
        size_to_data(DEFAULTS, 59, has_validation=True)


def test_hand_set_sizes_wider_than_their_pca_sample_fit(tiny_resnet_data):
    """The issue's second failure: sizes set by hand with fewer PCA images than PCA dimensions (scikit-learn's
    PCA refused). The width now scales to a quarter of the PCA sample, with a warning."""
    model, x, y = tiny_resnet_data
    nic = NICDetector(n_fit=80, n_final=40, n_pca=30, holdout=20, n_head=200, head_epochs=1, pca_dim=64)
    with pytest.warns(NICSizeWarning, match="PCA to 7 dimensions on 30 images instead of 64 on 30"):
        nic.fit(model, x, y)
    assert nic.sizes_ == NICSizes(n_fit=80, n_final=40, n_pca=30, holdout=20, pca_dim=7)
    widths = [nic.members_[0].stages[name].weight.shape[1] for name in nic.layers_ if name != "softmax"]
    assert max(widths) <= 7
    restored = NICDetector.from_arrays(nic.to_arrays(), nic.config())
    assert restored.sizes_ == nic.sizes_ and restored.config()["fitted_sizes"]["pca_dim"] == 7


def test_a_detector_fitted_at_its_full_sizes_records_nothing_extra(tiny_resnet_data):
    model, x, y = tiny_resnet_data
    nic = NICDetector(n_fit=80, n_final=40, n_pca=80, holdout=20, n_head=200, head_epochs=1, pca_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NICSizeWarning)
        nic.fit(model, x, y)
    assert "fitted_sizes" not in nic.config() and not nic.scaled_


@pytest.fixture(scope="module")
def tiny_resnet_data(first_folder):
    from pathguard.models.networks import import_onnx

    model = import_onnx(first_folder["model"].read_bytes())
    rng = np.random.default_rng(4)
    x = np.stack([_image(k % 3, rng) for k in range(150)]).astype(np.float32) / 255.0
    x = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(16, 16)).numpy()
    return model, x, np.arange(150) % 3
