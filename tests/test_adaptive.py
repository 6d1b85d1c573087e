"""Adaptive attacks (``pathguard evaluate --adaptive``): every component's differentiable surrogate equals its served
score, gradients flow through each, lambda = 0 is plain PGD, success is judged at the served threshold, and the
command writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pathguard.models.bundle import load_bundle
from pathguard.models.components import Observation
from pathguard.models.components.base import Relaxation
from pathguard.models.components.consistency import (
    MarginComponent,
    NoiseDropComponent,
    NoiseFlipComponent,
    NoiseL1Component,
    SqueezeComponent,
)
from pathguard.models.components.mahalanobis import GaussianComponent
from pathguard.models.evaluation.adaptive import FUSED, VerdictSurrogate, judge, pgd
from pathguard.models.mahalanobis import ClassGaussian
from pathguard.models.verdict import FusedVerdict, empirical_p_values
from pathguard.models.verdict.surrogate import fused_log_p, soft_p_values
from tests.conftest import ARTIFACTS

MNIST_BUNDLE = ARTIFACTS / "mnist-lenet5"
HARD = Relaxation(draws=None, bandwidth=0.0, temperature=0.0)  # the served steps, no smoothing
SMOOTH = Relaxation(draws=None)  # straight through: served values forward, smoothed gradients


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- the verdict's steps


def test_soft_p_values_equal_the_empirical_ones_and_keep_a_gradient_beyond_the_calibration():
    rng = np.random.default_rng(0)
    calib = np.sort(rng.normal(size=500))
    s = torch.tensor([-4.0, -0.3, 0.0, 0.7, 2.5, 9.0], dtype=torch.float64, requires_grad=True)
    hard = soft_p_values(calib, s, 0.0)
    assert np.allclose(hard.detach().numpy(), empirical_p_values(calib, s.detach().numpy()), atol=1e-15)
    lower = soft_p_values(calib, s, 0.0, lower=True).detach().numpy()
    assert np.allclose(lower, (1 + np.searchsorted(calib, s.detach().numpy(), side="left")) / 501, atol=1e-15)
    st = soft_p_values(calib, s, 0.02)  # straight through: the hard value forward
    assert torch.equal(st.detach(), hard.detach())
    soft = soft_p_values(calib, s, 0.02, straight_through=False)
    assert np.abs(soft.detach().numpy() - hard.detach().numpy())[1:5].max() < 0.02  # inside: within the smoothing
    (grad,) = torch.autograd.grad(torch.log(st).sum(), s)
    assert (grad[1:] < 0).all()  # a higher score always lowers the p-value, 9.0 (far above the max) included
    assert grad[-1] > -1.0 / (calib[-1] - calib[0])  # the tail's slope is about 1 / the calibration's range


@pytest.mark.parametrize("rule", ["fisher", "tippett", "harmonic", "tippett(fisher)", "harmonic(tippett)"])
def test_the_fused_log_p_value_is_the_served_fused_score(rule):
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    calib_a = {k: rng.gamma(2.0, size=300) for k in names}
    calib_b = {k: rng.gamma(2.0, size=300) for k in names}
    verdict = FusedVerdict.fit(calib_a, calib_b, 0.05, rule, {"a": "layer", "b": "layer", "c": "consistency"})
    raw = {k: rng.gamma(2.5, size=40) for k in names}
    log_p = {k: torch.log(soft_p_values(verdict.sorted_calib(k), torch.from_numpy(raw[k]), 0.0)) for k in names}
    assert np.allclose(1.0 - torch.exp(fused_log_p(verdict, log_p)).numpy(), verdict.fuse(raw), atol=1e-12)


# ---------------------------------------------------------------------------------------- tiny components


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = torch.relu(self.conv(x))
        return self.fc(a.flatten(1)), {"conv": a}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_taps(x)[0]


def _observe(net: _Tiny, x: torch.Tensor, comps: dict, grad: bool) -> Observation:
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(x))]
    if grad:
        logits, taps = net.forward_with_taps(x)
        return Observation(x, logits, taps, net, gens, comps)
    with torch.no_grad():
        logits, taps = net.forward_with_taps(x)
    return Observation(x, logits, taps, lambda b: net(b).detach(), gens, comps)


def _tiny_gaussian(net: _Tiny) -> GaussianComponent:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(200, 1, 8, 8, generator=gen), np.arange(200) % 5
    with torch.no_grad():
        logits, taps = net.forward_with_taps(x)
    gaussian = ClassGaussian(["conv", "logits"]).fit([({"conv": taps["conv"], "logits": logits}, y)], 5)
    gaussian.calibrate(gaussian.layer_scores({"conv": taps["conv"], "logits": logits}))
    return GaussianComponent(gaussian)


def test_every_consistency_and_gaussian_surrogate_equals_its_served_score_and_has_a_gradient():
    net = _Tiny()
    comps = {
        "margin": MarginComponent(),
        "noise_flip": NoiseFlipComponent(0.3, 6),
        "noise_l1": NoiseL1Component(0.3, 6),
        "noise_drop": NoiseDropComponent(0.3, 6),
        "squeeze": SqueezeComponent(2, [2, 3]),
        "mahalanobis": _tiny_gaussian(net),
    }
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    for name, c in comps.items():
        served = c.raw(_observe(net, x, comps, grad=False))
        for relax in (HARD, SMOOTH):  # same noise draws (draws=None: the component's copies, same generators)
            xg = x.clone().requires_grad_(True)
            s = c.surrogate(_observe(net, xg, comps, grad=True), relax)
            assert np.allclose(s.detach().numpy(), served, rtol=1e-9, atol=1e-9), name
            if s.requires_grad:
                (g,) = torch.autograd.grad(s.sum(), xg)
                assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    # the flip share has no gradient as served; the relaxed one has, and its value stays a share of flips
    xg = x.clone().requires_grad_(True)
    soft = comps["noise_flip"].surrogate(_observe(net, xg, comps, grad=True), Relaxation(straight_through=False))
    (g,) = torch.autograd.grad(soft.sum(), xg)
    assert g.abs().sum() > 0 and ((soft >= 0) & (soft <= 1)).all()


# ------------------------------------------------------------------------------------------- the bundle


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(MNIST_BUNDLE, seed=0)


@pytest.fixture(scope="module")
def images(mnist_test):
    return mnist_test.x[:6], mnist_test.y[:6]


def test_the_bundle_surrogates_equal_the_served_scores_and_carry_gradients(bundle, images):
    """EP (relaxed selection), NIC, NIC VI, the noise drop and squeezing of the committed MNIST bundle, and the
    fused score: the straight-through surrogate's forward value is the served one; the gradient is finite and
    non-zero through every component. Without straight through the smoothed values stay close (stated
    tolerances)."""
    pipe = bundle.pipeline
    x = torch.from_numpy(images[0])
    res, raw = pipe.detect_with_components(x)
    # without straight through: the smoothing's distance from the served value. The relative rule (the bundle's
    # Effective Path) keeps many contributions just above its cut, so its soft selection is not close in value
    # (raw scores 0.6-2.1 against 0.0-0.4 served); the attacks take its gradient only, with the served value forward
    assert pipe.components["effective_path"].extractor.relative
    tolerance = {"effective_path": None, "nic": 1e-9, "nic_vi": 5.0, "noise_drop": 1e-9, "squeeze": 1e-9}
    for relax in (HARD, SMOOTH, Relaxation(draws=None, straight_through=False)):
        sur = VerdictSurrogate(pipe, relax)
        xg = x.clone().requires_grad_(True)
        obs = sur.observe(xg, 0)
        obs.generators = pipe._generators(x)  # the served noise
        for name in pipe.verdict.components:
            s = pipe.components[name].surrogate(obs, relax)
            tol = tolerance[name] if not relax.straight_through else 1e-9
            assert torch.isfinite(s).all(), name
            if tol is not None:
                assert np.allclose(s.detach().numpy(), raw[name], rtol=1e-9, atol=tol), name
            if relax.bandwidth > 0:
                (g,) = torch.autograd.grad(s.sum(), xg, retain_graph=True)
                assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        fused = 1.0 - torch.exp(fused_log_p(pipe.verdict, sur.log_p(obs, pipe.verdict.components)))
        if relax.straight_through:
            assert np.allclose(fused.detach().numpy(), res.score, atol=1e-9)
    assert VerdictSurrogate(pipe).differentiable() == dict.fromkeys(pipe.verdict.components)


def test_lambda_zero_is_plain_pgd(bundle, images):
    """With lambda 0 the attack is ART's PGD (no random start) on the classifier alone: the oblivious attack."""
    from art.attacks.evasion import ProjectedGradientDescentNumpy
    from art.estimators.classification import PyTorchClassifier

    x, y = images
    model = bundle.classifier
    est = PyTorchClassifier(model, nn.CrossEntropyLoss(), (1, 28, 28), 10, clip_values=(0.0, 1.0), device_type="cpu")
    art = ProjectedGradientDescentNumpy(
        est, norm=np.inf, eps=0.1, eps_step=0.025, max_iter=8, num_random_init=0, verbose=False
    ).generate(x=x, y=y)
    sur = VerdictSurrogate(bundle.pipeline)
    ours = pgd(sur, torch.from_numpy(x), torch.from_numpy(y), "linf", 0.1, 8, 0.025, torch.zeros(len(x)))
    assert np.abs(ours.numpy() - art).max() < 1e-6
    assert np.abs(ours.numpy() - x).max() > 0.09  # it moved to the budget


