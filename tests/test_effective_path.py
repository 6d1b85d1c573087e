"""Effective Path extraction: the vectorized extractor against a per-neuron loop reference (paper Eq. 1-3).

The reference below is written independently of models/effective_path/: one image at a time, one selected
neuron at a time, plain Python loops over receptive fields, padding skipped explicitly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pathguard.models.effective_path import (
    EffectivePathExtractor,
    PathBatch,
    extract_effective_paths,
    select_synapses,
)
from pathguard.models.networks import Normalize, Residual
from pathguard.models.networks.padding import PaddedAvgPool2d, PaddedConv2d, PaddedMaxPool2d

# --------------------------------------------------------------------------------------------------
# Loop reference
# --------------------------------------------------------------------------------------------------


def ref_select(values: list[float], y: float, theta: float) -> list[int]:
    """Positions (into ``values``) selected for one neuron with output ``y``."""
    c = [-v for v in values] if y < 0 else list(values)
    total = sum(c)
    if not c:
        return []
    if total <= 0 or 1.0 / len(c) >= theta:
        best = max(c)
        return [c.index(best)]
    order = sorted(range(len(c)), key=lambda j: (-c[j], j))
    kept, acc = [], 0.0
    for j in order:
        if acc >= theta * total or c[j] <= 0:
            break
        kept.append(j)
        acc += c[j]
    return kept


class SortFree(float):
    """A ``theta`` for the loop reference that also carries sort-free thresholds (layer -> phi): the weighted layers
    named there select by the absolute rule (``relative``: the relative rule), everything else by the cumulative
    rule at ``theta``."""

    thresholds: dict[str, float]
    relative: bool

    def __new__(cls, theta: float, thresholds: dict[str, float], relative: bool = False) -> SortFree:
        obj = super().__new__(cls, theta)
        obj.thresholds, obj.relative = thresholds, relative
        return obj


def ref_weighted_select(name: str, values: list[float], y: float, theta: float) -> list[int]:
    """A weighted layer's selection: for a layer with a threshold, the oriented values that are positive and at
    least phi (relative: phi times their sum), ascending; else :func:`ref_select`."""
    phi = getattr(theta, "thresholds", {}).get(name)
    if phi is None:
        return ref_select(values, y, theta)
    oriented = [-v for v in values] if y < 0 else list(values)
    cut = phi * sum(oriented) if getattr(theta, "relative", False) else phi
    return [j for j, v in enumerate(oriented) if v > 0 and v >= cut]


def _fold(conv, bn):
    w, b = conv.weight.detach(), conv.bias
    b = torch.zeros(w.shape[0]) if b is None else b.detach()
    if bn is None:
        return w, b
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    return w, (b - bn.running_mean) * scale + bn.bias.detach()


def _items(seq, prefix):
    """(name, module, folded-bn) items of a Sequential; a Residual keeps its module."""
    kids = list(seq.named_children()) if isinstance(seq, nn.Sequential) else [("", seq)]
    out, i = [], 0
    while i < len(kids):
        name, m = kids[i]
        nxt = kids[i + 1][1] if i + 1 < len(kids) else None
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(nxt, (nn.BatchNorm2d, nn.BatchNorm1d)):
            out.append((prefix + name, m, nxt))
            i += 2
            continue
        out.append((prefix + name, m, None))
        i += 1
    return out


def _run(item, x):
    name, m, bn = item
    y = m(x)
    return bn(y) if bn is not None else y


def _top_left(m):
    """The top and left padding of a conv or pool (``pads4`` = (top, left, bottom, right) when it has four)."""
    if hasattr(m, "pads4"):
        return m.pads4[0], m.pads4[1]
    return (m.padding, m.padding) if isinstance(m.padding, int) else tuple(m.padding)


def _ref_conv(name, m, bn, x, sel, theta, found):
    w, b = _fold(m, bn)
    xs = x[0].tolist()
    c_in, h_in, w_in = x.shape[1:]
    o_ch, cg, kh_n, kw_n = w.shape
    oh_n, ow_n = m(x).shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = m.stride, _top_left(m), m.dilation
    wl = w.tolist()
    nxt = set()
    for p in sorted(sel):
        o, rest = divmod(p, oh_n * ow_n)
        oh, ow = divmod(rest, ow_n)
        g = o // (o_ch // m.groups)
        cols, vals, pos = [], [], []
        for c in range(cg):
            for kh in range(kh_n):
                for kw in range(kw_n):
                    hh, ww = oh * sh - ph + kh * dh, ow * sw - pw + kw * dw
                    if not (0 <= hh < h_in and 0 <= ww < w_in):
                        continue  # padding is never a candidate
                    ci = g * cg + c
                    prod = torch.tensor(xs[ci][hh][ww], dtype=torch.float32) * torch.tensor(
                        wl[o][c][kh][kw], dtype=torch.float32
                    )
                    cols.append((c * kh_n + kh) * kw_n + kw)
                    vals.append(float(prod))
                    pos.append((ci * h_in + hh) * w_in + ww)
        y = sum(vals) + float(b[o])
        for k in ref_weighted_select(name, vals, y, theta):
            found.setdefault(name, set()).add(p * cg * kh_n * kw_n + cols[k])
            nxt.add(pos[k])
    return nxt


def _ref_linear(name, m, bn, x, sel, theta, found):
    w, b = _fold(m, bn)
    xs = x[0]
    fan_in = w.shape[1]
    nxt = set()
    for o in sorted(sel):
        vals = (xs * w[o]).tolist()
        y = sum(vals) + float(b[o])
        for i in ref_weighted_select(name, vals, y, theta):
            found.setdefault(name, set()).add(o * fan_in + i)
            nxt.add(i)
    return nxt


def _windows(m, x):
    """Per output point: list of valid (flat input index) in row-major window order (the output size is the
    module's, so ceil-mode windows running past the input keep their real positions only)."""
    _, c_n, h_n, w_n = x.shape
    if isinstance(m, nn.AdaptiveAvgPool2d):
        k, s, p, d = (h_n, w_n), (h_n, w_n), (0, 0), (1, 1)
    else:
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        k, p = pair(m.kernel_size), _top_left(m)
        s = pair(m.stride if m.stride is not None else m.kernel_size)
        d = pair(getattr(m, "dilation", 1))
    out = m(x)
    oh_n, ow_n = out.shape[2:]
    win = {}
    for c in range(c_n):
        for oh in range(oh_n):
            for ow in range(ow_n):
                cells = []
                for kh in range(k[0]):
                    for kw in range(k[1]):
                        hh, ww = oh * s[0] - p[0] + kh * d[0], ow * s[1] - p[1] + kw * d[1]
                        if 0 <= hh < h_n and 0 <= ww < w_n:
                            cells.append((c * h_n + hh) * w_n + ww)
                win[(c * oh_n + oh) * ow_n + ow] = cells
    return win


def _ref_pool(m, x, sel, theta):
    flat = x[0].reshape(-1).tolist()
    win = _windows(m, x)
    nxt = set()
    for p in sel:
        cells = win[p]
        vals = [flat[i] for i in cells]
        if isinstance(m, nn.MaxPool2d):
            nxt.add(cells[vals.index(max(vals))])  # first maximum in window order
        else:
            nxt.update(cells[k] for k in ref_select(vals, sum(vals), theta))
    return nxt


def _ref_residual(name, m, x, sel, theta, found):
    skip = x if m.shortcut is None else m.shortcut(x)
    body = m.body(x)
    sv, bv = skip.reshape(-1).tolist(), body.reshape(-1).tolist()
    to_skip, to_body = set(), set()
    for p in sel:
        for k in ref_select([sv[p], bv[p]], sv[p] + bv[p], theta):
            (to_skip if k == 0 else to_body).add(p)
    body_prefix = name + ".body" + ("." if isinstance(m.body, nn.Sequential) else "")
    res = _ref_seq(_items(m.body, body_prefix), x, to_body, theta, found)
    if m.shortcut is not None:
        sc_prefix = name + ".shortcut" + ("." if isinstance(m.shortcut, nn.Sequential) else "")
        to_skip = _ref_seq(_items(m.shortcut, sc_prefix), x, to_skip, theta, found)
    return res | to_skip


def _ref_seq(items, x, sel, theta, found):
    """Backward through ``items`` whose input is ``x``; returns the selected input set."""
    inputs = []
    for it in items:
        inputs.append(x)
        x = _run(it, x)
    for (name, m, bn), xin in zip(reversed(items), reversed(inputs), strict=True):
        if isinstance(m, nn.Conv2d):
            sel = _ref_conv(name, m, bn, xin, sel, theta, found)
        elif isinstance(m, nn.Linear):
            sel = _ref_linear(name, m, bn, xin, sel, theta, found)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            sel = _ref_pool(m, xin, sel, theta)
        elif isinstance(m, Residual):
            sel = _ref_residual(name, m, xin, sel, theta, found)
        elif isinstance(m, Normalize):
            return sel
    return sel


@torch.no_grad()
def ref_extract(model, x, theta, rank):
    """Loop reference for one image ``x`` (1, C, H, W): layer -> sorted list of synapse ids."""
    logits = model(x)[0].tolist()
    order = sorted(range(len(logits)), key=lambda k: (-logits[k], k))
    found: dict[str, set[int]] = {}
    _ref_seq(_items(model, ""), x, {order[rank - 1]}, theta, found)
    return {k: sorted(v) for k, v in found.items()}


# --------------------------------------------------------------------------------------------------
# Random test networks
# --------------------------------------------------------------------------------------------------


def _randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen))  # some negative scales flip signs
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def net_plain(seed=0):
    """Normalize prefix, padding, BN fold, stride, max and avg pool, dropout."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        Normalize((0.5, 0.4), (0.3, 0.2)),
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2, padding=1),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 12),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(12, 5),
    )
    return _randomize_bn(net, torch.Generator().manual_seed(seed))


def net_residual(seed=0):
    """Dilation + groups, a residual block (BN inside), a projection shortcut, avg pools, global avg pool."""
    torch.manual_seed(seed)
    block = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)))
    proj = Residual(
        nn.Sequential(nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1)),
        shortcut=nn.Conv2d(8, 6, 1, stride=2),
    )
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        block,
        nn.ReLU(),
        proj,
        nn.ReLU(),
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.Conv2d(6, 6, 2, groups=3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    return _randomize_bn(net, torch.Generator().manual_seed(seed + 1))


def net_pools(seed=0):
    """Max pools off the reshape fast path: odd input size (floor) and ceil_mode; tiled pool on even size."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 9x9 -> 4x4, last row/column dropped
        nn.Conv2d(4, 4, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4 -> 2x2, tiled
        nn.Conv2d(4, 5, 2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),  # 3x3 -> 2x2, partial windows
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 4),
    ).eval()


