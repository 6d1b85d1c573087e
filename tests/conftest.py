"""Shared fixtures. Tests read the real datasets from PATHGUARD_DATA_DIR (default: ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SHARED = ROOT.parent / "shared" / "data"
if "PATHGUARD_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["PATHGUARD_DATA_DIR"] = str(_SHARED)
# In-process apps serve no gRPC unless a test asks for it (the default port 8081 would clash between apps).
os.environ.setdefault("PATHGUARD_GRPC_PORT", "0")

ARTIFACTS = ROOT / "artifacts"
MNIST_CLASSIFIER = ARTIFACTS / "classifiers" / "mnist-lenet5"
CIFAR_CLASSIFIER = ARTIFACTS / "classifiers" / "cifar10-cnn"


@pytest.fixture(scope="session")
def mnist_test():
    from pathguard.models.data import load_dataset

    return load_dataset("mnist", "test")


@pytest.fixture(scope="session")
def cifar_test():
    from pathguard.models.data import load_dataset

    return load_dataset("cifar10", "test")


@pytest.fixture(scope="session")
def lenet():
    from pathguard.models import load_classifier

    return load_classifier(MNIST_CLASSIFIER)


@pytest.fixture(scope="session")
def cifar_cnn():
    from pathguard.models import load_classifier

    return load_classifier(CIFAR_CLASSIFIER)


# NIC parameters small enough for bundles built inside the test run (seconds, not minutes)
TINY_NIC = {"n_fit": 300, "n_final": 200, "n_pca": 300, "n_head": 2000, "head_epochs": 2, "holdout": 300, "pca_dim": 16}


@pytest.fixture(scope="session")
def supervised_bundle(tmp_path_factory):
    """A tiny MNIST bundle built in supervised mode (defaults: logistic regression on all features; FGSM and BIM)."""
    from pathguard.models.builder import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-supervised"
    cfg = BuildConfig(
        name="tiny-supervised",
        n_train=4000,
        n_calib=1500,
        target_fpr=0.1,
        nic=TINY_NIC,
        supervised_attacks=["fgsm", "bim"],
    )
    build_bundle("mnist", MNIST_CLASSIFIER, out, cfg)
    return out


def nested_keys(row: dict, prefix: str = "") -> set[str]:
    """Every key of a nested dict (an answer's fields), dotted by its path: what two answers of the same shape share."""
    out = set()
    for k, v in row.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= nested_keys(v, f"{prefix}{k}.")
    return out
