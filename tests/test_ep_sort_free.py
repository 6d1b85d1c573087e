"""Effective Path's sort-free rules (after Ptolemy's backward selection with offline-profiled thresholds): per
weighted layer, the synapses whose oriented contribution is positive and at least a threshold (absolute) or at least
that fraction of the neuron's oriented sum (relative), the threshold profiled on benign images.

- the rules on rows whose answer is known (orientation, nothing above the cut, the relative cut);
- the profile: each layer's threshold is the quantile of the cumulative rule's cuts (absolute or relative),
  checked on a net whose cuts are known, and on a real network against cuts recomputed from the cumulative paths;
- the batched torch walk, the compiled walk and the in-graph walk select exactly the loop reference's synapses on
  networks with padding, stride, dilation, groups, residual blocks and pools (ranks 1 and 2, both rules, some
  layers cumulative);
- a bundle built with ``selection: relative`` stores its rule and thresholds, loads them, scores with them, and its
  stored graph answers what the pipeline answers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pathguard.models.builder import BuildConfig, build_bundle
from pathguard.models.bundle import load_bundle
from pathguard.models.bundle.format import EP_THRESHOLDS
from pathguard.models.effective_path import EffectivePathExtractor
from pathguard.models.effective_path.extractor import profile_thresholds
from pathguard.models.effective_path.ingraph import GraphWalk
from pathguard.models.effective_path.selection import orient, select_above, select_pairs
from tests.conftest import MNIST_CLASSIFIER, TINY_NIC
from tests.test_effective_path import SortFree, net_padded, net_pools, net_residual, ref_extract
from tests.test_ep_ingraph import _small_net


def test_the_rules_keep_the_positive_oriented_contributions_at_least_the_cut():
    c = torch.tensor(
        [
            [3.0, 1.0, 2.0, 0.5],  # positive output: 3 and 2 reach 2.0 (an equal value is kept); sum 6.5
            [-3.0, -1.0, 0.5, -2.5],  # negative output: oriented 3, 1, -0.5, 2.5; sum 6
            [1.0, 1.5, 0.2, 0.0],  # nothing reaches 2.0: nothing is selected (the cumulative rule keeps 1.5)
        ]
    )
    oriented = c.clone()
    total = orient(oriented, None)
    rows, cols = select_above(oriented, 2.0)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (0, 2), (1, 0), (1, 3)]
    cum_rows, _ = select_pairs(oriented.clone(), total, 0.5)
    assert 2 in cum_rows.tolist()  # the cumulative rule always keeps one
    # relative at 0.25: cuts 1.625, 1.5 and 0.675
    rows, cols = select_above(oriented, 0.25, total)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (0, 2), (1, 0), (1, 3), (2, 0), (2, 1)]


def test_thresholds_are_the_quantile_of_the_cumulative_cuts_on_a_net_whose_cuts_are_known():
    """One linear layer, one input: the predicted output's contributions are the weights times 1, so the cumulative
    rule's cut is known per image class; the profile is their quantile."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.5]]))
    x = torch.ones(3, 1, 2, 2)  # every image predicts class 0: contributions 4, 3, 2, 1 (sum 10)
    ex = EffectivePathExtractor(net, theta=0.5, input_shape=(1, 2, 2))
    cuts = ex.cumulative_cuts(x)
    assert cuts["1"].tolist() == [3.0, 3.0, 3.0]  # 4 + 3 reaches 5: the smallest kept is 3
    ex_high = EffectivePathExtractor(net, theta=0.95, input_shape=(1, 2, 2))
    assert ex_high.cumulative_cuts(x)["1"].tolist() == [1.0, 1.0, 1.0]  # 4 + 3 + 2 = 9 < 9.5: 1 is kept too
    assert profile_thresholds(ex, x) == {"1": 3.0}
    assert ex.cumulative_cuts(x, relative=True)["1"].tolist() == pytest.approx([0.3, 0.3, 0.3])  # 3 of 10
    assert profile_thresholds(ex, x, relative=True) == {"1": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="quantile"):
        profile_thresholds(ex, x, quantile=1.5)
    with pytest.raises(ValueError, match="positive"):
        EffectivePathExtractor(net, thresholds={"1": 0.0})
    with pytest.raises(ValueError, match="does not have"):
        EffectivePathExtractor(net, input_shape=(1, 2, 2), thresholds={"fc9": 1.0}).extract(x)


