"""Channel-level Effective Path against a loop reference written here, one image and one channel at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pathguard.models.effective_path.channels import ChannelProfiles, ChannelWalk
from pathguard.models.networks import Residual
from pathguard.models.networks.padding import PaddedAvgPool2d, PaddedMaxPool2d
from tests.test_effective_path import net_padded, net_pools, net_residual, ref_select

POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, PaddedMaxPool2d, PaddedAvgPool2d)


def _pair_sum(conv: nn.Conv2d, x: torch.Tensor, o: int, c: int) -> float:
    """Sum over every output position of input channel ``c``'s part of output channel ``o`` (no bias): the
    convolution of that one channel with that one kernel slice."""
    pads = getattr(conv, "pads4", None)
    xi = x[None, c : c + 1]
    if pads is not None:
        top, left, bottom, right = pads
        xi = F.pad(xi, (left, right, top, bottom))
        padding: int | tuple = 0
    else:
        padding = conv.padding
    group = o // (conv.out_channels // conv.groups)
    w = conv.weight[o : o + 1, c - group * conv.in_channels // conv.groups][:, None]
    return float(F.conv2d(xi, w, None, conv.stride, padding, conv.dilation).sum())


def ref_channel_walk(model: nn.Sequential, x: torch.Tensor, cls: int, theta: float) -> dict[str, set[int]]:
    """The channel-level path of one image ``x`` (C, H, W) seeded at class ``cls``: layer -> synapse ids."""
    items = list(model.named_children())
    acts = [x[None]]
    with torch.no_grad():
        for _, m in items:
            acts.append(m(acts[-1]))
    found: dict[str, set[int]] = {}
    sel, chan = {cls}, False
    for i in reversed(range(len(items))):
        name, m = items[i]
        xin, yout = acts[i][0], acts[i + 1][0]
        if isinstance(m, nn.Linear):
            new: set[int] = set()
            ids = found.setdefault(name, set())
            for o in sorted(sel):
                vals = (xin * m.weight[o]).tolist()
                y = float((xin @ m.weight[o]).detach() + (float(m.bias[o]) if m.bias is not None else 0.0))
                for j in ref_select(vals, y, theta):
                    ids.add(o * m.in_features + j)
                    new.add(j)
            sel = new
        elif isinstance(m, nn.Conv2d):
            if not chan:
                sel, chan = {u // (yout.shape[1] * yout.shape[2]) for u in sel}, True
            cg = m.in_channels // m.groups
            new, ids = set(), found.setdefault(name, set())
            positions = yout.shape[1] * yout.shape[2]
            for o in sorted(sel):
                group = o // (m.out_channels // m.groups)
                vals = [_pair_sum(m, xin, o, group * cg + j) for j in range(cg)]
                y = sum(vals) + (float(m.bias[o]) * positions if m.bias is not None else 0.0)
                for j in ref_select(vals, y, theta):
                    ids.add(o * cg + j)
                    new.add(group * cg + j)
            sel = new
        elif isinstance(m, POOLS):
            if not chan:
                sel, chan = {u // (yout.shape[1] * yout.shape[2]) for u in sel}, True
        elif isinstance(m, nn.Flatten):
            hw = xin.shape[1] * xin.shape[2]
            sel, chan = {u // hw for u in sel}, True
    return found


def _as_sets(masks: dict[str, np.ndarray], i: int) -> dict[str, set[int]]:
    return {layer: set(np.flatnonzero(m[i]).tolist()) for layer, m in masks.items()}


@pytest.mark.parametrize("theta", [0.5, 0.3, 0.9])
@pytest.mark.parametrize(("make", "shape"), [(net_pools, (2, 11, 11)), (net_padded, (2, 11, 11))])
def test_the_walk_equals_the_loop_reference(make, shape, theta):
    model = make()
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(3))
    walk = ChannelWalk(model, shape, theta)
    paths = walk.walk(x, ranks=(1, 2))
    for r in (1, 2):
        for i in range(len(x)):
            ref = ref_channel_walk(model, x[i], int(paths.classes[r][i]), theta)
            got = _as_sets(paths.masks[r], i)
            assert {k: v for k, v in got.items() if v} == {k: v for k, v in ref.items() if v}, (r, i)


def test_the_walk_equals_the_loop_reference_on_lenet(lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:2])
    walk = ChannelWalk(lenet, (1, 28, 28))
    paths = walk.walk(x, ranks=(1, 2))
    model = nn.Sequential(*[m for name, m in lenet.named_children()])  # the same modules, plain (no taps)
    for r in (1, 2):
        for i in range(len(x)):
            ref = ref_channel_walk(model, x[i], int(paths.classes[r][i]), 0.5)
            names = dict(
                zip([n for n, _ in model.named_children()], [n for n, _ in lenet.named_children()], strict=True)
            )
            got = {k: v for k, v in _as_sets(paths.masks[r], i).items() if v}
            assert got == {names[k]: v for k, v in ref.items() if v}, (r, i)


def test_channel_contributions_are_the_per_channel_convolutions_summed():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
    x = torch.rand(2, 4, 9, 9)
    walk = ChannelWalk(nn.Sequential(conv), (4, 9, 9))
    got = walk.contributions(walk.plan.steps[0], x)  # (N, O, Cg)
    for n in range(2):
        for o in range(6):
            group = o // 3
            for j in range(2):
                assert float(got[n, o, j]) == pytest.approx(_pair_sum(conv, x[n], o, group * 2 + j), rel=1e-4, abs=1e-5)


def test_a_hand_built_net_keeps_the_channel_that_carries_the_output():
    """Channel 0 carries 16 of the output channel's 17.6 (theta 0.5): its synapse alone is on the path; the residual
    addition follows the larger branch."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight[:] = 1.0
    fc = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        fc.weight[:] = torch.stack([torch.ones(16), -torch.ones(16)])
    x = torch.stack([torch.ones(4, 4), torch.full((4, 4), 0.1)])
    paths = ChannelWalk(nn.Sequential(conv, nn.Flatten(), fc), (2, 4, 4)).walk(x[None], ranks=(1,))
    assert paths.classes[1].tolist() == [0]
    assert np.flatnonzero(paths.masks[1]["0"][0]).tolist() == [0]  # synapse (out 0, in 0)

    body = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        body.weight[:] = 3.0  # the body carries 3x the identity shortcut
    net = nn.Sequential(nn.Conv2d(2, 1, 1, bias=False), Residual(body), nn.Flatten(), nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        net[0].weight[:] = 1.0
        net[3].weight[:] = torch.stack([torch.ones(16), -torch.ones(16)])
    paths = ChannelWalk(net, (2, 4, 4)).walk(x[None], ranks=(1,))
    masks = paths.masks[1]
    assert np.flatnonzero(masks["1.body"][0]).tolist() == [0] and np.flatnonzero(masks["0"][0]).tolist() == [0]


def test_residual_networks_walk_and_every_selected_channel_has_an_input():
    model = net_residual()
    x = torch.rand(6, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    walk = ChannelWalk(model, (4, 9, 9))
    paths = walk.walk(x)
    assert set(walk.layers) == set(paths.masks[1]) and paths.logits.shape == (6, 4)
    for r in (1, 2):
        for layer in walk.layers:
            m = paths.masks[r][layer]
            assert m.shape == (6, walk.units[layer]) and m.dtype == np.bool_
        last = paths.masks[r][walk.layers[-1]]  # the linear head: synapses of the seeded class only
        for i in range(6):
            on = np.flatnonzero(last[i]) // 6  # out neuron of each synapse (in_features 6)
            assert set(on.tolist()) == {int(paths.classes[r][i])}
    assert paths.masks[1][walk.layers[0]].any(1).all()  # every path reaches the first layer


def test_profiles_score_benign_paths_above_the_wrong_class(lenet, mnist_test):
    """On the committed LeNet-5: class profiles fitted on 1,500 training-like images score held-out test images'
    rank-1 paths far above their rank-2 paths (the class the image is not), and round-trip through arrays."""
    walk = ChannelWalk(lenet, (1, 28, 28))
    profiles = ChannelProfiles(10).fit(walk, mnist_test.x[:1500], mnist_test.y[:1500])
    paths = walk.walk(mnist_test.x[1500:1800])
    sims = profiles.similarity(paths)
    assert sims[1].shape == (300, len(walk.layers)) and ((sims[1] >= 0) & (sims[1] <= 1)).all()
    assert np.median(sims[1].mean(1)) > np.median(sims[2].mean(1)) + 0.1
    back = ChannelProfiles.from_arrays(
        {k: np.asarray(v) for k, v in profiles.to_arrays().items()}  # plain arrays, no pickle
    )
    np.testing.assert_array_equal(back.similarity(paths)[1], sims[1])


def _fitted(model, x, y, shape):
    from pathguard.models.effective_path import BenignEPScore

    walk = ChannelWalk(model, shape)
    profiles = ChannelProfiles(10).fit(walk, x[:-200], y[:-200])
    sims = profiles.similarity(walk.walk(x[-200:]))
    feats = np.concatenate([sims[1], sims[2]], 1)
    return walk, profiles, BenignEPScore().fit(feats)


def test_the_module_and_its_onnx_export_give_the_walks_features(lenet, mnist_test):
    """The exportable module (the one the guarded graph runs) against the walk and the profiles on the committed
    LeNet-5: the same similarities and score, in torch and through onnxruntime."""
    import onnxruntime as ort

    from pathguard.models.effective_path.channels import DenseChannelWalk

    walk, profiles, score = _fitted(lenet, mnist_test.x[:1200], mnist_test.y[:1200], (1, 28, 28))
    x = mnist_test.x[1200:1264]
    sims = profiles.similarity(walk.walk(x))
    feats = np.concatenate([sims[1], sims[2]], 1)
    dense = DenseChannelWalk(walk, profiles, score)
    with torch.no_grad():
        logits, got, raw = dense(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), feats, atol=1e-6)
    np.testing.assert_allclose(raw.numpy(), score.score(feats), atol=1e-6)
    sess = ort.InferenceSession(dense.to_onnx(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))
    np.testing.assert_allclose(out["ep_features"], feats, atol=1e-6)
    np.testing.assert_allclose(out["ep_score"], score.score(feats), atol=1e-6)
    np.testing.assert_allclose(out["ep_logits"], logits.numpy(), atol=1e-4)


def test_the_dense_walk_follows_residual_networks_ties_included():
    from pathguard.models.effective_path import BenignEPScore
    from pathguard.models.effective_path.channels import DenseChannelWalk

    model = net_residual()
    x = torch.rand(40, 4, 9, 9, generator=torch.Generator().manual_seed(5))
    walk = ChannelWalk(model, (4, 9, 9))
    paths = walk.walk(x)
    profiles = ChannelProfiles(4)
    profiles.layers_, profiles.images_ = list(walk.layers), np.ones(4)
    rng = np.random.default_rng(0)
    profiles.freq_ = {k: rng.uniform(0, 1, (4, walk.units[k])).astype(np.float32) for k in walk.layers}
    sims = profiles.similarity(paths)
    feats = np.concatenate([sims[1], sims[2]], 1)
    dense = DenseChannelWalk(walk, profiles, BenignEPScore().fit(feats))
    with torch.no_grad():
        _, got, _ = dense(x)
    np.testing.assert_allclose(got.numpy(), feats, atol=1e-6)
    # this net's head has rows of exactly tied (zero) contributions: onnxruntime's TopK breaks ties as the walk does
    import onnxruntime as ort

    sess = ort.InferenceSession(dense.to_onnx(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["ep_features"], {"input": x.numpy()})[0], feats, atol=1e-6)
