"""The guarded graph (classifier + verdict as one ONNX model) against the Python pipeline, and its exports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from pathguard.models.bundle import load_bundle
from pathguard.models.components.consistency import bit_depth, median_filter
from pathguard.models.components.graph import GraphContext, OnnxGraph
from pathguard.models.data import interleaved_order, load_dataset
from pathguard.models.export import triton_config, write_triton
from pathguard.models.guarded import _fuse, guarded_model, noise_inputs
from pathguard.models.verdict.calibration import empirical_p_values
from pathguard.models.verdict.fusion import FusedVerdict
from pathguard.service.cli import main
from tests.conftest import ARTIFACTS

RESIDUAL = ARTIFACTS / "cifar10-resnet20"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


@pytest.fixture(scope="module")
def residual():
    return load_bundle(RESIDUAL, seed=0)


@pytest.fixture(scope="module")
def images():
    test = load_dataset("cifar10", "test")
    return test.x[interleaved_order(test.y)[:48]]  # every class


def test_the_guarded_graph_gives_the_pipelines_verdict_on_the_same_noise(residual, images):
    """Fed the noise the pipeline draws, the graph's raw scores equal the pipeline's to float32 rounding (the
    forward pass is onnxruntime's, not torch's), the p-values, fused scores and verdicts are the pipeline's."""
    pipe = residual.pipeline
    x = torch.from_numpy(images)
    ((name, key, copies),) = noise_inputs(residual, "all")
    assert key.startswith("noise/") and copies == 8
    noise = torch.stack([torch.randn((copies, *x.shape[1:]), generator=g) for g in pipe._generators(x)], 1)
    model = guarded_model(residual, noise="input", components="all")  # NIC (reported here) in the graph too
    out = _run(_session(model), {"input": images, name: noise.numpy()})
    res, raw = pipe.detect_with_components(x)

    np.testing.assert_allclose(out["probabilities"], res.probabilities, atol=1e-5)
    assert (out["predicted"] == res.predicted).all()
    in_graph = [k[4:] for k in out if k.startswith("raw_")]
    assert set(in_graph) == {*pipe.verdict.components, "nic", "nic_vi", "effective_path"}
    for comp in in_graph:
        scale = max(1.0, float(np.abs(raw[comp]).max()))
        if comp == "nic_vi":  # a sum over ~20 per-layer p-values: one of them may move a calibration step
            close = np.abs(out[f"raw_{comp}"] - raw[comp]) <= 1e-5 * scale
            assert close.mean() >= 0.85 and np.abs(out[f"raw_{comp}"] - raw[comp]).max() < 0.1
            continue
        np.testing.assert_allclose(out[f"raw_{comp}"], raw[comp], atol=1e-5 * scale, err_msg=comp)
        step = 1.0 / (len(pipe.calibration[comp]) + 1)
        moved = np.abs(out[f"p_{comp}"] - empirical_p_values(pipe.calibration[comp], raw[comp]))
        assert moved.max() <= step + 1e-12 and (moved > 1e-12).mean() <= 0.05, comp
    assert np.abs(out["verdict_score"] - res.score).max() < 1e-3
    same = out["is_adversarial"] == res.adversarial
    assert same.all() or (np.abs(res.score[~same] - pipe.threshold) < 1e-3).all()
    np.testing.assert_allclose(out["verdict_p_value"], res.p_value, atol=2.0 / len(pipe.verdict.fused_calib))


def test_in_graph_noise_is_fresh_per_run_or_fixed_by_a_seed(residual, images):
    fresh = _session(guarded_model(residual))
    a, b = (_run(fresh, {"input": images[:8]})["raw_noise_drop"] for _ in range(2))
    assert not np.allclose(a, b)  # a detector-aware attacker must average over the noise
    seeded = [_run(_session(guarded_model(residual, seed=7)), {"input": images[:8]}) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0]["raw_noise_drop"], seeded[1]["raw_noise_drop"])
    np.testing.assert_array_equal(seeded[0]["is_adversarial"], seeded[1]["is_adversarial"])