def test_the_profile_on_lenet_matches_cuts_recomputed_from_the_cumulative_paths(lenet, mnist_test):
    """The cut of a reached neuron is its smallest kept contribution: recomputed here for fc2 from the cumulative
    walk's synapse ids and the layer's input, image by image."""
    x = torch.from_numpy(mnist_test.x[:6])
    ex = EffectivePathExtractor(lenet, theta=0.5)
    cuts = ex.cumulative_cuts(x)
    paths = ex.extract(x, ranks=(1,))
    fc2 = lenet.fc2 if hasattr(lenet, "fc2") else dict(lenet.named_modules())["fc2"]
    taps: dict[str, torch.Tensor] = {}
    handle = fc2.register_forward_hook(lambda m, i, o: taps.__setitem__("in", i[0]))
    with torch.no_grad():
        lenet(x)
    handle.remove()
    fan_in = fc2.weight.shape[1]
    expected = []
    for i in range(len(x)):
        ids = paths.image(1, i)["fc2"]
        for o in torch.unique(ids // fan_in).tolist():
            cols = ids[ids // fan_in == o] % fan_in
            contrib = taps["in"][i] * fc2.weight[o].detach()
            bias = float(fc2.bias[o].detach())
            y = float(contrib.sum()) + bias
            oriented = contrib * (-1.0 if y < 0 else 1.0)
            kept = oriented[cols]
            if float(kept.max()) > 0:
                expected.append(float(kept[kept > 0].min()))
    assert sorted(cuts["fc2"].tolist()) == pytest.approx(sorted(expected), rel=1e-6)
    assert set(profile_thresholds(ex, x)) == set(ex.layers)


CASES = [
    (net_residual, (4, 9, 9)),
    (net_pools, (2, 11, 11)),
    (net_padded, (2, 11, 11)),
    (_small_net, (3, 8, 8)),
]


@pytest.mark.parametrize("rule", ["absolute", "relative"])
@pytest.mark.parametrize("partial", [False, True], ids=["every-layer", "some-layers"])
@pytest.mark.parametrize(("make", "shape"), CASES, ids=["residual", "pools", "padded", "small"])
def test_every_walk_selects_the_loop_references_synapses(make, shape, partial, rule):
    model = make().eval()
    gen = torch.Generator().manual_seed(3)
    profile, x = torch.rand(16, *shape, generator=gen), torch.rand(4, *shape, generator=gen)
    relative = rule == "relative"
    thresholds = profile_thresholds(EffectivePathExtractor(model, input_shape=shape), profile, 0.3, relative)
    if partial:  # every other layer keeps the cumulative rule
        thresholds = {k: v for i, (k, v) in enumerate(thresholds.items()) if i % 2 == 0}
    kw = {"input_shape": shape, "thresholds": thresholds, "relative": relative}
    batched = EffectivePathExtractor(model, fast_path=False, **kw)
    compiled = EffectivePathExtractor(model, fast_path=True, **kw)
    assert compiled.uses_fast_path(len(x)) and batched.selection == rule
    got_b, got_c = batched.extract(x, ranks=(1, 2)), compiled.extract(x, ranks=(1, 2))
    try:
        walk: GraphWalk | None = GraphWalk(model, shape, thresholds=thresholds, relative=relative)
    except NotImplementedError:  # grouped convolutions, overlapping max pools: no in-graph walk
        walk = None
    assert walk is not None or make is not _small_net  # the in-graph test net has every kind it supports
    found = {}
    if walk is not None:
        with torch.no_grad():
            _, found = walk.trace(x, got_b.logits)
    total = 0
    for k, r in enumerate((1, 2)):
        dense = {layer: f.dense(2, len(x), walk.synapses[layer])[k] for layer, f in found.items() if walk}
        for i in range(len(x)):
            ref = ref_extract(model, x[i : i + 1], SortFree(0.5, thresholds, relative), r)
            for layer in got_b.layers:
                want = ref.get(layer, [])
                assert got_b.image(r, i)[layer].tolist() == want, ("batched", layer, r, i)
                assert got_c.image(r, i)[layer].tolist() == want, ("compiled", layer, r, i)
                if walk is not None:
                    in_graph = torch.nonzero(dense[layer][i]).reshape(-1).tolist() if layer in dense else []
                    assert in_graph == want, ("in-graph", layer, r, i)
                total += len(want)
    assert total > 0


@pytest.mark.parametrize("relative", [False, True])
def test_the_sort_free_paths_differ_from_the_cumulative_ones(lenet, mnist_test, relative):
    """Not a copy of the cumulative walk: with thresholds at the median cut, some layers keep more synapses and
    some fewer than the cumulative rule."""
    x = torch.from_numpy(mnist_test.x[:32])
    ex = EffectivePathExtractor(lenet)
    th = profile_thresholds(ex, x, relative=relative)
    ab = EffectivePathExtractor(lenet, thresholds=th, relative=relative).extract(x[:4], ranks=(1,))
    cu = ex.extract(x[:4], ranks=(1,))
    sizes = [(len(ab.image(1, i)[k]), len(cu.image(1, i)[k])) for i in range(4) for k in ex.layers]
    assert any(a > c for a, c in sizes) and any(a < c for a, c in sizes)


@pytest.fixture(scope="module")
def relative_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "relative"
    cfg = BuildConfig(
        name="relative",
        n_train=3000,
        n_calib=1000,
        target_fpr=0.1,
        nic=TINY_NIC,
        fusion=["effective_path", "nic"],
        components={"effective_path": {"selection": "relative", "n_profile": 200, "quantile": 0.1}},
    )
    report = build_bundle("mnist", MNIST_CLASSIFIER, out, cfg)
    return out, report


def test_a_bundle_built_with_a_sort_free_rule_stores_loads_and_scores_with_it(relative_bundle, mnist_test):
    path, report = relative_bundle
    stored = json.loads((path / EP_THRESHOLDS).read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["components"]["effective_path"]["selection"] == stored["rule"] == "relative"
    assert EP_THRESHOLDS in manifest["files"]
    thresholds = stored["thresholds"]
    assert all(0 < v < 1 for v in thresholds.values())  # fractions of a neuron's sum
    bundle = load_bundle(path)
    ep = bundle.pipeline.components["effective_path"]
    assert ep.extractor.thresholds == thresholds and set(thresholds) == set(ep.layers) and ep.extractor.relative
    x = mnist_test.x[:16].astype(np.float32)
    result = bundle.pipeline.detect(x)
    direct = EffectivePathExtractor(bundle.classifier, thresholds=thresholds, relative=True).extract(x, ranks=(1, 2))
    sims = ep.class_paths.similarity(direct)
    np.testing.assert_allclose(result.fields["effective_path"]["rank1_similarity"], sims[1])
    np.testing.assert_allclose(result.fields["effective_path"]["rank2_similarity"], sims[2])


def test_the_relative_bundles_stored_graph_answers_what_the_pipeline_answers(relative_bundle, mnist_test, tmp_path):
    from pathguard.models.bundle.stored import StoredDetector, load_stored
    from pathguard.models.guarded import store_in_bundle

    path, _ = relative_bundle
    out = tmp_path / "stored"
    store_in_bundle(path, out)
    x = mnist_test.x[:24].astype(np.float32)
    ref = load_bundle(out, seed=0).pipeline.detect(x)
    got = StoredDetector(load_stored(out), seed=0).detect(x)
    np.testing.assert_array_equal(got.predicted, ref.predicted)
    np.testing.assert_allclose(got.raw["effective_path"], ref.raw["effective_path"], atol=1e-9)
    for key in ("rank1_similarity", "rank2_similarity"):
        got_f, ref_f = got.fields["effective_path"][key], ref.fields["effective_path"][key]
        np.testing.assert_allclose(np.asarray(got_f, dtype=np.float64), ref_f, atol=1e-12)


def test_bad_settings_and_documents_are_refused_with_their_reason():
    from pathguard.models.components.effective_path import EffectivePathComponent
    from pathguard.models.effective_path.extractor import read_thresholds_document

    with pytest.raises(ValueError, match="selection must be one of"):
        EffectivePathComponent.check(None, {"selection": "sorted"})
    with pytest.raises(ValueError, match="quantile"):
        EffectivePathComponent.check(None, {"selection": "relative", "quantile": 2})
    with pytest.raises(ValueError, match="n_profile"):
        EffectivePathComponent.check(None, {"selection": "absolute", "n_profile": 0})
    EffectivePathComponent.check(None, {"selection": "relative", "quantile": 0.1, "n_profile": 10})
    for doc in ({"rule": "cumulative", "thresholds": {"fc": 1.0}}, {"rule": "absolute", "thresholds": {}}, {}):
        with pytest.raises(ValueError, match="thresholds document"):
            read_thresholds_document(doc)
    assert read_thresholds_document({"rule": "relative", "thresholds": {"fc": 0.1}}) == ({"fc": 0.1}, True)
