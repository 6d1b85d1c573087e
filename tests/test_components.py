"""The component registry and the prediction-consistency family.

- a toy component registered here is built, saved, loaded, served and fused without touching another module;
- each consistency statistic on a tiny net whose answer is known (an input on the decision boundary flips about
  half its noise copies, a far one none; the margin of a boundary input is 0);
- the transformed copies of every consistency component run in one forward pass, equal to separate passes;
- p-values of held-out benign inputs are uniform; a seeded pipeline is reproducible, an unseeded one is not;
- the fusion rules (Tippett, harmonic, per family) on known values; the bundles built before the registry load.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pathguard.models.builder import BuildConfig, build_bundle
from pathguard.models.bundle import DetectionPipeline, load_bundle
from pathguard.models.components import REGISTRY, BuildContext, Component, FileReader, Observation, register
from pathguard.models.components.base import json_blob
from pathguard.models.components.consistency import (
    MarginComponent,
    NoiseFlipComponent,
    SqueezeComponent,
    bit_depth,
    copies_logits,
    median_filter,
    noise_statistics,
    noise_transform,
)
from pathguard.models.data import load_dataset
from pathguard.models.verdict import FusedVerdict, empirical_p_values, fisher_score
from pathguard.models.verdict.fusion import combine_p_values, parse_rule
from pathguard.service.app import create_app
from pathguard.service.settings import Settings

from .conftest import ARTIFACTS, MNIST_CLASSIFIER, TINY_NIC


class Brightness(Component):
    """A toy component: how far an image's mean brightness is from the benign sample's (two-sided)."""

    name = "toy_brightness"
    files = ("toy_brightness.json",)
    params = ("scale",)

    def __init__(self, mean: float, scale: float) -> None:
        self.mean, self.scale = mean, scale

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> Brightness:
        x, _ = ctx.sample()
        return cls(float(x.mean()), float(params.get("scale", 1.0)))

    def to_files(self) -> dict[str, bytes]:
        return {self.files[0]: json_blob({"mean": self.mean, "scale": self.scale})}

    @classmethod
    def from_files(cls, read: FileReader, model: Any, built: Mapping[str, Component], entry: Mapping[str, Any]):
        cfg = json.loads(read(cls.files[0]))
        return cls(cfg["mean"], cfg["scale"])

    def raw(self, obs: Observation) -> np.ndarray:
        return self.scale * np.abs(obs.x.double().mean(dim=(1, 2, 3)).numpy() - self.mean)

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        return {"brightness": obs.x.double().mean(dim=(1, 2, 3)).numpy(), "score": violation}


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    """A tiny MNIST bundle fusing EP, NIC, the toy component and three consistency components."""
    register(Brightness)
    out = tmp_path_factory.mktemp("bundles") / "toy"
    cfg = BuildConfig(
        name="toy",
        n_train=4000,
        n_calib=1500,
        target_fpr=0.1,
        nic=TINY_NIC,
        fusion=["effective_path", "nic", "toy_brightness", "margin", "noise_flip", "squeeze"],
        rule="tippett(fisher)",
        components={"toy_brightness": {"scale": 2.0}, "noise_flip": {"copies": 4}},
    )
    build_bundle("mnist", MNIST_CLASSIFIER, out, cfg)
    yield out
    REGISTRY.pop(Brightness.name, None)


def test_a_registered_toy_component_is_built_saved_loaded_and_fused(toy_bundle, mnist_test):
    bundle = load_bundle(toy_bundle, seed=0)
    m = bundle.manifest
    assert m["verdict"]["components"] == ["effective_path", "nic", "toy_brightness", "margin", "noise_flip", "squeeze"]
    assert m["verdict"]["rule"] == "tippett(fisher)"
    assert m["components"]["toy_brightness"]["family"] == "layer"
    assert m["components"]["noise_flip"]["family"] == "consistency" and m["components"]["noise_flip"]["copies"] == 4
    assert "toy_brightness.json" in m["files"] and "noise_flip.json" in m["files"] and "squeeze.json" in m["files"]
    toy = bundle.pipeline.components["toy_brightness"]
    assert isinstance(toy, Brightness) and toy.scale == 2.0 and 0.05 < toy.mean < 0.3  # MNIST's mean brightness
    # fused: an image far brighter than any digit is flagged through the toy component alone
    x = mnist_test.x[:16].copy()
    res = bundle.pipeline.detect(x)
    bright = np.clip(x + 0.6, 0, 1)
    res_bright = bundle.pipeline.detect(bright)
    assert res_bright.adversarial.all() and res.adversarial.mean() < 0.5
    assert (res_bright.fields["toy_brightness"]["score"] > 0.99).all()
    row = res.row(0)
    assert set(row) >= {"effective_path", "nic", "toy_brightness", "margin", "noise_flip", "squeeze", "verdict"}
    assert row["toy_brightness"]["brightness"] == pytest.approx(float(x[0].mean()), abs=1e-6)


def test_the_toy_component_is_served(toy_bundle, mnist_test, tmp_path):
    png = io.BytesIO()
    Image.fromarray((mnist_test.x[0, 0] * 255).astype(np.uint8)).save(png, format="PNG")
    for detect_graph in ("auto", "off"):  # on the guarded graph (the toy beside it), and on the Python pipeline
        settings = Settings(
            bundle=toy_bundle,
            spool_path=tmp_path / "s.jsonl",
            warmup_rounds=0,
            redis_url=None,
            detect_graph=detect_graph,
        )
        with TestClient(create_app(settings)) as client:
            info = client.get("/v1/model").json()
            r = client.post("/v1/detect", content=png.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["toy_brightness"]) == {"brightness", "score"} and 0 <= body["toy_brightness"]["score"] <= 1
        assert set(body["noise_flip"]) == {"flip_share", "score"} and set(body["margin"]) == {"margin", "score"}
        if detect_graph == "auto":
            assert info["detection"] == "graph" and "toy_brightness" not in info["graph_components"]
            assert {"noise_flip", "margin"} <= set(info["graph_components"])
        else:
            assert "consistency" in body["timings_ms"]  # the copies' forward pass is timed


def test_unknown_components_and_parameters_are_refused():
    with pytest.raises(ValueError, match="fusion must list distinct components"):
        BuildConfig(name="x", fusion=["effective_path", "no_such_thing"])
    with pytest.raises(ValueError, match=r"unknown noise_flip parameter\(s\) \['sigmas'\]"):
        BuildConfig(name="x", fusion=["noise_flip"], components={"noise_flip": {"sigmas": 1}})
    with pytest.raises(ValueError, match="fusion rule"):
        BuildConfig(name="x", rule="fisher(")


# ---------------------------------------------------------------------------------------- known answers, tiny net


class _Linear(torch.nn.Module):
    """Two classes on 4-pixel images: logits (s, -s) with s = sum(x) - 2, so the boundary is sum(x) = 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True) - 2.0
        return torch.cat([s, -s], 1)


