from __future__ import annotations

import numpy as np
import pytest
import torch

from pathguard.models.nic import BatchedOCSVM, ExportedOCSVM, fit_ocsvm


@pytest.fixture(scope="module")
def lenet_acts(lenet, mnist_test):
    """Real LeNet-5 activations of MNIST test images: fc1 (120-d) and pool1 (1176-d)."""
    with torch.no_grad():
        _, taps = lenet.forward_with_taps(torch.from_numpy(mnist_test.x[:900]))
    return {k: taps[k].reshape(900, -1).double().numpy() for k in ("fc1", "pool1", "fc2")}


@pytest.mark.parametrize(("layer", "gamma"), [("fc1", "scale"), ("fc2", 0.05), ("pool1", "scale")])
def test_torch_scorer_matches_sklearn_on_real_activations(lenet_acts, layer, gamma):
    X = lenet_acts[layer]
    svm = fit_ocsvm(X[:500], nu=0.1, gamma=gamma)
    exp = ExportedOCSVM.from_sklearn(svm)
    ref = svm.decision_function(X[500:])
    got = exp.decision_function(torch.from_numpy(X[500:])).numpy()
    assert np.abs(got - ref).max() < 1e-5
    assert (ref > 0).any() and (ref < 0).any()  # a real boundary, not a constant
    assert exp.n_support >= 0.1 * 500


def test_arrays_round_trip_several_svms_in_one_npz(tmp_path, lenet_acts):
    a = ExportedOCSVM.from_sklearn(fit_ocsvm(lenet_acts["fc1"][:300], 0.1, "scale"))
    b = ExportedOCSVM.from_sklearn(fit_ocsvm(lenet_acts["fc2"][:300], 0.05, "scale"))
    np.savez(tmp_path / "svms.npz", **{**a.to_arrays("vi.fc1."), **b.to_arrays("vi.fc2.")})  # type: ignore[arg-type]
    with np.load(tmp_path / "svms.npz", allow_pickle=False) as z:
        arrays = dict(z)
    a2, b2 = ExportedOCSVM.from_arrays(arrays, "vi.fc1."), ExportedOCSVM.from_arrays(arrays, "vi.fc2.")
    X = torch.from_numpy(lenet_acts["fc2"][300:400])
    assert torch.equal(b2.decision_function(X), b.decision_function(X))
    assert a2.intercept == a.intercept and a2.gamma == a.gamma
    np.testing.assert_array_equal(a2.support_vectors, a.support_vectors)
    with pytest.raises(KeyError, match="missing"):
        ExportedOCSVM.from_arrays(arrays, "vi.conv9.")


def test_batched_scorer_equals_individual_scorers(lenet_acts):
    dims = (7, 20, 13)
    svms, xs = [], []
    for i, d in enumerate(dims):
        X = lenet_acts["fc1"][:, i * 20 : i * 20 + d]
        svms.append(ExportedOCSVM.from_sklearn(fit_ocsvm(X[: 200 + 100 * i], nu=0.1 + 0.1 * i)))
        xs.append(torch.from_numpy(X[600:650]))
    assert len({s.n_support for s in svms}) == 3  # padding of support vectors is exercised
    batched = BatchedOCSVM(svms).decision_function(xs)
    assert batched.shape == (50, 3)
    for i, s in enumerate(svms):
        torch.testing.assert_close(batched[:, i], s.decision_function(xs[i]), atol=1e-9, rtol=0)


def test_float32_scoring_is_close_but_float64_is_default(lenet_acts):
    X = lenet_acts["fc2"]
    exp = ExportedOCSVM.from_sklearn(fit_ocsvm(X[:400]))
    x = torch.from_numpy(X[400:])
    assert exp.decision_function(x).dtype == torch.float64
    d32 = exp.decision_function(x, dtype=torch.float32).double()
    assert (d32 - exp.decision_function(x)).abs().max() < 1e-2


def test_rejects_wrong_shapes_and_kernels(lenet_acts):
    from sklearn.svm import OneClassSVM

    exp = ExportedOCSVM.from_sklearn(fit_ocsvm(lenet_acts["fc2"][:100]))
    with pytest.raises(ValueError, match="shape"):
        exp.decision_function(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="rbf"):
        ExportedOCSVM.from_sklearn(OneClassSVM(kernel="linear").fit(lenet_acts["fc2"][:50]))