def test_the_in_graph_noise_copies_have_the_components_sigma():
    from pathguard.models.components.consistency import noise_transform
    from pathguard.models.guarded import _noise_source

    t = noise_transform(0.05, 8)
    g = GraphContext(17, (3, 16, 16))
    g.x = g.add_input("input", TensorProto.FLOAT, ["batch", 3, 16, 16])
    g.noise = _noise_source(g, "random", 3, {})
    assert t.graph is not None
    g.add_output(t.graph(g, g.x), "copies", TensorProto.FLOAT, [8, "batch", 3, 16, 16])
    model = helper.make_model(helper.make_graph(g.nodes, "noise", g.inputs, g.outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    x = np.full((4, 3, 16, 16), 0.5, np.float32)  # 10 sigma from either clip
    copies = _run(_session(model), {"input": x})["copies"]
    assert copies.shape == (8, 4, 3, 16, 16)
    change = copies - x[None]
    assert abs(change.mean()) < 0.002 and abs(change.std() - 0.05) < 0.001  # 24,576 draws
    assert not np.allclose(copies[0], copies[1])  # every copy and image its own noise
    clipped = _run(_session(model), {"input": np.ones((1, 3, 16, 16), np.float32)})["copies"]
    assert clipped.max() == 1.0 and (clipped < 1.0).mean() > 0.4  # clipped into [0, 1] as the pipeline does


def test_the_graph_holds_the_verdicts_components_unless_asked_for_all(residual):
    verdict = {o.name for o in guarded_model(residual).graph.output if o.name.startswith("raw_")}
    assert verdict == {f"raw_{k}" for k in residual.pipeline.verdict.components}  # NIC is only reported here
    with pytest.raises(ValueError, match="components"):
        guarded_model(residual, components="some")


@pytest.mark.parametrize("rule", ["fisher", "tippett", "harmonic", "tippett(fisher)", "harmonic(fisher)"])
def test_every_fusion_rule_in_the_graph_equals_the_verdicts(rule):
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    families = {"a": "layer", "b": "layer", "c": "consistency", "d": "consistency"}
    p = np.concatenate([rng.uniform(0.0002, 1.0, (60, 4)), [[1.0, 1.0, 1.0, 1.0], [0.0002] * 4]])
    verdict = FusedVerdict({k: np.zeros(3) for k in names}, np.zeros(3), 0.05, rule, families)
    g = OnnxGraph(17)
    cols = [g.add_input(k, TensorProto.DOUBLE, ["batch"]) for k in names]
    g.add_output(_fuse(g, cols, names, rule, families), "score", TensorProto.DOUBLE, ["batch"])
    model = helper.make_model(helper.make_graph(g.nodes, "fuse", g.inputs, g.outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    out = _run(_session(model), {k: p[:, j].copy() for j, k in enumerate(names)})["score"]
    np.testing.assert_allclose(out, verdict.combine(p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("channels", "k"), [(1, 2), (1, 3), (3, 2)])
def test_squeezers_in_the_graph_are_the_torch_ones_bit_for_bit(channels, k):
    x = torch.rand((4, channels, 9, 7), generator=torch.Generator().manual_seed(k))
    x[0, 0, :3, :3] = 0.5  # ties inside a window
    from pathguard.models.components.consistency import median_filter_graph

    g = GraphContext(17, (channels, 9, 7))
    g.x = g.add_input("input", TensorProto.FLOAT, ["batch", channels, 9, 7])
    g.add_output(median_filter_graph(g, g.x, k), "median", TensorProto.FLOAT, ["batch", channels, 9, 7])
    levels = g.const(np.float32(2**3 - 1))
    g.add_output(g.op("Div", g.op("Round", g.op("Mul", g.x, levels)), levels), "bits", TensorProto.FLOAT,
                 ["batch", channels, 9, 7])  # fmt: skip
    model = helper.make_model(helper.make_graph(g.nodes, "sq", g.inputs, g.outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    out = _run(_session(model), {"input": x.numpy()})
    np.testing.assert_array_equal(out["median"], median_filter(x, k).numpy())
    np.testing.assert_array_equal(out["bits"], bit_depth(x, 3).numpy())


def test_the_triton_entry_parses_names_every_output_and_runs(residual, images, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    assert main(["export", str(RESIDUAL), "--triton", str(tmp_path), "--name", "guarded", "--threads", "2"]) == 0
    entry = tmp_path / "guarded"
    config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    model = onnx.load(str(entry / "1" / "model.onnx"))
    assert config.name == "guarded" and config.backend == "onnxruntime" and config.max_batch_size == 64
    assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == [3, 32, 32]
    assert [o.name for o in config.output] == [o.name for o in model.graph.output]
    kinds = {o.name: (model_config_pb2.DataType.Name(o.data_type), list(o.dims), list(o.reshape.shape))
             for o in config.output}  # fmt: skip
    assert kinds["logits"] == ("TYPE_FP32", [10], [])
    assert kinds["is_adversarial"] == ("TYPE_BOOL", [1], []) and config.output[-1].HasField("reshape")
    assert kinds["p_margin"] == ("TYPE_FP64", [1], [])
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert config.HasField("dynamic_batching")
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    gpu = text_format.Parse(triton_config(model, "g", gpu=True), model_config_pb2.ModelConfig())
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(gpu.instance_group[0].kind) == "KIND_GPU"
    meta = json.loads((entry / "pathguard.json").read_text())
    assert meta["bundle_sha256"] == residual.sha256 and meta["verdict"]["threshold"] == residual.pipeline.threshold

    out = _run(_session(model), {"input": images})
    res = residual.pipeline.detect(images)  # other noise: the verdicts agree on most images
    assert (out["predicted"] == res.predicted).all()
    assert (out["is_adversarial"] == res.adversarial).mean() >= 0.9
    assert out["is_adversarial"].dtype == np.bool_ and out["verdict_score"].shape == (len(images),)


def test_the_config_refuses_what_triton_cannot_declare(residual):
    model = guarded_model(residual)
    with pytest.raises(ValueError, match="max_batch_size"):
        triton_config(model, "m", max_batch_size=0)
    with pytest.raises(ValueError, match="model name"):
        write_triton(residual, "/nonexistent", name="../escape")


def test_export_without_a_target_fails_cleanly():
    assert main(["export", str(RESIDUAL)]) == 2  # a bundle outside the graph: tests/test_ep_ingraph.py


@pytest.mark.parametrize("pool", ["mean", "mean_std"])
def test_the_class_gaussians_in_the_graph_give_their_served_score(lenet, mnist_test, pool):
    """The class Gaussians' in-graph form (taps and logits read as graph inputs here) against their served score
    on the committed LeNet-5: a 4-D tap pooled per channel, a flat one and the logits."""
    from pathguard.models.components.mahalanobis import GaussianComponent
    from pathguard.models.mahalanobis import ClassGaussian

    layers = ["conv2", "fc1", "logits"]
    x = torch.from_numpy(mnist_test.x[:700])
    with torch.no_grad():
        logits, taps = lenet.forward_with_taps(x)
    acts = {n: logits if n == "logits" else taps[n] for n in layers}
    gaussian = ClassGaussian(layers, pool=pool).fit([({n: a[:500] for n, a in acts.items()}, mnist_test.y[:500])], 10)
    gaussian.calibrate(gaussian.layer_scores({n: a[500:600] for n, a in acts.items()}))
    comp = GaussianComponent(gaussian)
    test = {n: a[600:] for n, a in acts.items()}

    g = GraphContext(17, (1, 28, 28))
    g.shapes = {n: tuple(a.shape[1:]) for n, a in acts.items()}
    feeds = {n: a.numpy() for n, a in test.items()}
    names = {n: g.add_input(n, TensorProto.FLOAT, ["batch", *a.shape[1:]]) for n, a in test.items()}
    g.logits32, g.tap = names["logits"], lambda name: names[name]
    g.add_output(comp.graph(g), "score", TensorProto.DOUBLE, ["batch"])
    model = helper.make_model(helper.make_graph(g.nodes, "gauss", g.inputs, g.outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    out = _run(_session(model), feeds)["score"]
    served = gaussian.score(test)
    assert np.isfinite(served).all() and served.std() > 0
    close = np.abs(out - served) <= 1e-6 * np.maximum(1.0, np.abs(served))
    assert close.mean() >= 0.95, np.abs(out - served).max()  # else a per-layer p-value moved one calibration step


@pytest.fixture(scope="module")
def channel_bundle(tmp_path_factory):
    """A tiny MNIST bundle whose verdict fuses channel-level Effective Path, NIC and the noise response: every
    fused component has an in-graph form."""
    from pathguard.models.builder import BuildConfig, build_bundle
    from tests.conftest import MNIST_CLASSIFIER, TINY_NIC

    out = tmp_path_factory.mktemp("bundles") / "tiny-channels"
    cfg = BuildConfig(name="tiny-channels", n_train=3000, n_calib=1200, target_fpr=0.1, nic=TINY_NIC,
                      fusion=["ep_channels", "nic", "nic_vi", "noise_drop"], rule="fisher",
                      components={"ep_channels": {"n_fit": 1500, "n_score": 400}})  # fmt: skip
    build_bundle("mnist", MNIST_CLASSIFIER, out, cfg)
    return out


def test_a_bundle_fusing_channel_effective_path_exports_whole(channel_bundle, mnist_test, tmp_path):
    bundle = load_bundle(channel_bundle, seed=0)
    pipe = bundle.pipeline
    x = torch.from_numpy(mnist_test.x[:40])
    ((name, _, copies),) = noise_inputs(bundle)
    noise = torch.stack([torch.randn((copies, *x.shape[1:]), generator=g) for g in pipe._generators(x)], 1)
    out = _run(_session(guarded_model(bundle, noise="input")), {"input": x.numpy(), name: noise.numpy()})
    res, raw = pipe.detect_with_components(x)
    np.testing.assert_allclose(out["raw_ep_channels"], raw["ep_channels"], atol=1e-5)
    np.testing.assert_allclose(out["raw_noise_drop"], raw["noise_drop"], atol=1e-4)
    # NIC's value invariants may move a per-layer p-value by one step of this tiny bundle's 600 calibration images
    moved = np.abs(out["verdict_score"] - res.score)
    assert (moved > 1e-6).mean() <= 0.1 and moved.max() < 0.05
    same = out["is_adversarial"] == res.adversarial
    assert same.all() or (np.abs(res.score[~same] - pipe.threshold) < 0.05).all()
    fields = res.row(0)["ep_channels"]  # served: its per-layer similarities in the response
    assert set(fields) == {"layers", "rank1_similarity", "rank2_similarity", "score"}
    assert len(fields["rank1_similarity"]) == len(fields["layers"]) == 5
    assert main(["export", str(channel_bundle), "--triton", str(tmp_path)]) == 0