def net_padded(seed=0):
    """Four-sided pads (conv, max pool with -inf, average pool) and ceil-mode average pools (torch's and ONNX's)."""
    torch.manual_seed(seed)
    features = nn.Sequential(
        PaddedConv2d(2, 4, (3, 3), (0, 0, 1, 1), stride=(2, 2)),  # 11x11 -> 5x5
        PaddedMaxPool2d((2, 2), (1, 0, 0, 1), stride=(1, 1)),  # -> 5x5, before the ReLU: negative maxima
        nn.ReLU(),
        PaddedConv2d(4, 5, (2, 3), (1, 0, 0, 2), stride=(1, 1)),  # -> 5x5
        nn.ReLU(),
        nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),  # -> 3x3, the last windows half outside
        PaddedAvgPool2d((3, 3), (0, 1, 1, 0), stride=(2, 2), ceil_mode=True, count_include_pad=True),  # -> 2x2
        nn.Flatten(),
    )
    return nn.Sequential(*features, nn.Linear(5 * 2 * 2, 4)).eval()


CASES = [
    (net_plain, (2, 12, 12)),
    (net_residual, (4, 9, 9)),
    (net_pools, (2, 11, 11)),
    (net_padded, (2, 11, 11)),
]


@pytest.mark.parametrize("theta", [0.5, 0.3, 0.9])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("make", "shape"), CASES, ids=["plain", "residual", "pools", "padded"])
def test_vectorized_matches_loop_reference(make, shape, rank, theta):
    model = make()
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(7))
    # the batched torch walk; the compiled small-batch walk is checked in tests/test_ep_fastpath.py
    ext = EffectivePathExtractor(model, theta=theta, input_shape=shape, fast_path=False)
    got = ext.extract(x, ranks=(1, 2))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert got.layers == names
    total = 0
    for i in range(len(x)):
        ref = ref_extract(model, x[i : i + 1], theta, rank)
        mine = got.image(rank, i)
        for name in names:
            assert mine[name].tolist() == ref.get(name, []), (name, i)
            total += len(mine[name])
    assert total > 0


