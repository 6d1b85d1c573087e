"""Effective Path's exact walk inside the guarded graph (:mod:`pathguard.models.effective_path.ingraph`): the same
synapses as the exact walk, on the committed bundles and on a small network with every step kind it supports; its
ONNX form scores what the pipeline scores; a walk it cannot hold is refused by name."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pathguard.models.bundle import load_bundle
from pathguard.models.components.graph import NotInGraphError
from pathguard.models.data import interleaved_order
from pathguard.models.effective_path import EffectivePathExtractor, ingraph
from pathguard.models.effective_path.ingraph import GraphEffectivePath, GraphWalk
from pathguard.models.guarded import guarded_model, noise_inputs
from pathguard.models.networks import Residual, tap_points
from pathguard.service.cli import main
from tests.conftest import ARTIFACTS
from tests.test_effective_path import net_residual

MNIST = ARTIFACTS / "mnist-lenet5"


def _same_synapses(walk: GraphWalk, extractor: EffectivePathExtractor, x: torch.Tensor, start: torch.Tensor) -> None:
    """Every image's rank-1 and rank-2 synapse ids of every layer equal the exact walk's, and so do the classes."""
    ref = extractor.extract(x, ranks=(1, 2))
    with torch.no_grad():
        classes, found = walk.trace(start, ref.logits)
    assert set(found) <= set(ref.layers) and walk.layers == ref.layers
    for k, r in enumerate((1, 2)):
        assert torch.equal(classes[k], ref.classes[r])
        for layer in ref.layers:
            dense = found[layer].dense(2, len(x), walk.synapses[layer])[k] if layer in found else None
            for i in range(len(x)):
                got = torch.zeros(0, dtype=torch.int64) if dense is None else torch.nonzero(dense[i]).reshape(-1)
                assert torch.equal(got, ref.image(r, i)[layer]), (r, layer, i)


def _small_net() -> nn.Sequential:
    """Padding, stride, dilation, a residual block with a projection shortcut, a tiled max pool, a padded average
    pool, a global average pool, linear layers."""
    torch.manual_seed(0)
    block = Residual(
        nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2, dilation=2)),
        shortcut=nn.Conv2d(6, 8, 1, stride=2),
    )
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        block,
        nn.ReLU(),
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.ReLU(),
        nn.Linear(6, 4),
    ).eval()


@pytest.mark.parametrize("theta", [0.5, 0.3, 0.9])
def test_the_in_graph_walk_selects_the_exact_synapses_on_every_step_kind(theta):
    net = _small_net()
    x = torch.rand(12, 3, 16, 16) - 0.3  # negative inputs too: negated rows and non-positive sums
    extractor = EffectivePathExtractor(net, theta=theta, input_shape=(3, 16, 16), fast_path=False)
    _same_synapses(GraphWalk(net, (3, 16, 16), theta), extractor, x, x)
    tail = EffectivePathExtractor(net, theta=theta, last_k=3, input_shape=(3, 16, 16), fast_path=False)
    _same_synapses(GraphWalk(net, (3, 16, 16), theta, last_k=3), tail, x, x)


@pytest.mark.parametrize("name,dataset", [("mnist-lenet5", "mnist"), ("cifar10-cnn", "cifar10")])
def test_the_in_graph_walk_selects_the_exact_synapses_of_the_committed_bundles(name, dataset, request):
    """The LeNet-5 walk over all five layers from the input, by the relative rule; the CNN's over its last three from
    the flatten tap, by the cumulative rule."""
    test = request.getfixturevalue(f"{'mnist' if dataset == 'mnist' else 'cifar'}_test")
    ep = load_bundle(ARTIFACTS / name).pipeline.components["effective_path"]
    ex = ep.extractor
    assert ex.relative == (name == "mnist-lenet5")
    walk = GraphWalk(
        ex.model,
        ex.input_shape,
        ex.theta,
        ex.last_k,
        tap_points(ex.model),
        thresholds=ex.thresholds,
        relative=ex.relative,
    )
    assert walk.start_tap == (None if name == "mnist-lenet5" else "flatten")
    x = torch.from_numpy(test.x[interleaved_order(test.y)[:20]])
    with torch.no_grad():
        _, taps = ex.model.forward_with_taps(x)
    _same_synapses(walk, ex, x, x if walk.start_tap is None else taps[walk.start_tap])


def test_its_onnx_form_scores_what_the_component_scores(mnist_test):
    ep = load_bundle(MNIST).pipeline.components["effective_path"]
    ex = ep.extractor
    module = GraphEffectivePath(ep.graph_walk(), ep.class_paths, ep.ep_score)
    sess = ort.InferenceSession(module.to_onnx(), providers=["CPUExecutionProvider"])
    x = torch.from_numpy(mnist_test.x[interleaved_order(mnist_test.y)[:30]])
    with torch.no_grad():
        logits, taps = ex.model.forward_with_taps(x)
    features, score = sess.run(None, {"input": x.numpy(), "logits": logits.numpy()})
    part = ep.extract(x, logits, taps)
    np.testing.assert_array_equal(features, np.concatenate([part.sims[1], part.sims[2]], 1))
    np.testing.assert_allclose(score, part.raw, rtol=0, atol=1e-12)
    assert (score > 0).any() and (features[:, : len(ep.layers)] > 0.5).all()  # rank 1 lies on its class path


def test_the_mnist_bundle_exports_whole_with_the_pipelines_verdict(mnist_test):
    """Every component of the MNIST verdict (Effective Path, NIC, NIC VI, the noise response, squeezing) in one
    graph, fed the pipeline's noise: the same raw Effective Path scores, and the pipeline's fused scores and
    verdicts wherever NIC VI's float32 rounding does not move a p-value step."""
    bundle = load_bundle(MNIST, seed=0)
    pipe = bundle.pipeline
    x = torch.from_numpy(mnist_test.x[interleaved_order(mnist_test.y)[:40]])
    ((name, _, copies),) = noise_inputs(bundle)
    noise = torch.stack([torch.randn((copies, *x.shape[1:]), generator=g) for g in pipe._generators(x)], 1)
    model = guarded_model(bundle, noise="input")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy(), name: noise.numpy()})))
    res, raw = pipe.detect_with_components(x)
    assert {f"raw_{k}" for k in pipe.verdict.components} <= set(out)
    np.testing.assert_allclose(out["raw_effective_path"], raw["effective_path"], rtol=0, atol=1e-9)
    # NIC VI sums per-layer log p-values: where a layer's score lies within float32 rounding of a calibration score
    # (onnxruntime's forward pass against torch's), its p-value moves one step (tests/test_guarded.py)
    vi_agrees = np.abs(out["raw_nic_vi"] - raw["nic_vi"]) < 1e-6
    assert vi_agrees.mean() >= 0.85
    assert np.abs(out["verdict_score"] - res.score)[vi_agrees].max() < 1e-3
    same = out["is_adversarial"] == res.adversarial
    assert same.mean() >= 0.95 and (same | ~vi_agrees).all()