def _obs(x: torch.Tensor, components: dict[str, Component], seed: int = 0, calls: list | None = None) -> Observation:
    net = _Linear()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(len(batch))
        return net(batch)

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(x))]
    return Observation(x, net(x), {}, forward, gens, components)


def test_noise_flips_half_the_copies_on_the_boundary_and_none_far_from_it():
    x = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]], [[[0.95, 0.95], [0.95, 0.95]]]])  # sum 2 (boundary), sum 3.8
    comp = NoiseFlipComponent(sigma=0.05, copies=400)
    obs = _obs(x, {"noise_flip": comp})
    flips = comp.raw(obs)
    assert abs(flips[0] - 0.5) < 0.1  # on the boundary: about half flip
    assert flips[1] == 0.0  # 1.8 logit units from it at sigma 0.05 * 2: never
    stats = obs.memo[comp.transforms()[0].key + "/stats"]
    assert stats["logit_drop"][1] == pytest.approx(0.0, abs=0.05)  # noise averages out on a linear net
    assert MarginComponent().raw(obs)[0] == pytest.approx(0.0) and MarginComponent().raw(obs)[1] == pytest.approx(-3.6)


def test_every_consistency_copy_runs_in_one_forward_pass_equal_to_separate_passes():
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    noise, squeeze = NoiseFlipComponent(sigma=0.1, copies=5), SqueezeComponent(bits=1, median=[2])
    calls: list[int] = []
    obs = _obs(x, {"noise_flip": noise, "squeeze": squeeze}, seed=7, calls=calls)
    noise.raw(obs), squeeze.raw(obs)
    assert calls == [3 * (1 + 5 + 1 + 1)]  # originals + 5 noise copies + 2 squeezed copies, once
    # the same copies run one transform at a time, from the same per-input generators (keys sorted: bits, median,
    # noise)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(3)]
    keys = sorted(t.key for c in (noise, squeeze) for t in c.transforms())
    transforms = {t.key: t for c in (noise, squeeze) for t in c.transforms()}
    net = _Linear()
    for key in keys:
        t = transforms[key]
        separate = net(t.apply(x, gens).reshape(-1, 1, 2, 2)).double().reshape(t.copies, 3, -1)
        torch.testing.assert_close(copies_logits(obs, key, [])[1], separate)