def test_lenet_matches_loop_reference(lenet, mnist_test):
    # a full batch, so the large-block selection passes run; three images checked against the loop
    x = torch.from_numpy(mnist_test.x[:256])
    pb = EffectivePathExtractor(lenet, batch_size=256).extract(x)
    paths = {r: pb.per_image(r) for r in (1, 2)}
    for r in (1, 2):
        for i in (0, 101, 255):
            ref = ref_extract(lenet, x[i : i + 1], 0.5, r)
            assert {k: v.tolist() for k, v in paths[r][i].items()} == ref


# --------------------------------------------------------------------------------------------------
# Contract of extract_effective_paths
# --------------------------------------------------------------------------------------------------


def test_contract_names_dtype_sorted_and_bounds(lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:4])
    paths = extract_effective_paths(lenet, x, theta=0.5, rank=1)
    assert len(paths) == 4
    sizes = {"conv1": 6 * 28 * 28 * 25, "conv2": 16 * 10 * 10 * 150, "fc1": 120 * 400, "fc2": 84 * 120, "fc3": 840}
    for p in paths:
        assert list(p) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
        for name, ids in p.items():
            assert ids.dtype == torch.int64 and ids.dim() == 1 and ids.numel() > 0
            assert torch.all(ids[1:] > ids[:-1]), name
            assert int(ids.min()) >= 0 and int(ids.max()) < sizes[name]
    # the seed: fc3 synapses all come from the predicted logit
    pred = lenet(x).argmax(1)
    for p, c in zip(paths, pred, strict=True):
        assert torch.all(p["fc3"] // 84 == c)


def test_padding_positions_never_selected():
    torch.manual_seed(3)
    # a wide padding makes many candidates padded; negative inputs force argmax fallbacks
    model = nn.Sequential(nn.Conv2d(1, 3, 5, padding=3), nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    x = torch.randn(16, 1, 6, 6)
    paths = extract_effective_paths(model, x, theta=0.5, rank=1)
    ids = torch.cat([p["0"] for p in paths])
    point, col = ids // 25, ids % 25
    rest = point % 64
    oh, ow, kh, kw = rest // 8, rest % 8, col // 5, col % 5
    h, w = oh - 3 + kh, ow - 3 + kw
    assert ids.numel() > 100
    assert bool(((h >= 0) & (h < 6) & (w >= 0) & (w < 6)).all())


def test_conv_id_formula_on_hand_built_net():
    # 1 input pixel value 2 at (1, 1), conv 1->1 3x3 all-ones weights, no padding: output (1, 1) = 2
    conv = nn.Conv2d(1, 1, 3, bias=False)
    conv.weight.data.fill_(1.0)
    lin = nn.Linear(1, 1, bias=False)
    lin.weight.data.fill_(1.0)
    model = nn.Sequential(conv, nn.Flatten(), lin)
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 2.0
    (p,) = extract_effective_paths(model, x)
    assert p["2"].tolist() == [0]
    # K = 9 valid candidates, only (kh, kw) = (1, 1) is positive: id = 0 * 9 + (0*3 + 1)*3 + 1 = 4
    assert p["0"].tolist() == [4]


# --------------------------------------------------------------------------------------------------
# Hand-checkable selection cases
# --------------------------------------------------------------------------------------------------


def _sel(c, y=None, theta=0.5, valid=None):
    c = torch.tensor([c], dtype=torch.float32)
    y = None if y is None else torch.tensor([y], dtype=torch.float32)
    v = None if valid is None else torch.tensor([valid])
    return select_synapses(c, y, theta, v)[0].nonzero().squeeze(1).tolist()


def test_selection_basic_prefix():
    assert _sel([1.0, 2.0, 3.0, 4.0]) == [2, 3]  # 4 + 3 >= 5 = 0.5 * 10
    assert _sel([1.0, 2.0, 3.0, 4.0], theta=0.4) == [3]  # 4 >= 4
    assert _sel([1.0, 2.0, 3.0, 4.0], theta=1.0) == [0, 1, 2, 3]


def test_selection_negative_output_negates():
    # y < 0: contributions are negated to [4, 3, 2, 1]: keep the two most negative originals
    assert _sel([-4.0, -3.0, -2.0, -1.0], y=-10.0) == [0, 1]
    # negated: [-1, 4, 3, 2.5], target 4.25: 4 then 3; the positive original is never kept
    assert _sel([1.0, -4.0, -3.0, -2.5], y=-8.5) == [1, 2]
    assert _sel([5.0, -4.0, -3.0, -2.5], y=-4.5) == [1]  # negated sum 4.5, target 2.25: 4 alone


def test_selection_nonpositive_sum_takes_argmax():
    assert _sel([1.0, -3.0, 0.5], y=0.2) == [0]  # bias makes y > 0, sum(c) = -1.5 <= 0
    assert _sel([0.0, 0.0, 0.0]) == [0]  # sum 0: argmax, first index


def test_selection_small_fan_in_takes_argmax():
    assert _sel([2.0, 2.5]) == [1]  # 1/2 >= 0.5
    assert _sel([2.0, 2.5], theta=0.6) == [0, 1]  # 1/2 < 0.6: 2.5 < 2.7 so 2.0 is needed too
    assert _sel([7.0]) == [0]


def test_selection_ties_prefer_lower_index():
    assert _sel([1.0, 1.0, 1.0, 1.0]) == [0, 1]
    assert _sel([3.0, 3.0, -10.0], y=1.0) == [0]  # argmax tie
    # many equal values on a long row (exercises the top-k pass): lowest indices win
    assert _sel([1.0] * 40) == list(range(20))
    assert _sel([0.5] * 10 + [2.0] * 30, theta=0.25) == list(range(10, 19))  # 9 * 2 >= 16.25


def test_selection_padding_excluded_from_candidates_and_count():
    assert _sel([0.0, 5.0, 0.0], valid=[False, True, False]) == [1]
    assert _sel([0.0, -2.0, -1.0], y=0.5, valid=[False, True, True]) == [2]  # argmax over real inputs only
    # 2 valid candidates -> 1/2 >= 0.5 -> argmax only, although 3 candidates would run the prefix rule
    assert _sel([1.0, 2.0, 0.0], valid=[True, True, False]) == [1]


@pytest.mark.parametrize(
    ("rows", "k"),
    # small blocks take one stable sort; larger ones the row-max steps (K <= 256) or blocked top-k passes
    [(400, 3), (400, 16), (400, 60), (2000, 60), (400, 150), (300, 300), (60, 2304)],
)
def test_selection_matches_reference_on_random_rows(rows, k):
    gen = torch.Generator().manual_seed(k)
    c = torch.randn(rows, k, generator=gen)
    q = rows // 4
    c[:q] = torch.round(c[:q] * 2)  # many ties
    c[q : 2 * q] = c[q : 2 * q].abs() ** 4  # skewed: settled within the first passes
    c[2 * q : 3 * q] = c[2 * q : 3 * q].abs() + 0.01  # all positive and flat: needs long prefixes
    y = c.sum(1) + torch.randn(rows, generator=gen)
    for theta in (0.2, 0.5, 0.95):
        keep = select_synapses(c, y, theta)
        check = range(0, rows, max(1, rows // 150))  # the Python reference is slow on long rows
        for r in check:
            ref = ref_select(c[r].tolist(), float(y[r]), theta)
            assert keep[r].nonzero().squeeze(1).tolist() == sorted(ref), (k, theta, r)


# --------------------------------------------------------------------------------------------------
# Extractor features
# --------------------------------------------------------------------------------------------------


def test_partial_extraction_equals_tail_of_full(lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:64])
    full = EffectivePathExtractor(lenet).extract(x)
    part = EffectivePathExtractor(lenet, last_k=3).extract(x)
    assert part.layers == ["fc1", "fc2", "fc3"]
    for r in (1, 2):
        for name in part.layers:
            assert torch.equal(part.ids[r][name], full.ids[r][name])
            assert torch.equal(part.offsets[r][name], full.offsets[r][name])


def test_from_taps_equals_extract_and_batches_concat(lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:50])
    ext = EffectivePathExtractor(lenet, batch_size=16)
    ref = ext.extract(x)
    with torch.no_grad():
        logits, taps = lenet.forward_with_taps(x)
    got = ext.extract_from_taps(x, logits, {k: v.numpy() for k, v in taps.items()})
    assert set(ext.required_taps) <= set(taps)
    for r in (1, 2):
        assert torch.equal(got.classes[r], ref.classes[r])
        for name in ref.layers:
            assert torch.equal(got.ids[r][name], ref.ids[r][name])
            assert torch.equal(got.offsets[r][name], ref.offsets[r][name])
    assert torch.equal(ref.classes[1], logits.argmax(1))
    assert bool((ref.classes[2] != ref.classes[1]).all())


def test_required_taps_partial(lenet):
    assert EffectivePathExtractor(lenet, last_k=3).required_taps == ["flatten", "fc1", "fc2"]
    assert EffectivePathExtractor(lenet).required_taps == ["conv1", "pool1", "conv2", "flatten", "fc1", "fc2"]


def test_from_onnxruntime_taps_agree(lenet, mnist_test):
    import onnxruntime as ort

    from tests.conftest import MNIST_CLASSIFIER

    sess = ort.InferenceSession(str(MNIST_CLASSIFIER / "classifier.onnx"), providers=["CPUExecutionProvider"])
    x = mnist_test.x[:20]
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"input": x}), strict=True))
    ext = EffectivePathExtractor(lenet, last_k=3)
    got = ext.extract_from_taps(x, outs["logits"], outs)
    ref = ext.extract(x)
    for name in ref.layers:  # float differences between runtimes may flip a rare borderline synapse
        a, b = set(got.ids[1][name].tolist()), set(ref.ids[1][name].tolist())
        assert len(a & b) / len(a | b) > 0.99


