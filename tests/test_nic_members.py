"""NIC's randomized members drawn per input at serving time (NIC paper III-D)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from pathguard.models.bundle import load_bundle
from pathguard.models.components.nic import on_scale
from pathguard.models.nic import layer_activation
from pathguard.models.verdict.calibration import empirical_p_values
from pathguard.service.app import create_app
from pathguard.service.settings import Settings
from tests.conftest import ARTIFACTS, MNIST_CLASSIFIER, TINY_NIC


@pytest.fixture(scope="module")
def members_bundle(tmp_path_factory):
    """A tiny MNIST bundle whose NIC has two randomized members beside the plain one."""
    from pathguard.models.builder import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-members"
    cfg = BuildConfig(name="tiny-members", n_train=3000, n_calib=1200, target_fpr=0.1, nic={**TINY_NIC, "n_random": 2})
    build_bundle("mnist", MNIST_CLASSIFIER, out, cfg)
    return out


def test_a_score_put_on_another_scale_keeps_its_p_value():
    rng = np.random.default_rng(0)
    own, reference = np.sort(rng.normal(3, 2, 500)), np.sort(rng.normal(-1, 0.5, 500))
    scores = np.r_[rng.normal(3, 3, 300), own[:5], own[-1] + 2.0, own[0] - 1.0]
    moved = on_scale(scores, own, reference)
    np.testing.assert_array_equal(empirical_p_values(reference, moved), empirical_p_values(own, scores))
    assert moved[-2] > reference[-1]  # beyond the largest calibration score stays beyond it
    with pytest.raises(ValueError, match="different sizes"):
        on_scale(scores, own, reference[:-1])


def test_each_input_is_scored_by_its_drawn_member(members_bundle, mnist_test):
    x = torch.from_numpy(mnist_test.x[:40])
    fixed = load_bundle(members_bundle, seed=0).pipeline
    drawn = load_bundle(members_bundle, seed=0).pipeline
    drawn.randomize_nic_members()
    assert drawn.checked_taps == [] and fixed.checked_taps  # the member-0 early checks would be wasted
    nic = drawn.components["nic"]
    logits, taps = drawn.classifier.forward_with_taps(x)
    obs = drawn.observe(x, logits, taps)
    members = nic.members_of(obs)
    assert set(members.tolist()) == {1, 2}  # both randomized members, never the plain one
    raw = nic.raw(obs)
    acts = {n: layer_activation(n, x, logits, taps) for n in nic.value_layers}
    for m in (1, 2):
        idx = np.flatnonzero(members == m)
        own = nic.nic.raw_scores({k: a[idx] for k, a in acts.items()}, member=m)[2].numpy()
        p_own = empirical_p_values(nic._calib_final(m), own)
        np.testing.assert_array_equal(empirical_p_values(drawn.calibration["nic"], raw[idx]), p_own)
    assert not np.allclose(raw, fixed.components["nic"].raw(fixed.observe(x, logits, taps)))

    # seeded: the same input draws the same member alone or in a batch; unseeded: requests differ
    again = drawn.components["nic"].members_of(drawn.observe(x[:5], logits[:5], {k: t[:5] for k, t in taps.items()}))
    np.testing.assert_array_equal(again, members[:5])
    fresh = load_bundle(members_bundle).pipeline
    fresh.randomize_nic_members()
    draws = [fresh.components["nic"].members_of(fresh.observe(x, logits, taps)) for _ in range(3)]
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])


def test_drawn_members_keep_the_clean_flagged_rate(members_bundle, mnist_test):
    """A member's p-value comes from its own calibration, so the verdict's threshold still holds: on 600 clean
    test images the flagged rate stays near the bundle's 10% target, as with the fixed member."""
    rates = []
    for randomize in (False, True):
        pipe = load_bundle(members_bundle, seed=1).pipeline
        if randomize:
            pipe.randomize_nic_members()
        rates.append(np.mean(np.concatenate([pipe.detect(mnist_test.x[s : s + 200]).adversarial
                                             for s in range(1000, 1600, 200)])))  # fmt: skip
    assert abs(rates[1] - 0.1) < 0.05 and abs(rates[0] - 0.1) < 0.05, rates


