"""NIC inside the served ONNX graph: the graph's scores against the torch scorer on real activations."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pathguard.models.errors import NotFittedError
from pathguard.models.networks import ClassifierConfig, TappedSequential
from pathguard.models.networks.persistence import export_onnx
from pathguard.models.nic import NICDetector, layer_activation
from pathguard.models.nic.onnx_export import GraphNICScores, nic_output_names, with_nic_outputs

from .conftest import ARTIFACTS

N_IMAGES = 300


def _run(model: onnx.ModelProto, x: np.ndarray, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every graph output (plus the intermediate tensors ``extra``) for inputs x."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in extra)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x}), strict=True))


def _torch_scores(nic: NICDetector, x: np.ndarray, outs: dict[str, np.ndarray], member: int = 0) -> tuple:
    """``NICDetector.raw_scores`` on the graph's own logits and taps (the activations the service scores)."""
    logits = torch.from_numpy(outs["logits"])
    taps = {k: torch.from_numpy(v) for k, v in outs.items()}
    acts = {n: layer_activation(n, torch.from_numpy(x), logits, taps) for n in nic.layers_}
    return tuple(t.numpy() for t in nic.raw_scores(acts, member))


def _assert_close_to_scale(graph: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> None:
    """|graph - ref| <= rel * (scale of the output), the scale being its largest magnitude (at least 1): what two
    float32 evaluations of the reductions can agree to."""
    assert graph.shape == ref.shape and graph.dtype == np.float64
    tol = rel * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(graph, ref, rtol=0, atol=tol)


@pytest.fixture(scope="module", params=[("mnist-lenet5", "mnist"), ("cifar10-cnn", "cifar10")], ids=["mnist", "cifar"])
def committed(request):
    """A committed bundle's classifier.onnx and NIC detector, and real test images."""
    from pathguard.models.bundle import load_bundle
    from pathguard.models.data import load_dataset

    name, dataset = request.param
    bundle = load_bundle(ARTIFACTS / name, seed=0)  # noise copies seeded
    return bundle.onnx_bytes, bundle.pipeline.nic, load_dataset(dataset, "test").x[:N_IMAGES]


def test_committed_bundle_graph_scores_match_the_torch_scorer(committed):
    onnx_bytes, nic, x = committed
    model = with_nic_outputs(onnx_bytes, nic)
    outs = _run(model, x)
    value, prov, final = _torch_scores(nic, x, outs)
    assert outs["nic_value"].shape == (N_IMAGES, len(nic.layers_))
    assert outs["nic_provenance"].shape == (N_IMAGES, len(nic.pairs_))
    # float32 reductions of the retrained LeNet-5's bundle agree to 2e-5 of the scale (the earlier one's to 1e-5)
    _assert_close_to_scale(outs["nic_value"], value, rel=3e-5)
    _assert_close_to_scale(outs["nic_provenance"], prov, rel=3e-5)
    _assert_close_to_scale(outs["nic_final"], final, rel=3e-5)
    # the scores separate images: parity is not two constant outputs agreeing
    assert outs["nic_final"].std() > 0.1
    # the classifier's own outputs are untouched
    plain = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    for o, ref in zip(plain.get_outputs(), plain.run(None, {"input": x}), strict=True):
        np.testing.assert_array_equal(outs[o.name], ref)


def test_committed_bundle_graph_svms_are_exact_given_the_same_inputs(committed):
    """The float64 part (every one-class SVM, the final standardization) agrees with torch to ~1e-12 when fed the
    graph's own float32 features and derived-model outputs: the only differences left are float32 roundings."""
    onnx_bytes, nic, x = committed
    assert nic.layers_[-1] == "softmax"
    feats = tuple(f"nic/m0/{n}/feats" for n in nic.layers_[:-1])
    pi_inputs = tuple(f"nic/m0/pi{i}/input" for i in range(len(nic.pairs_)))
    outs = _run(with_nic_outputs(onnx_bytes, nic), x, feats + pi_inputs)
    for j, name in enumerate(nic.layers_[:-1]):  # every layer but the softmax
        f = torch.from_numpy(outs[f"nic/m0/{name}/feats"])
        vi = nic.value_score(name, f).numpy()
        np.testing.assert_allclose(outs["nic_value"][:, j], vi, rtol=1e-12, atol=1e-11)
        z = torch.from_numpy(outs["nic_head_logits"][:, j])  # the head's logits: a float32 Gemm of the features
        stage = nic.members_[0].stages[name]
        torch.testing.assert_close(z, torch.addmm(stage.head_bias, f, stage.head_weight), atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(outs["nic_head_logits"][:, -1], outs["logits"])  # the softmax layer: the network's
    for i in range(len(nic.pairs_)):
        pin = torch.from_numpy(outs[f"nic/m0/pi{i}/input"])  # (N, 2K): onnxruntime's softmaxes of the head logits
        probs = torch.softmax(torch.from_numpy(outs["nic_head_logits"][:, i : i + 2]), -1).reshape(len(x), -1)
        torch.testing.assert_close(pin, probs, atol=1e-6, rtol=0)  # torch's softmax, to the last bits
        k = pin.shape[1] // 2
        pi = nic.provenance_score(i, pin[:, :k], pin[:, k:]).numpy()
        np.testing.assert_allclose(outs["nic_provenance"][:, i], pi, rtol=1e-12, atol=1e-11)
    value, prov = torch.from_numpy(outs["nic_value"]), torch.from_numpy(outs["nic_provenance"])
    np.testing.assert_allclose(outs["nic_final"], nic.final_score(value, prov).numpy(), rtol=1e-12, atol=1e-11)


def test_per_layer_export_and_read_back(committed):
    onnx_bytes, nic, x = committed
    full = _run(with_nic_outputs(onnx_bytes, nic), x[:5])
    per_layer = _run(with_nic_outputs(onnx_bytes, nic, provenance=False), x[:5])
    assert "nic_provenance" not in per_layer and "nic_final" not in per_layer
    for name in ("nic_value", "nic_head_logits", "logits"):
        np.testing.assert_array_equal(per_layer[name], full[name])
    g = GraphNICScores.from_outputs(full)
    assert g.value.dtype == torch.float64 and g.head_logits.shape == (5, len(nic.layers_), nic.n_classes_)
    assert g.final is not None and g.final.shape == (5,) and g.provenance is not None
    np.testing.assert_array_equal(g.provenance.numpy(), full["nic_provenance"])
    partial = GraphNICScores.from_outputs(per_layer)
    assert partial.provenance is None and partial.final is None
    with pytest.raises(KeyError):
        GraphNICScores.from_outputs(per_layer, member=1)


# ---------------------------------------------------------------------- a small random network, randomized members
def _small_net(seed: int) -> TappedSequential:
    torch.manual_seed(seed)
    layers = OrderedDict(
        conv1=nn.Conv2d(1, 4, 5, stride=2),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(4 * 6 * 6, 32),
        relu2=nn.ReLU(),
        fc2=nn.Linear(32, 10),
    )
    return TappedSequential(layers, ClassifierConfig("small", 1, 28, 28, num_classes=10)).eval()


@pytest.fixture(scope="module")
def small(tmp_path_factory, mnist_test):
    """A random LeNet-like net exported to ONNX in tmp_path, and NIC with two randomized members fitted on it."""
    model = _small_net(0)
    path = tmp_path_factory.mktemp("small") / "classifier.onnx"
    export_onnx(model, path)
    x, y = mnist_test.x[:1200], mnist_test.y[:1200]
    params = dict(pca_dim=8, n_fit=150, n_final=100, n_pca=120, n_head=400, head_epochs=1, holdout=0)
    nic = NICDetector(n_random=2, random_levels=(2.0, 4.0), seed=3, **params).fit(model, x[:800], y[:800])
    return path.read_bytes(), nic, x[800:1100]


def test_randomized_members_in_the_graph_match_the_torch_scorer(small):
    onnx_bytes, nic, x = small
    assert nic.n_members == 3
    assert any(nic.members_[k].stages[n].scale > 0 for k in (1, 2) for n in nic.layers_)  # quantized stages
    outs = _run(with_nic_outputs(onnx_bytes, nic, members=None), x)
    for k in range(nic.n_members):
        v_name, _, p_name, f_name = nic_output_names(k)
        value, prov, final = _torch_scores(nic, x, outs, member=k)
        _assert_close_to_scale(outs[v_name], value)
        _assert_close_to_scale(outs[p_name], prov)
        _assert_close_to_scale(outs[f_name], final)
    # members differ: each output really is its own member's
    assert not np.allclose(outs["nic_final"], outs["nic_final_m1"], atol=1e-3)


def test_default_export_has_member_zero_only(small):
    onnx_bytes, nic, _ = small
    names = {o.name for o in with_nic_outputs(onnx_bytes, nic).graph.output}
    assert set(nic_output_names(0)) <= names
    assert not names & set(nic_output_names(1))


def test_export_refuses_what_it_cannot_score(small):
    onnx_bytes, nic, _ = small
    with pytest.raises(NotFittedError):
        with_nic_outputs(onnx_bytes, NICDetector())
    with pytest.raises(ValueError, match="member 5"):
        with_nic_outputs(onnx_bytes, nic, members=[5])
    with pytest.raises(ValueError, match="already has"):
        with_nic_outputs(with_nic_outputs(onnx_bytes, nic), nic)
    renamed = onnx.load_from_string(onnx_bytes)  # the checked tap pool1 is no longer a tensor of the graph
    for node in renamed.graph.node:
        node.input[:] = ["p1" if t == "pool1" else t for t in node.input]
        node.output[:] = ["p1" if t == "pool1" else t for t in node.output]
    del renamed.graph.output[:]
    renamed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in ("logits", "p1"))
    assert "pool1" in nic.layers_
    with pytest.raises(ValueError, match="pool1"):
        with_nic_outputs(renamed, nic)


def test_channel_mean_reduction_in_the_graph_matches_the_torch_scorer(small, mnist_test):
    """The per-channel-mean reduction is one affine map like PCA, so the graph export needs nothing new."""
    onnx_bytes, _, x = small
    model = _small_net(0)
    params = dict(pca_dim=8, n_fit=150, n_final=100, n_pca=120, n_head=400, head_epochs=1, holdout=0)
    nic = NICDetector(reduction="channel_mean", seed=3, **params).fit(model, mnist_test.x[:800], mnist_test.y[:800])
    assert nic.members_[0].stages["conv1"].weight.shape == (4 * 12 * 12, 4)  # one feature per channel
    outs = _run(with_nic_outputs(onnx_bytes, nic), x)
    value, prov, final = _torch_scores(nic, x, outs)
    _assert_close_to_scale(outs["nic_value"], value)
    _assert_close_to_scale(outs["nic_provenance"], prov)
    _assert_close_to_scale(outs["nic_final"], final)
