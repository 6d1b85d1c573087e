"""The compiled small-batch Effective Path walk (models/effective_path/fastpath.py) against the torch walk and the
independent per-neuron loop reference of tests/test_effective_path.py: the same selected synapse sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pathguard.models.effective_path import EffectivePathExtractor
from pathguard.models.effective_path.steps import PassStep, Step
from tests.test_effective_path import CASES, ref_extract


def _same(a, b) -> None:
    assert a.layers == b.layers
    assert sorted(a.ids) == sorted(b.ids)
    for r in a.ids:
        assert torch.equal(a.classes[r], b.classes[r])
        for name in a.layers:
            assert a.ids[r][name].dtype == torch.int64
            assert torch.equal(a.ids[r][name], b.ids[r][name]), (r, name)
            assert torch.equal(a.offsets[r][name], b.offsets[r][name]), (r, name)


def _pair(model, shape, **kw):
    fast = EffectivePathExtractor(model, input_shape=shape, **kw)
    slow = EffectivePathExtractor(model, input_shape=shape, fast_path=False, **kw)
    return fast, slow


@pytest.mark.parametrize("theta", [0.5, 0.3, 0.9])
@pytest.mark.parametrize("last_k", [None, 2])
@pytest.mark.parametrize(("make", "shape"), CASES, ids=["plain", "residual", "pools", "padded"])
def test_fast_walk_matches_torch_walk_and_loop_reference(make, shape, last_k, theta):
    model = make()
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(11))
    fast, slow = _pair(model, shape, theta=theta, last_k=last_k)
    assert fast.uses_fast_path(4) and not slow.uses_fast_path(4)
    got = fast.extract(x, ranks=(1, 2))
    _same(got, slow.extract(x, ranks=(1, 2)))
    if last_k is not None:
        return  # the loop reference walks the whole network; partial paths are checked against the torch walk
    total = 0
    for i in range(len(x)):
        for r in (1, 2):
            ref = ref_extract(model, x[i : i + 1], theta, r)
            mine = got.image(r, i)
            for name in got.layers:
                assert mine[name].tolist() == ref.get(name, []), (r, i, name)
                total += len(mine[name])
    assert total > 0


def test_fast_walk_on_lenet_matches_loop_reference(lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:3])
    ext = EffectivePathExtractor(lenet)
    assert ext.uses_fast_path(1) and ext.fast_path_reason is None
    for i in range(3):
        pb = ext.extract(x[i : i + 1], ranks=(1, 2))
        for r in (1, 2):
            assert {k: v.tolist() for k, v in pb.image(r, 0).items()} == ref_extract(lenet, x[i : i + 1], 0.5, r)


@pytest.mark.parametrize("last_k", [None, 3])
@pytest.mark.parametrize("n", [1, 5, 8])
def test_fast_walk_equals_torch_walk_on_lenet_from_taps(lenet, mnist_test, n, last_k):
    x = torch.from_numpy(mnist_test.x[100 : 100 + n])
    logits, taps = lenet.forward_with_taps(x)
    fast, slow = _pair(lenet, (1, 28, 28), last_k=last_k)
    _same(fast.extract_from_taps(x, logits, taps), slow.extract_from_taps(x, logits, taps))


@pytest.mark.parametrize("ranks", [(1,), (2, 1), (1, 2, 3)])
def test_fast_walk_any_ranks(ranks):
    model, shape = CASES[1][0](), CASES[1][1]
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(3))
    fast, slow = _pair(model, shape, theta=0.3)
    _same(fast.extract(x, ranks=ranks), slow.extract(x, ranks=ranks))


def test_switch_and_batch_limit(lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:12])
    ext = EffectivePathExtractor(lenet, fast_max_batch=4)
    assert ext.uses_fast_path(4) and not ext.uses_fast_path(5)
    off = EffectivePathExtractor(lenet, fast_path=False)
    assert not off.uses_fast_path(1)
    _same(ext.extract(x), off.extract(x))  # 12 images: the torch walk, same paths


class _Scale(Step):
    """A step type the compiled walk has no kernel for (stands for any future layer type)."""

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_unknown_step_falls_back_to_torch_walk(monkeypatch):
    model, shape = CASES[0][0](), CASES[0][1]
    calls = []

    def compile_with_unknown(self, mod, input_shape):
        plan = original(self, mod, input_shape)
        i = next(k for k, s in enumerate(plan.steps) if isinstance(s, PassStep))
        extra = _Scale()
        extra.uid, extra.w_end = 1000, plan.steps[i].w_end
        extra.in_shape = extra.out_shape = plan.steps[i].out_shape
        plan.steps.insert(i + 1, extra)
        calls.append(1)
        return plan

    from pathguard.models.effective_path import plan as plan_mod

    original = plan_mod.Compiler.compile
    monkeypatch.setattr(plan_mod.Compiler, "compile", compile_with_unknown)
    ext = EffectivePathExtractor(model, input_shape=shape)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(5))
    got = ext.extract(x)
    assert calls and not ext.uses_fast_path(1)
    assert ext.fast_path_reason is not None and "_Scale" in ext.fast_path_reason
    _same(got, EffectivePathExtractor(model, input_shape=shape, fast_path=False).extract(x))


def test_pipeline_scores_identical_with_fast_path_on_and_off(mnist_test):
    from pathguard.models.bundle import load_bundle
    from tests.conftest import ARTIFACTS

    pipeline = load_bundle(ARTIFACTS / "mnist-lenet5", seed=0).pipeline  # noise copies seeded
    x = torch.from_numpy(mnist_test.x[:6])
    on = [pipeline.detect(x[i : i + 1]) for i in range(3)] + [pipeline.detect(x[3:6])]
    assert pipeline.extractor.uses_fast_path(3)
    pipeline.extractor.fast_path = False
    off = [pipeline.detect(x[i : i + 1]) for i in range(3)] + [pipeline.detect(x[3:6])]
    for a, b in zip(on, off, strict=True):
        for field in ("rank1_similarity", "rank2_similarity", "ep_score", "nic_score", "score", "p_value"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=0, atol=1e-9, err_msg=field)
        assert np.array_equal(a.adversarial, b.adversarial)
    assert any(float(r.rank1_similarity.sum()) > 0 for r in on)


def test_lenet_sequential_children_have_kernels(lenet):
    """Every module kind of the bundled LeNet-5 is walked by kernels (no silent fallback on the serving model)."""
    ext = EffectivePathExtractor(lenet)
    assert ext.uses_fast_path(1), ext.fast_path_reason
    assert any(isinstance(m, nn.MaxPool2d) for m in lenet.modules())


def test_class_path_similarity_equals_brute_force_on_the_bundle(lenet, mnist_test):
    """The numpy similarity (served per request) equals |S ∩ C| / |S| counted from the unpacked class bitmaps."""
    from pathguard.models.effective_path import ClassPaths
    from tests.conftest import ARTIFACTS

    cp = ClassPaths.from_arrays(np.load(ARTIFACTS / "mnist-lenet5" / "class_paths.npz", allow_pickle=False))
    x = torch.from_numpy(mnist_test.x[:7])
    pb = EffectivePathExtractor(lenet).extract(x)
    sims = cp.similarity(pb)
    for r in (1, 2):
        assert sims[r].shape == (7, len(pb.layers))
        for i in range(7):
            k = int(pb.classes[r][i])
            for j, name in enumerate(pb.layers):
                ids = pb.image(r, i)[name].numpy()
                member = np.unpackbits(cp.synapse_bitmaps_[name][k])[ids]
                assert sims[r][i, j] == (member.sum() / len(ids) if len(ids) else 0.0)
    assert 0 < sims[2].mean() < sims[1].mean() <= 1


def net_wide(seed=0):
    """A conv and a linear layer with fan-in above the kernel limit (2160, 2080) before a narrow one."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(240, 130, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(130 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).eval()


def test_wide_layers_use_the_torch_step_inside_the_fast_walk():
    from pathguard.models.effective_path import fastpath

    model, shape = net_wide(), (240, 4, 4)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2))
    fast, slow = _pair(model, shape)
    assert fast.uses_fast_path(2)
    kinds = [type(node).__name__ for node in fastpath.FastWalk(fast._get_plan()).nodes]
    assert kinds.count("_TorchWeighted") == 2 and kinds.count("_Linear") == 1
    got = fast.extract(x)
    _same(got, slow.extract(x))
    for i in range(2):
        for r in (1, 2):
            ref = ref_extract(model, x[i : i + 1], 0.5, r)
            assert {k: v.tolist() for k, v in got.image(r, i).items()} == ref
