"""Class paths on the committed LeNet-5 with a small MNIST training subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathguard.models.effective_path import ClassPaths, EffectivePathExtractor, extract_effective_paths
from pathguard.models.errors import NotFittedError

N_FIT = 2000


@pytest.fixture(scope="module")
def mnist_train():
    from pathguard.models.data import load_dataset

    return load_dataset("mnist", "train")


@pytest.fixture(scope="module")
def fitted(lenet, mnist_train):
    ext = EffectivePathExtractor(lenet)
    return ext, ClassPaths(10).fit(ext, mnist_train.x[:N_FIT], mnist_train.y[:N_FIT], batch_size=500)


def test_bitmap_shapes_and_sizes(fitted):
    ext, cp = fitted
    assert cp.layers_ == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    expected = [6 * 28 * 28 * 25, 16 * 10 * 10 * 150, 400 * 120, 120 * 84, 84 * 10]
    assert cp.layer_sizes_.tolist() == expected
    for name, n in zip(cp.layers_, expected, strict=True):
        assert cp.synapse_bitmaps_[name].dtype == np.uint8
        assert cp.synapse_bitmaps_[name].shape == (10, (n + 7) // 8)
    # images that entered a class path: labelled c and predicted c (LeNet is ~99% accurate)
    assert N_FIT * 0.97 < cp.images_per_class_.sum() <= N_FIT


def test_densities_sane(fitted):
    _, cp = fitted
    d = cp.densities()
    assert 0.02 < d["synapse"]["overall"] < 0.3
    for name in cp.layers_:
        assert 0 < d["synapse"][name] <= d["weight"][name] <= 1  # weight sharing: weight density >= synapse
    assert d["synapse"]["fc1"] == d["weight"]["fc1"]  # linear: one synapse per weight
    growth = cp.growth()
    assert np.all(np.diff(growth) >= 0) and growth[-1] == pytest.approx(d["synapse"]["overall"])
    assert np.all(cp.class_densities() <= growth[-1] + 1e-12)


def test_training_images_fully_inside_their_class_path(fitted, mnist_train):
    ext, cp = fitted
    pb = ext.extract(mnist_train.x[:300])
    sims = cp.similarity(pb)
    correct = (pb.classes[1].numpy() == mnist_train.y[:300]).astype(bool)
    assert correct.sum() > 290
    np.testing.assert_array_equal(sims[1][correct], 1.0)  # their own paths are part of the union
    assert sims[1].shape == sims[2].shape == (300, 5)


def test_held_out_similarity_rank1_above_rank2(fitted, mnist_test):
    ext, cp = fitted
    sims = cp.similarity(ext.extract(mnist_test.x[:500]))
    r1, r2 = sims[1].mean(0), sims[2].mean(0)
    assert np.all(r1 > 0.85)
    assert np.all(r1 > r2 + 0.05)


def test_union_matches_per_image_sets(lenet, mnist_train):
    x, y = mnist_train.x[:60], mnist_train.y[:60]
    ext = EffectivePathExtractor(lenet, batch_size=25)
    cp = ClassPaths(10).fit(ext, x, y, batch_size=25)
    paths = extract_effective_paths(lenet, torch.from_numpy(x))
    pred = lenet(torch.from_numpy(x)).argmax(1).numpy()
    for name, info in cp.layer_info_.items():
        for c in range(10):
            members = [i for i in range(len(x)) if y[i] == c and pred[i] == c]
            syn = set().union(*[set(paths[i][name].tolist()) for i in members]) if members else set()
            bits = np.unpackbits(cp.synapse_bitmaps_[name][c], count=info.n_synapses)
            assert set(np.flatnonzero(bits).tolist()) == syn, (name, c)
            wts = {int(w) for w in info.weight_ids(torch.tensor(sorted(syn), dtype=torch.int64))}
            wbits = np.unpackbits(cp.weight_bitmaps_[name][c], count=info.n_weights)
            assert set(np.flatnonzero(wbits).tolist()) == wts, (name, c)


def test_jaccard_properties(fitted):
    _, cp = fitted
    j = cp.jaccard()
    assert j.shape == (10, 10)
    np.testing.assert_allclose(j, j.T)
    np.testing.assert_allclose(np.diag(j), 1.0)
    off = j[~np.eye(10, dtype=bool)]
    assert 0.05 < off.mean() < 0.9 and off.max() < 1
    jw = cp.jaccard(level="weight")
    np.testing.assert_allclose(jw, jw.T)
    assert np.all((jw >= 0) & (jw <= 1))
    np.testing.assert_allclose(np.diag(jw), 1.0)
    assert cp.jaccard(layer="fc3")[0, 1] == 0.0  # fc3 paths of different classes start at different logits


def test_round_trip_through_npz(fitted, tmp_path, mnist_test):
    ext, cp = fitted
    path = tmp_path / "class_paths.npz"
    np.savez_compressed(path, **cp.to_arrays())
    with np.load(path, allow_pickle=False) as f:
        back = ClassPaths.from_arrays(f)
    assert back.layers_ == cp.layers_ and back.theta_ == cp.theta_
    for n in cp.layers_:
        np.testing.assert_array_equal(back.synapse_bitmaps_[n], cp.synapse_bitmaps_[n])
        np.testing.assert_array_equal(back.weight_bitmaps_[n], cp.weight_bitmaps_[n])
    assert back.densities() == cp.densities()
    pb = ext.extract(mnist_test.x[:40])
    np.testing.assert_array_equal(back.similarity(pb)[2], cp.similarity(pb)[2])


def test_from_arrays_rejects_bad_shapes(fitted):
    _, cp = fitted
    arrays = cp.to_arrays()
    arrays["synapses_1"] = arrays["synapses_1"][:, :-1]
    with pytest.raises(ValueError, match="conv2"):
        ClassPaths.from_arrays(arrays)


def test_partial_paths_use_matching_columns(lenet, fitted, mnist_test):
    ext, cp = fitted
    x = mnist_test.x[:64]
    full = cp.similarity(ext.extract(x))
    part = cp.similarity(EffectivePathExtractor(lenet, last_k=3).extract(x))
    np.testing.assert_array_equal(part[1], full[1][:, 2:])


def test_unfitted_raises():
    with pytest.raises(NotFittedError):
        ClassPaths(10).densities()


def test_ep_report_small_run(tmp_path):
    import json

    from pathguard.models.evaluation.ep_report import THETAS, run_report
    from tests.conftest import CIFAR_CLASSIFIER, MNIST_CLASSIFIER

    logs = []
    rep = run_report(tmp_path, MNIST_CLASSIFIER, CIFAR_CLASSIFIER, theta_images=100, skip_cifar=True,
                     progress=False, log=logs.append, mnist_images=200, test_images=50)  # fmt: skip
    for name in ("jaccard_mnist.png", "growth_mnist.png", "theta_mnist.png", "similarity_mnist.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    saved = json.loads((tmp_path / "report.json").read_text())
    m = saved["mnist"]
    assert m["images"] == 200 and rep["mnist"]["density"] == m["density"]
    assert m["growth_synapse"][-1] == pytest.approx(m["density"]["synapse"]["overall"])
    sizes = [row["synapses_per_image"] for row in m["theta_sweep"]]
    assert [row["theta"] for row in m["theta_sweep"]] == list(THETAS) and sizes == sorted(sizes)
    assert 0 < m["jaccard_mean_offdiag"] < 1