def test_path_batch_helpers(lenet, mnist_test):
    pb = EffectivePathExtractor(lenet, batch_size=7).extract(torch.from_numpy(mnist_test.x[:20]), ranks=(1,))
    assert isinstance(pb, PathBatch) and len(pb) == 20 and pb.ranks == [1]
    c = pb.counts(1, "conv2")
    assert c.shape == (20,) and int(c.sum()) == pb.ids[1]["conv2"].numel()
    per = pb.per_image(1)
    assert torch.equal(per[5]["fc1"], pb.image(1, 5)["fc1"])


def test_theta_monotone_path_size(lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:32])
    sizes = []
    for theta in (0.1, 0.5, 1.0):
        pb = EffectivePathExtractor(lenet, theta=theta).extract(x, ranks=(1,))
        sizes.append(sum(pb.ids[1][n].numel() for n in pb.layers))
    assert sizes[0] < sizes[1] < sizes[2]


def test_rejects_unsupported():
    with pytest.raises(NotImplementedError):
        EffectivePathExtractor(nn.Sequential(nn.Linear(4, 4), nn.Softmax(1)), input_shape=(4,)).layers
    with pytest.raises(ValueError, match="theta"):
        EffectivePathExtractor(nn.Sequential(nn.Linear(4, 4)), theta=0.0)


