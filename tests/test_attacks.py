"""Attack registry on the committed LeNet-5: contract (shape, dtype, range, params), effect on the
prediction, determinism, and the semantics of run_attack."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pathguard.models.evaluation.attacks import ATTACKS, DATASETS, get_attack, predict_labels, run_attack

EXPECTED = {
    "fgsm", "bim", "deepfool", "jsma_next", "jsma_ll", "cw_l2_next", "cw_l2_ll", "cw_linf_next",
    "cw_linf_ll", "cw_l0_next", "cw_l0_ll", "patch", "lighting", "dirt", "rectangle", "noise",
    "fgsm_2", "fgsm_4", "fgsm_8", "bim_2", "bim_4", "bim_8", "pgd_linf_8", "pgd_l2_0.5", "square_8", "cw_l2_k20",
    "deepfool_0.02",
}  # fmt: skip

# Cheaper settings for the slow optimisers (the defaults run in the benchmark of docs/attacks.md).
FAST = {
    "cw_l2_next": {"binary_search_steps": 2, "max_iter": 30},
    "cw_l2_ll": {"binary_search_steps": 2, "max_iter": 30},
    "cw_l2_k20": {"binary_search_steps": 2, "max_iter": 30},
    "cw_l0_next": {"binary_search_steps": 2, "max_iter": 20, "rounds": 3},
    "cw_l0_ll": {"binary_search_steps": 2, "max_iter": 20, "rounds": 3},
    "cw_linf_next": {"max_iter": 10, "decrease_factor": 0.3, "largest_const": 5.0},
    "cw_linf_ll": {"max_iter": 10, "decrease_factor": 0.3, "largest_const": 5.0},
    "patch": {"max_iter": 5, "train_images": 4},
    "pgd_linf_8": {"max_iter": 5},
    "pgd_l2_0.5": {"max_iter": 5},
    "square_8": {"max_iter": 20},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The attacks run tiny batches; on a busy 2-core machine torch's second thread only adds
    spin-wait (ART's DeepFool measured 10x slower with two threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(lenet, mnist_test):
    """Eight correctly classified MNIST test digits (N, 1, 28, 28) and labels (N,)."""
    x, y = mnist_test.x[:32], mnist_test.y[:32].astype(np.int64)
    ok = predict_labels(lenet, x) == y
    return x[ok][:8], y[ok][:8]


def _attack(name: str, **extra):
    return get_attack(name, "mnist", **{**FAST.get(name, {}), **extra})


def test_registry_lists_every_attack_with_json_params_for_both_datasets():
    assert set(ATTACKS) == EXPECTED
    for name in ATTACKS:
        for dataset in DATASETS:
            params = get_attack(name, dataset).params
            assert json.loads(json.dumps(params)) == params
            assert params["implementation"] == ATTACKS[name].implementation
    assert get_attack("fgsm", "mnist").params["eps"] == 0.3
    assert get_attack("fgsm", "cifar10").params["eps"] == 0.0156
    assert get_attack("cw_l2_ll", "mnist").params["target"] == "ll"


def test_get_attack_rejects_unknown_names_and_parameters():
    with pytest.raises(KeyError, match="unknown attack"):
        get_attack("pgd", "mnist")
    with pytest.raises(KeyError, match="unknown dataset"):
        get_attack("fgsm", "svhn")
    with pytest.raises(KeyError, match="no parameter"):
        get_attack("fgsm", "mnist", epsilon=0.1)
    assert get_attack("fgsm", "mnist", eps=0.1).params["eps"] == 0.1


def test_generate_rejects_inputs_outside_the_contract(lenet, digits):
    x, y = digits
    attack = get_attack("fgsm", "mnist")
    with pytest.raises(ValueError, match="float32"):
        attack.generate(lenet, (x * 255).astype(np.uint8), y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack.generate(lenet, x * 2.0, y)
    with pytest.raises(ValueError, match="shape"):
        attack.generate(lenet, x, y[:-1])


def _assert_contract(out: np.ndarray, x: np.ndarray) -> None:
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


# Each default-run attack is covered by exactly one contract check here or in the prediction test below.
CONTRACT_ONLY = sorted(EXPECTED - {"fgsm", "bim", "deepfool", "jsma_next", "cw_l2_next"})


@pytest.mark.parametrize("name", CONTRACT_ONLY)
def test_attack_output_contract_and_params(lenet, digits, name):
    x, y = digits[0][:3], digits[1][:3]
    attack = _attack(name)
    out = attack.generate(lenet, x, y)
    _assert_contract(out, x)
    assert not np.array_equal(out, x)
    assert attack.params["implementation"].startswith(("art.", "pathguard"))


@pytest.mark.parametrize(
    ("name", "n", "min_success"),
    [("fgsm", 8, 4), ("bim", 8, 8), ("deepfool", 3, 3), ("jsma_next", 4, 4), ("cw_l2_next", 3, 2)],
)
def test_gradient_attacks_change_predictions(lenet, digits, name, n, min_success):
    x, y = digits[0][:n], digits[1][:n]
    result = run_attack(lenet, name, "mnist", x, y, **FAST.get(name, {}))
    _assert_contract(result.x_adv, x)
    assert result.n_attempted == n
    assert result.n_successful >= min_success, f"{name}: {result.n_successful}/{n}"
    assert np.array_equal(result.success, result.pred_adv != y)


def test_fgsm_matches_a_hand_computed_sign_gradient_step(lenet, digits):
    """The ART estimator sees the true loss gradient: no extra preprocessing, no softmax on top."""
    x, y = digits
    xt = torch.from_numpy(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(lenet(xt), torch.from_numpy(y), reduction="sum"), xt)
    expected = (xt.detach() + 0.3 * grad.sign()).clamp(0, 1).numpy()
    np.testing.assert_allclose(get_attack("fgsm", "mnist").generate(lenet, x, y), expected, atol=1e-6)


def test_bim_stays_in_its_linf_ball(lenet, digits):
    x, y = digits
    out = get_attack("bim", "mnist").generate(lenet, x, y)
    assert np.abs(out - x).max() <= 0.3 + 1e-5


def test_targeted_cw_linf_reaches_the_next_class(lenet, digits):
    """ART 1.20's own CW-Linf never keeps a targeted success; the corrected search does."""
    x, y = digits[0][:2], digits[1][:2]
    out = _attack("cw_linf_next").generate(lenet, x, y)
    np.testing.assert_array_equal(predict_labels(lenet, out), (y + 1) % 10)
    assert np.abs(out - x).max() < 1.0