def test_a_walk_the_graph_cannot_hold_is_refused_by_name(monkeypatch, tmp_path, capsys):
    with pytest.raises(NotImplementedError, match="grouped"):
        GraphWalk(net_residual(), (4, 12, 12))
    residual = load_bundle(ARTIFACTS / "cifar10-resnet20")
    # the residual network's 22 weighted layers are over the budget; the committed bundle's chosen form (the
    # absolute rule on the last three layers, 4.7 million synapses) is in it
    with pytest.raises(NotImplementedError, match="22 layers have 40.8 million synapses"):
        GraphWalk(residual.classifier, (3, 32, 32), 0.5, None, tap_points(residual.classifier))
    assert residual.pipeline.components["effective_path"].graph_unavailable() is None
    monkeypatch.setattr(ingraph, "SYNAPSE_BUDGET", 1000)
    with pytest.raises(NotInGraphError, match="effective_path.*over the in-graph walk's budget"):
        guarded_model(load_bundle(MNIST))
    assert main(["export", str(MNIST), "--guarded", str(tmp_path / "g.onnx")]) == 1
    assert "effective_path" in capsys.readouterr().err and not (tmp_path / "g.onnx").exists()


def test_the_cnn_bundle_exports_whole_and_the_served_graph_leaves_out_what_it_cannot_score():
    bundle = load_bundle(ARTIFACTS / "cifar10-cnn")
    whole = {o.name for o in guarded_model(bundle).graph.output}
    assert {"raw_effective_path", "raw_nic", "is_adversarial"} <= whole
    # served: the walk beside the graph, NIC VI (no calibration in this older bundle) left to the pipeline; the
    # runtime fuses the verdict, so the graph has none
    served = {o.name for o in guarded_model(bundle, components="all", beside=["effective_path"]).graph.output}
    assert "raw_nic" in served and not {"raw_effective_path", "raw_nic_vi", "is_adversarial"} & served