def test_the_setting_serves_members_and_refuses_bundles_without_them(members_bundle, tmp_path, mnist_test):
    from tests.service.conftest import png_bytes

    settings = {"spool_path": tmp_path / "s.jsonl", "warmup_rounds": 1, "redis_url": None, "nic_members": "random"}
    with TestClient(create_app(Settings(bundle=members_bundle, **settings))) as client:
        body = client.post(
            "/v1/detect", content=png_bytes(mnist_test.x[0]), headers={"Content-Type": "image/png"}
        ).json()
        assert 0 <= body["nic"]["score"] <= 1 and body["verdict"]["adversarial"] in (True, False)
    refused = TestClient(create_app(Settings(bundle=ARTIFACTS / "mnist-lenet5", **settings)))
    with pytest.raises(Exception, match="n_random"), refused:
        pass
    with pytest.raises(ValueError, match="NIC_IN_GRAPH"):
        Settings(nic_members="random", nic_in_graph=True)


def test_the_soft_scale_map_meets_the_hard_one_at_the_calibration_scores_and_has_a_gradient():
    from pathguard.models.components.nic import on_scale_soft

    rng = np.random.default_rng(1)
    own, reference = np.sort(rng.normal(3, 2, 200)), np.sort(rng.normal(-1, 0.5, 200))
    at = torch.tensor(np.r_[own[3:-3:7], own[-1] + 1.5, own[0] - 2.0], requires_grad=True)
    soft = on_scale_soft(at, own, reference)
    hard = on_scale(at.detach().numpy(), own, reference)
    np.testing.assert_allclose(soft.detach().numpy()[:-1], hard[:-1], atol=1e-12)
    # below every calibration score both give p-value 1 (the hard map clamps, the soft one keeps a slope)
    assert empirical_p_values(reference, soft.detach().numpy()[-1:])[0] == empirical_p_values(reference, hard[-1:])[0]
    soft.sum().backward()
    assert at.grad is not None and (at.grad > 0).all()  # monotone, nowhere flat


def test_the_attack_averages_nic_over_the_drawn_members(members_bundle, mnist_test, tmp_path):
    """With drawn members the NIC surrogate is the mean over the members of each one's score on the verdict's
    scale (EOT), carries a gradient, and the adaptive command runs against the randomized bundle."""
    import json

    from pathguard.models.components.base import Relaxation
    from pathguard.models.components.nic import on_scale_soft
    from pathguard.service.cli import main

    pipe = load_bundle(members_bundle, seed=0).pipeline
    pipe.randomize_nic_members()
    nic = pipe.components["nic"]
    x = torch.from_numpy(mnist_test.x[:6]).requires_grad_(True)
    logits, taps = pipe.classifier.forward_with_taps(x)
    obs = pipe.observe(x, logits, taps)
    value = nic.surrogate(obs, Relaxation())
    acts = {n: layer_activation(n, x, logits, taps) for n in nic.value_layers}
    expected = torch.stack([on_scale_soft(nic.nic.differentiable_scores(acts, member=m)[2], nic._calib_final(m),
                                          np.sort(pipe.calibration["nic"])) for m in (1, 2)]).mean(0)  # fmt: skip
    np.testing.assert_allclose(value.detach().numpy(), expected.detach().numpy(), rtol=1e-10)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # NIC's value-invariant statistic too: the mean over the members, each against its own calibration (compared on
    # the surrogate's own VI scores: a randomized member's VI scores saturate, so clean calibration images tie with
    # them exactly and the last bits of another summation order would move their p-values)
    from pathguard.models.verdict.calibration import two_sided_fisher

    vi = pipe.components["nic_vi"].surrogate(obs, Relaxation())
    per_member = []
    for m in (1, 2):
        v = nic.differentiable(obs, m)[0].detach().numpy()
        np.testing.assert_allclose(v, nic.nic.raw_scores({k: a.detach() for k, a in acts.items()}, member=m)[0],
                                   rtol=1e-7, atol=1e-9)  # fmt: skip
        per_member.append(two_sided_fisher(nic.nic.value_violation(v, m), nic.nic.calibration_size))
    np.testing.assert_allclose(vi.detach().numpy(), np.mean(per_member, 0), rtol=1e-9)  # straight through

    out = tmp_path / "adaptive"
    args = ["evaluate", "--adaptive", "--bundle", str(members_bundle), "--n", "2", "--budgets", "linf_0.3",
            "--targets", "nic", "--steps", "2", "--rounds", "1", "--draws", "2", "--nic-members", "random"]  # fmt: skip
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["nic_members"] == "random" and "EOT" in report["surrogates"]["nic_members"]
    assert 0.0 <= report["pgd"]["nic"]["linf_0.3"]["adaptive"]["success"] <= 1.0