def test_a_detector_term_changes_the_attack(bundle, images):
    x, y = (torch.from_numpy(a) for a in images)
    sur = VerdictSurrogate(bundle.pipeline, Relaxation(draws=4))
    plain = pgd(sur, x[:2], y[:2], "linf", 0.1, 3, 0.025, torch.zeros(2))
    aware = pgd(sur, x[:2], y[:2], "linf", 0.1, 3, 0.025, torch.full((2,), 10.0), target=FUSED)
    assert not torch.equal(plain, aware)
    with torch.no_grad():  # the aware attack lowered the detector's surrogate score where the plain one did not
        d_plain = sur.detector_term(sur.observe(plain, 0), FUSED)
        d_aware = sur.detector_term(sur.observe(aware, 0), FUSED)
    assert float(d_aware.sum()) < float(d_plain.sum())


def test_success_is_judged_at_the_served_threshold(bundle, images):
    pipe = bundle.pipeline
    x, y = images
    wrong = (y + 1) % 10  # every image counts as misclassified against these labels
    res = pipe.detect(torch.from_numpy(x))
    j = judge(pipe, x, wrong)
    assert np.array_equal(j.flagged, res.score > pipe.threshold)
    assert np.array_equal(j.success(), ~j.flagged)
    assert not judge(pipe, x, y).success().any()  # correctly classified: never a success
    before = pipe.threshold
    try:
        pipe.threshold = float(np.min(res.score)) - 1e-9  # a threshold below every score flags them all
        assert not judge(pipe, x, wrong).success().any()
    finally:
        pipe.threshold = before