def test_squeezers_have_known_outputs():
    x = torch.tensor([[[[0.1, 0.2, 0.9], [0.3, 0.8, 0.7], [0.0, 1.0, 0.6]]]])
    assert bit_depth(x, 1).flatten().tolist() == [0, 0, 1, 0, 1, 1, 0, 1, 1]
    three = median_filter(x, 3)
    assert three[0, 0, 1, 1].item() == pytest.approx(0.6)  # median of all nine values
    two = median_filter(x, 2)
    assert two[0, 0, 0, 0].item() == pytest.approx((0.2 + 0.3) / 2)  # window 0.1 0.2 0.3 0.8: mean of the middle two
    flat = torch.full((1, 3, 5, 5), 0.25)
    torch.testing.assert_close(median_filter(flat, 2), flat)


def test_noise_statistics_of_identical_copies_are_zero():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    stats = noise_statistics(logits, logits.unsqueeze(0).repeat(4, 1, 1))
    assert all(np.allclose(v, 0) for v in stats.values())
    t = noise_transform(0.1, 3)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    assert t.apply(torch.zeros(2, 1, 2, 2), gens).shape == (3, 2, 1, 2, 2)


# -------------------------------------------------------------------------------------- calibration and seeding


def test_benign_p_values_are_uniform_and_a_seed_makes_requests_reproducible(toy_bundle, mnist_test):
    pipe = load_bundle(toy_bundle, seed=3).pipeline
    # training images outside the bundle's 4,000-image subset: exchangeable with its calibration images
    held = load_dataset("mnist", "train").x[np.random.default_rng(0).permutation(60000)[4000:5000]]
    raw = pipe.raw_components(held)
    for name in ("margin", "squeeze", "toy_brightness"):
        p = empirical_p_values(pipe.calibration[name], raw[name])
        for a in (0.1, 0.25, 0.5):
            assert abs(float((p <= a).mean()) - a) < 0.06, (name, a)
    again = load_bundle(toy_bundle, seed=3).pipeline.raw_components(held[:200])
    np.testing.assert_array_equal(again["noise_flip"], raw["noise_flip"][:200])
    # seeded, an input's noise follows its pixels: the same scores alone as in any batch
    xt = torch.from_numpy(held[:8])
    logits, taps = pipe.classifier.forward_with_taps(xt)
    together = pipe.components["noise_flip"].stats(pipe.observe(xt, logits, taps))["softmax_l1"]
    alone = [pipe.components["noise_flip"].stats(pipe.observe(xt[i : i + 1], logits[i : i + 1], {}))["softmax_l1"][0]
             for i in (0, 5)]  # fmt: skip
    np.testing.assert_allclose(alone, together[[0, 5]], rtol=1e-5)  # float32 convolutions of other batch sizes
    unseeded = load_bundle(toy_bundle).pipeline
    xt = torch.from_numpy(held[:50])
    logits, taps = unseeded.classifier.forward_with_taps(xt)
    noise = unseeded.components["noise_flip"]
    a, b = (noise.stats(unseeded.observe(xt, logits, taps))["softmax_l1"] for _ in range(2))
    assert not np.array_equal(a, b)  # unseeded: fresh noise per batch


