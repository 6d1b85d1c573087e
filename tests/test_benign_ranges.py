"""Per-class benign similarity ranges: hand-checked quantiles, array round trip, and the same bytes whether
a build writes them or they are added to a bundle built before they existed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pathguard.models.builder.builder import add_benign_ranges
from pathguard.models.bundle import BENIGN_RANGES, load_bundle, read_verified, write_bundle
from pathguard.models.effective_path import ClassSimilarityRanges
from pathguard.models.errors import NotFittedError


def test_ranges_by_predicted_class_on_a_hand_built_example():
    # 2 layers: columns rank1(l0, l1), rank2(l0, l1); class 0 has 11 images, class 1 has 3 (too few)
    f0 = np.column_stack([np.linspace(0.5, 1.0, 11), np.full(11, 0.9), np.linspace(0.0, 0.5, 11), np.zeros(11)])
    f1 = np.full((3, 4), 0.7)
    ranges = ClassSimilarityRanges(tail=0.1).fit(np.vstack([f0, f1]), np.r_[np.zeros(11), np.ones(3)], 3)
    np.testing.assert_allclose(ranges.median_[0], [0.75, 0.9, 0.25, 0.0])
    np.testing.assert_allclose(ranges.bound_[0], [0.55, 0.9, 0.45, 0.0])  # 10% low for rank-1, 90% high for rank-2
    assert np.isnan(ranges.median_[1]).all() and np.isnan(ranges.median_[2]).all()
    assert ranges.count_.tolist() == [11, 3, 0]
    back = ClassSimilarityRanges.from_arrays(ranges.to_arrays())
    np.testing.assert_array_equal(back.bound_, ranges.bound_)
    assert back.tail == 0.1
    with pytest.raises(NotFittedError):
        ClassSimilarityRanges().to_arrays()


def test_adding_ranges_to_an_older_bundle_gives_the_builds_bytes(tiny_bundle, tmp_path):
    built = read_verified(tiny_bundle)
    older = tmp_path / "older"
    blobs = {k: v for k, v in built.blobs.items() if k != BENIGN_RANGES}
    write_bundle(older, blobs, {k: v for k, v in built.manifest.items() if k not in ("files", "schema_version")})
    assert load_bundle(older).benign_ranges is None  # a bundle without them still loads
    add_benign_ranges(older)
    upgraded = read_verified(older)
    assert upgraded.bytes(BENIGN_RANGES) == built.bytes(BENIGN_RANGES)
    assert all(upgraded.bytes(k) == v for k, v in blobs.items())  # every other file untouched
    assert json.loads(json.dumps(upgraded.manifest["files"])) == built.manifest["files"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from pathguard.models.builder import BuildConfig, build_bundle
    from tests.conftest import MNIST_CLASSIFIER, TINY_NIC

    out = tmp_path_factory.mktemp("ranges") / "tiny"
    build_bundle("mnist", MNIST_CLASSIFIER, out, BuildConfig(name="tiny", n_train=3000, n_calib=1000, nic=TINY_NIC))
    shutil.rmtree(out.parent / ".cache", ignore_errors=True)
    return out
