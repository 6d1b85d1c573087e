"""The committed bundles give the same verdicts as before the restructuring into the pathguard namespace.

`tests/data/verdicts_before_restructure.json` was computed once with the code of commit 70df9a4 (the last one
before it; `models.pipeline.load_bundle(...).pipeline.detect` on the first test images of each dataset), on the
same bundle files (only the manifests have changed since: the per-class ranges were added).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pathguard.models.bundle import load_bundle
from pathguard.models.data import load_dataset
from tests.conftest import ARTIFACTS

BEFORE = json.loads((Path(__file__).parent / "data" / "verdicts_before_restructure.json").read_text())
DATASETS = {"mnist-lenet5": "mnist", "cifar10-cnn": "cifar10"}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_committed_bundle_verdicts_are_unchanged(name):
    before = BEFORE[name]
    x = load_dataset(DATASETS[name], "test").x[: before["n"]]
    r = load_bundle(ARTIFACTS / name).pipeline.detect(x)
    assert r.predicted.tolist() == before["predicted"]
    assert r.adversarial.tolist() == before["adversarial"]
    for key in ("score", "ep_score", "nic_score"):
        np.testing.assert_allclose(getattr(r, key), before[key], atol=1e-6, rtol=0, err_msg=key)