def test_deterministic_ids_numpy_input(lenet, mnist_test):
    x = mnist_test.x[:8]
    a = EffectivePathExtractor(lenet).extract(x)
    b = EffectivePathExtractor(lenet).extract(np.ascontiguousarray(x))
    assert torch.equal(a.ids[2]["conv1"], b.ids[2]["conv1"])


# --------------------------------------------------------------------------------------------------
# Benchmark helpers
# --------------------------------------------------------------------------------------------------


def test_bench_loop_baseline_agrees_with_extractor(lenet, mnist_test):
    from pathguard.models.evaluation.bench_ep import loop_reference_paths

    x = torch.from_numpy(mnist_test.x[10:13])
    for rank in (1, 2):
        loop = loop_reference_paths(lenet, x, rank=rank)
        vec = extract_effective_paths(lenet, x, rank=rank)
        for a, b in zip(loop, vec, strict=True):
            assert list(a) == list(b)
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_alexnet_partial_extraction():
    from pathguard.models.evaluation.bench_ep import alexnet

    torch.manual_seed(0)
    model = alexnet()
    ext = EffectivePathExtractor(model, last_k=3, input_shape=(3, 224, 224))
    assert ext.all_layers == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert ext.required_taps == ["flatten", "fc6", "fc7"]
    pb = ext.extract(torch.rand(1, 3, 224, 224))
    assert pb.layers == ["fc6", "fc7", "fc8"]
    for r in (1, 2):
        assert torch.all(pb.ids[r]["fc8"] // 4096 == pb.classes[r][0])
        assert pb.ids[r]["fc6"].numel() > 0 and int(pb.ids[r]["fc6"].max()) < 4096 * 9216


def test_cifar_layout_bn_unfolded_equals_folded_and_taps():
    from pathguard.models.networks import CONFIGS, build_classifier, fold_batchnorm

    torch.manual_seed(0)
    model = _randomize_bn(build_classifier(CONFIGS["cifar10"]), torch.Generator().manual_seed(1))
    folded = fold_batchnorm(model)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a = EffectivePathExtractor(model).extract(x)
    b = EffectivePathExtractor(folded).extract(x)
    with torch.no_grad():
        logits, taps = model.forward_with_taps(x)
    c = EffectivePathExtractor(model, last_k=4).extract_from_taps(x, logits, taps)
    assert a.layers == b.layers == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]
    for r in (1, 2):
        for name in a.layers:
            sa, sb = set(a.ids[r][name].tolist()), set(b.ids[r][name].tolist())
            assert len(sa ^ sb) <= 0.001 * len(sa | sb), name  # folded BN: same math, float rounding only
        for name in c.layers:  # taps come from the unfolded conv -> BN -> ReLU: float rounding only
            sa, sc = set(a.ids[r][name].tolist()), set(c.ids[r][name].tolist())
            assert len(sa ^ sc) <= 0.001 * len(sa | sc), name