def test_a_probe_begun_before_the_forward_pass_gives_the_same_detection(toy_bundle, mnist_test):
    """The service starts the consistency copies' pass before the classifier's forward pass (it needs the inputs
    only); seeded, the result equals the one whose probe runs inside ``finish``."""
    pipe = load_bundle(toy_bundle, seed=5).pipeline
    xt = torch.from_numpy(mnist_test.x[:6])
    started = pipe.start_probe(xt)
    assert started is not None and len(started.generators) == 6
    logits, taps = pipe.classifier.forward_with_taps(xt)
    early = pipe.finish(xt, logits, taps, probe=started)
    late = pipe.finish(xt, logits, taps)
    for name in ("noise_flip", "squeeze", "margin"):
        np.testing.assert_array_equal(early.raw[name], late.raw[name])
    np.testing.assert_array_equal(early.score, late.score)
    assert "consistency" in early.timings_s
    # the margin reads the logits: a pipeline whose only consistency component is the margin starts no probe
    only_margin = {k: c for k, c in pipe.components.items() if k not in ("noise_flip", "squeeze")}
    plain = DetectionPipeline(pipe.classifier, only_margin, None, 0.1, seed=0)
    assert plain.start_probe(xt) is None
    obs = plain.observe(xt, logits.detach(), taps)
    plain.raw(obs)
    assert "consistency" not in obs.memo and "consistency" not in obs.timings_s


# ------------------------------------------------------------------------------------------------- fusion rules


def test_fusion_rules_on_known_values():
    p = np.array([[0.001, 0.9, 0.9], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(combine_p_values(p, "tippett"), 1 - (1 - p.min(1)) ** 3)
    np.testing.assert_allclose(combine_p_values(p, "harmonic"), 3 / (1 / p).sum(1))
    np.testing.assert_allclose(1 - combine_p_values(p, "fisher"), fisher_score(p))
    assert parse_rule("tippett(fisher)") == ("tippett", "fisher") and parse_rule("harmonic") == ("harmonic", None)
    calib = {k: np.linspace(0, 1, 101) for k in ("a", "b", "c")}
    fam = {"a": "layer", "b": "layer", "c": "consistency"}
    v = FusedVerdict.fit(calib, calib, 0.1, rule="tippett(fisher)", families=fam)
    # one certain component is not drowned by two typical ones under Tippett; Fisher dilutes it
    certain = {"a": np.array([0.5]), "b": np.array([0.5]), "c": np.array([2.0])}
    fisher = FusedVerdict.fit(calib, calib, 0.1)
    assert v.fuse(certain)[0] > v.threshold_for(0.1)
    assert 1 - v.fuse(certain)[0] < 1 - fisher.fuse(certain)[0]


def test_bundles_built_before_the_registry_load_with_their_components():
    """The CIFAR-10 CNN bundle predates the registry (no ``components`` in its manifest)."""
    bundle = load_bundle(ARTIFACTS / "cifar10-cnn")
    assert "components" not in bundle.manifest and "rule" not in bundle.manifest["verdict"]
    pipe = bundle.pipeline
    assert list(pipe.components) == ["effective_path", "nic", "nic_vi"]
    assert pipe.verdict is not None and pipe.verdict.rule == "fisher"
    # the MNIST bundle is built with the registry: its manifest lists its components and rule
    mnist = load_bundle(ARTIFACTS / "mnist-lenet5").pipeline
    assert list(mnist.components) == ["effective_path", "nic", "nic_vi", "noise_drop", "squeeze"]
    assert mnist.verdict is not None and mnist.verdict.components == list(mnist.components)