class _Rule(nn.Module):
    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = theta

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        total = c.sum(-1)
        sign = torch.where(total < 0, -torch.ones_like(total), torch.ones_like(total))
        c = c * sign.unsqueeze(-1)
        return ingraph.dense_rule(c, c.sum(-1), self.theta)


@pytest.mark.parametrize("theta", [0.5, 0.95])
def test_the_rule_on_long_rows_settles_early_or_ranks_in_full_exactly(theta, tmp_path):
    """Rows longer than 2 * FIRST_PASS: peaked rows end in the first pass, flat ones (and theta 0.95) need the full
    ranking; ties, negative sums and rows without positive values are there too. Eager and through onnxruntime the
    selection is the exact rule's."""
    from pathguard.models.effective_path.selection import select_synapses

    gen = torch.Generator().manual_seed(1)
    k = 3 * ingraph.FIRST_PASS
    peaked = torch.randn(20, k, generator=gen) ** 5
    flat = torch.rand(20, k, generator=gen) + 0.5
    tied = torch.round(torch.randn(20, k, generator=gen) * 2) / 2
    negative = -torch.rand(4, k, generator=gen)
    rows = torch.cat([peaked, flat, tied, negative])
    expected = select_synapses(rows, theta=theta).float()
    assert (expected.sum(1) > ingraph.FIRST_PASS).any() and (expected.sum(1) < ingraph.FIRST_PASS).any()
    module = _Rule(theta)
    assert torch.equal(module(rows), expected)
    path = tmp_path / "rule.onnx"
    torch.onnx.export(module, (rows,), str(path), input_names=["c"], output_names=["keep"],
                      dynamic_axes={"c": {0: "rows"}, "keep": {0: "rows"}}, opset_version=17, dynamo=False)  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"c": rows.numpy()})[0], expected.numpy())


def test_its_onnx_form_is_exact_on_every_step_kind_image_by_image():
    """The small network's walk through onnxruntime, one image per run (so a layer no walk reaches has no rows):
    the class paths' similarities of the exact paths."""
    from pathguard.models.effective_path import BenignEPScore, ClassPaths

    net = _small_net()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(40, 3, 16, 16, generator=gen) - 0.3
    extractor = EffectivePathExtractor(net, input_shape=(3, 16, 16), fast_path=False)
    with torch.no_grad():
        y = net(x).argmax(1)
    paths = ClassPaths(4).fit(extractor, x[:28], y[:28])
    ref = extractor.extract(x[28:], ranks=(1, 2))
    sims = paths.similarity(ref)
    features = np.concatenate([sims[1], sims[2]], 1)
    score = BenignEPScore().fit(features)
    module = GraphEffectivePath(GraphWalk(net, (3, 16, 16)), paths, score)
    sess = ort.InferenceSession(module.to_onnx(), providers=["CPUExecutionProvider"])
    got = [sess.run(None, {"input": x[i : i + 1].numpy(), "logits": ref.logits[i - 28 : i - 27].numpy()})[0]
           for i in range(28, 40)]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(got), features)