def test_cw_l0_freezes_pixels_round_by_round(lenet, digits):
    """Each successful round freezes half the changeable pixels, so after rounds that reached the
    target the perturbation is confined to at most half the image (ART's loop alone stays dense)."""
    x, y = digits[0][:3], digits[1][:3]
    out = _attack("cw_l0_next").generate(lenet, x, y)
    hit = predict_labels(lenet, out) == (y + 1) % 10
    assert hit.sum() >= 2
    changed = (np.abs(out - x) > 1e-3).reshape(len(x), -1).sum(axis=1)
    assert np.all(changed[hit] <= 28 * 28 // 2), changed
    np.testing.assert_array_equal(out[~hit], x[~hit])


@pytest.mark.parametrize("name", ["fgsm", "deepfool", "cw_l2_next", "patch", "lighting", "dirt", "rectangle", "noise"])
def test_deterministic_attacks_repeat_exactly(lenet, digits, name):
    x, y = digits[0][:2], digits[1][:2]
    a = _attack(name).generate(lenet, x, y)
    b = _attack(name).generate(lenet, x, y)
    np.testing.assert_array_equal(a, b)


def test_seed_changes_the_seeded_attacks(lenet, digits):
    x, y = digits[0][:3], digits[1][:3]
    for name in ("noise", "rectangle"):
        assert not np.array_equal(_attack(name, seed=1).generate(lenet, x, y), _attack(name).generate(lenet, x, y))


def test_lighting_shifts_every_unclipped_pixel_by_one_amount(lenet, digits):
    x, y = digits
    out = get_attack("lighting", "mnist").generate(lenet, x, y)
    for xi, oi in zip(x, out, strict=True):
        inside = (oi > 0) & (oi < 1)
        shifts = (oi - xi)[inside]
        assert shifts.size and np.ptp(shifts) < 1e-5 and abs(shifts[0]) > 0


def test_dirt_only_blackens_small_rectangles(lenet, digits):
    x, y = digits
    out = get_attack("dirt", "mnist").generate(lenet, x, y)
    changed = out != x
    assert changed.any() and np.all(out[changed] == 0.0)
    assert changed.reshape(len(x), -1).sum(axis=1).max() <= 10 * 9


def test_rectangle_changes_one_8x8_box(lenet, digits):
    x, y = digits
    out = get_attack("rectangle", "mnist").generate(lenet, x, y)
    for xi, oi in zip(x, out, strict=True):
        rows, cols = np.nonzero((oi != xi)[0])
        assert rows.size and np.ptp(rows) < 8 and np.ptp(cols) < 8


def test_run_attack_skips_misclassified_inputs(lenet, digits):
    x, y = digits[0][:4], digits[1][:4].copy()
    y[0] = (y[0] + 1) % 10  # a label the model does not predict: not attempted, returned unchanged
    result = run_attack(lenet, "fgsm", "mnist", x, y)
    assert result.attempted.tolist() == [False, True, True, True]
    assert result.n_attempted == 3 and not result.success[0]
    np.testing.assert_array_equal(result.x_adv[0], x[0])
    assert result.n_successful == int(result.success.sum())
    assert result.params["eps"] == 0.3 and result.seconds > 0


def test_noise_counts_every_input_as_attempted_and_successful(lenet, digits):
    x, y = digits
    result = run_attack(lenet, "noise", "mnist", x, y)
    assert result.n_attempted == result.n_successful == len(x)
    assert abs(float(result.x_adv.mean()) - 0.5) < 0.02  # uniform pixels, not the digits


@pytest.mark.parametrize(
    ("name", "norm", "eps"),
    [("fgsm_8", "inf", 8 / 255), ("bim_4", "inf", 4 / 255), ("pgd_linf_8", "inf", 8 / 255),
     ("pgd_l2_0.5", "2", 0.5), ("square_8", "inf", 8 / 255)],
)  # fmt: skip
def test_field_budget_attacks_stay_in_their_balls(lenet, digits, name, norm, eps):
    """The budget in the name is the budget used: every perturbation lies in its Linf or L2 ball, and the
    seeded random starts (PGD) and random squares (Square) repeat exactly."""
    x, y = digits[0][:4], digits[1][:4]
    attack = _attack(name)
    out = attack.generate(lenet, x, y)
    d = (out - x).reshape(len(x), -1).astype(np.float64)
    size = np.abs(d).max(1) if norm == "inf" else np.linalg.norm(d, axis=1)
    assert (size <= eps + 1e-5).all() and (size > 0).any(), size
    assert np.array_equal(out, _attack(name).generate(lenet, x, y))