def test_the_command_writes_the_adaptive_report(tmp_path: Path):
    from pathguard.service.cli import main

    out = tmp_path / "adaptive"
    args = ["evaluate", "--adaptive", "--bundle", str(MNIST_BUNDLE), "--n", "2", "--budgets", "linf_8,l2_1.0",
            "--targets", "fused,noise_drop", "--component-budgets", "linf_8", "--steps", "2", "--rounds", "1",
            "--draws", "2"]  # fmt: skip
    args += ["--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert not (out / "report.partial.json").exists()  # the cells kept during the run give way to the report
    assert set(report["pgd"]) == {"fused", "noise_drop"} and set(report["pgd"]["fused"]) == {"linf_8", "l2_1.0"}
    assert set(report["pgd"]["noise_drop"]) == {"linf_8"}  # one-component targets at --component-budgets only
    assert report["images"]["n"] == 2
    for target in ("fused", "noise_drop"):
        s = report["pgd"][target]["linf_8"]
        assert 0.0 <= s["oblivious"]["success"] <= s["adaptive"]["success"] <= 1.0  # lambda 0 is its first round
    assert set(report["cw_l2"]) == {"oblivious", "fused"}  # CW-L2 against the fused verdict, beside plain CW-L2
    oblivious, adaptive = report["cw_l2"]["oblivious"], report["cw_l2"]["fused"]
    assert 0.0 <= oblivious["success"] <= oblivious["misclassified"] <= 1.0
    if oblivious["mean_l2_of_misclassified"] and adaptive["mean_l2_of_successes"]:
        ratio = adaptive["mean_l2_of_successes"] / oblivious["mean_l2_of_misclassified"]
        assert adaptive["l2_over_oblivious"] == pytest.approx(ratio)
    md = (out / "report.md").read_text()
    assert "PGD: oblivious vs adaptive" in md and "effective_path_relaxation" in md
