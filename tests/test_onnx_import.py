"""ONNX classifiers imported as the layer graph the detectors walk: random-weight ResNet-style, MobileNet-style and
LeNet-5 nets exported from torch, compared with onnxruntime on the file and with the loop reference of
Effective Path; unsupported operators and broken files are refused with the node named."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from pathguard.models.effective_path import extract_effective_paths
from pathguard.models.errors import UnsupportedModelError
from pathguard.models.networks import Residual, TappedSequential, import_onnx
from tests.test_effective_path import ref_extract


class BasicBlock(nn.Module):
    """He et al.'s basic block with BN and an optional projection shortcut, written as torch users write it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.proj is None else self.proj(x)))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


class TinyMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def dw_pw(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(),
            ]

        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(), *dw_pw(8, 16, 1), *dw_pw(16, 16, 2)
        )
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so the folding is exercised
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _export(model: nn.Module, shape: tuple[int, ...], softmax: bool = False) -> bytes:
    wrapped = nn.Sequential(model, nn.Softmax(dim=1)) if softmax else model
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped.eval(), (torch.zeros(1, *shape),), buf, input_names=["input"],
                          output_names=["out"], dynamic_axes={"input": {0: "n"}, "out": {0: "n"}},
                          opset_version=17, dynamo=False)  # fmt: skip
    return buf.getvalue()


def _ort(data: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


NETS = {
    "resnet": (lambda: _randomized(TinyResNet(), 1), (3, 16, 16)),
    "mobilenet": (lambda: _randomized(TinyMobileNet(), 2), (3, 16, 16)),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_imported_forward_equals_onnxruntime(name):
    make, shape = NETS[name]
    data = _export(make(), shape)
    model = import_onnx(data)
    assert isinstance(model, TappedSequential) and model.config.input_shape == shape
    x = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, _ort(data, x), atol=1e-4, rtol=1e-4)
    if name == "resnet":
        blocks = [m for m in model.modules() if isinstance(m, Residual)]
        assert len(blocks) == 2 and blocks[0].shortcut is None and blocks[1].shortcut is not None
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # folded
    if name == "mobilenet":
        assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
        assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_softmax_output_is_stripped_to_logits():
    make, shape = NETS["resnet"]
    net = make()
    model = import_onnx(_export(net, shape, softmax=True))
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), net(x).numpy(), atol=1e-4)


def test_bundled_lenet5_goes_through_the_same_path(lenet, mnist_test):
    logits_only = nn.Sequential(*lenet.children())
    data = _export(logits_only, (1, 28, 28))
    model = import_onnx(data)
    x = mnist_test.x[:16].astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), lenet(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert [n for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))].__len__() == 5


@pytest.mark.parametrize(("name", "rank"), [("resnet", 1), ("resnet", 2), ("mobilenet", 1)])
def test_effective_path_on_imported_graph_matches_loop_reference(name, rank):
    make, shape = NETS[name]
    model = import_onnx(_export(make(), shape))
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(3))
    got = extract_effective_paths(model, x, theta=0.5, rank=rank)
    for i in range(2):
        ref = ref_extract(model, x[i : i + 1], 0.5, rank)
        assert set(ref) <= set(got[i])
        for layer, ids in got[i].items():
            assert ids.tolist() == ref.get(layer, []), (name, rank, i, layer)


def test_taps_follow_blocks_and_activations():
    make, shape = NETS["resnet"]
    model = import_onnx(_export(make(), shape))
    logits, taps = model.forward_with_taps(torch.rand(1, *shape))
    block_names = [n for n, m in model.named_children() if isinstance(m, Residual)]
    assert set(block_names) <= set(taps)
    assert all((t >= 0).all() for n, t in taps.items() if n in block_names)  # post-ReLU
    assert logits.shape == (1, 10)


def _graph_with(node: onnx.NodeProto) -> bytes:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], np.ones(18, np.float32).tolist())
    conv = helper.make_node("Conv", ["input", "w"], ["c"], name="conv0")
    flat = helper.make_node("Flatten", ["g"], ["out"], name="flat")
    graph = helper.make_graph(
        [conv, node, flat],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 18])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_unsupported_operator_is_named_with_its_node():
    data = _graph_with(helper.make_node("Sigmoid", ["c"], ["g"], name="gate"))
    with pytest.raises(UnsupportedModelError, match=r"Sigmoid \(node 'gate'\); supported: Add, AveragePool"):
        import_onnx(data)


def test_malformed_and_old_files_are_refused():
    with pytest.raises(UnsupportedModelError, match="not a readable ONNX model"):
        import_onnx(b"\x08\x07garbage")
    model = onnx.load_from_string(_graph_with(helper.make_node("Relu", ["c"], ["g"], name="r")))
    model.opset_import[0].version = 11
    with pytest.raises(UnsupportedModelError, match="opset 11"):
        import_onnx(model.SerializeToString())


@pytest.mark.parametrize("name", [*sorted(NETS), "lenet"])
def test_served_onnx_is_the_users_graph_with_logits_and_taps(name, lenet):
    """The user's own file, with taps as outputs: equal to the imported graph, splittable at the checked taps."""
    from pathguard.models.networks import served_onnx
    from pathguard.service.runtime import OnnxEngine

    make, shape = NETS[name] if name != "lenet" else (lambda: nn.Sequential(*lenet.children()), (1, 28, 28))
    data = _export(make(), shape, softmax=name == "resnet")
    model = import_onnx(data)
    served = served_onnx(data)
    x = np.random.default_rng(5).random((3, *shape), dtype=np.float32)
    session = ort.InferenceSession(served, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["logits", *model.tap_names]
    with torch.no_grad():
        logits, taps = model.forward_with_taps(torch.from_numpy(x))
    outs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    np.testing.assert_allclose(outs["logits"], logits.numpy(), atol=1e-4, rtol=1e-4)
    for tap in model.tap_names:
        np.testing.assert_allclose(outs[tap], taps[tap].numpy(), atol=1e-4, rtol=1e-4)
    engine = OnnxEngine(served, model.tap_names[:-1])
    assert len(engine.stages) > 1  # split at the checked taps, not one full pass
    seen: list[str] = []
    got_logits, got_taps = engine.forward(x, on_tap=lambda n, _: seen.append(n))
    np.testing.assert_allclose(got_logits.numpy(), logits.numpy(), atol=1e-4, rtol=1e-4)
    assert seen == model.tap_names and set(got_taps) == set(model.tap_names)


# --------------------------------------------------------------------------------------------------
# Hand-built graphs as other frameworks export them: asymmetric pads, auto_pad SAME, ceil-mode average pools
# --------------------------------------------------------------------------------------------------

_CONV1 = ("Conv", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})
_RELU = ("Relu", {})
_AVG = {"kernel_shape": [3, 3], "strides": [2, 2]}

# name -> (layers after the input, input shape, (module type, pads4) expected for the layer under test: the last
# Conv/pool of the list)
PADDED = {
    "conv_pads_0011_s2": (
        [("Conv", {"kernel_shape": [3, 3], "pads": [0, 0, 1, 1], "strides": [2, 2]}), _RELU],
        (2, 10, 10), ("PaddedConv2d", (0, 0, 1, 1)),
    ),
    "conv_same_upper_s2_then_lower": (
        [("Conv", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}), _RELU,
         ("Conv", {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}), _RELU],
        (2, 10, 10), ("PaddedConv2d", (1, 1, 0, 0)),
    ),
    "conv_same_lower_s2": (
        [_CONV1, _RELU, ("Conv", {"kernel_shape": [3, 3], "auto_pad": "SAME_LOWER", "strides": [2, 2]}), _RELU],
        (2, 10, 10), ("PaddedConv2d", (1, 1, 0, 0)),
    ),
    "maxpool_pads": (
        [_CONV1, ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0]}), _RELU],
        (2, 10, 10), ("PaddedMaxPool2d", (0, 1, 1, 0)),
    ),
    "maxpool_pads_ceil": (  # 10 + 1 -> 6: the last window is 1 input and 1 position past the pads
        [_CONV1, ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 0, 0], "ceil_mode": 1}), _RELU],
        (2, 10, 10), ("PaddedMaxPool2d", (1, 1, 0, 0)),
    ),
    "maxpool_same_upper": (
        [_CONV1, ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}), _RELU],
        (2, 9, 9), ("PaddedMaxPool2d", (0, 0, 1, 1)),
    ),
    "avgpool_pads_cip0": (
        [_CONV1, _RELU, ("AveragePool", {**_AVG, "pads": [1, 0, 0, 1], "count_include_pad": 0})],
        (2, 10, 10), ("PaddedAvgPool2d", (1, 0, 0, 1)),
    ),
    "avgpool_pads_cip1": (
        [_CONV1, _RELU, ("AveragePool", {**_AVG, "pads": [1, 0, 0, 1], "count_include_pad": 1})],
        (2, 10, 10), ("PaddedAvgPool2d", (1, 0, 0, 1)),
    ),
    "avgpool_ceil_cip0": (  # 10 -> 5: the last window holds 2 of its 3 rows and columns
        [_CONV1, _RELU, ("AveragePool", {**_AVG, "ceil_mode": 1})],
        (2, 10, 10), ("AvgPool2d", (0, 0, 0, 0)),
    ),
    "avgpool_ceil_pads_cip1": (  # 10 + 2 -> 6: the last window is 1 input, 1 pad and 1 position past the pads
        [_CONV1, _RELU, ("AveragePool", {**_AVG, "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1})],
        (2, 10, 10), ("AvgPool2d", (1, 1, 1, 1)),
    ),
    "avgpool_ceil_pads_asym_cip0": (
        [_CONV1, _RELU, ("AveragePool", {**_AVG, "pads": [0, 1, 1, 0], "ceil_mode": 1, "count_include_pad": 0})],
        (2, 10, 10), ("PaddedAvgPool2d", (0, 1, 1, 0)),
    ),
    "avgpool_ceil_pads_asym_cip1": (
        [_CONV1, _RELU, ("AveragePool", {**_AVG, "pads": [0, 1, 1, 0], "ceil_mode": 1, "count_include_pad": 1})],
        (2, 10, 10), ("PaddedAvgPool2d", (0, 1, 1, 0)),
    ),
}  # fmt: skip


def _onnx_chain(layers: list[tuple[str, dict]], shape: tuple[int, int, int], seed: int = 0) -> bytes:
    """input -> ``layers`` (each Conv with 3 output channels and random weights) -> Flatten -> Gemm (5 logits)."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    tensor, channels = "input", shape[0]

    def const(name: str, value: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
        return name

    for k, (op, attrs) in enumerate(layers):
        inputs = [tensor]
        if op == "Conv":
            kh, kw = attrs["kernel_shape"]
            inputs += [const(f"w{k}", rng.normal(0, 0.5, (3, channels, kh, kw))), const(f"b{k}", rng.normal(0, 0.1, 3))]
            channels = 3
        nodes.append(helper.make_node(op, inputs, [f"t{k}"], name=f"{op.lower()}{k}", **attrs))
        tensor = f"t{k}"
    nodes.append(helper.make_node("Flatten", [tensor], ["flat"], name="flatten"))

    def model(output: str) -> bytes:
        source = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", *shape])
        graph = helper.make_graph(
            nodes, "g", [source], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    features = int(_ort(model("flat"), np.zeros((1, *shape), np.float32)).shape[1])  # as onnxruntime computes it
    fc = [const("fc_w", rng.normal(0, 0.3, (5, features))), const("fc_b", rng.normal(0, 0.1, 5))]
    nodes.append(helper.make_node("Gemm", ["flat", *fc], ["logits"], name="fc", transB=1))
    return model("logits")


def _padded_case(name: str) -> tuple[TappedSequential, tuple[int, int, int], bytes]:
    layers, shape, _ = PADDED[name]
    data = _onnx_chain(layers, shape, seed=sorted(PADDED).index(name))
    return import_onnx(data), shape, data


@pytest.mark.parametrize("name", sorted(PADDED))
def test_four_sided_pads_and_ceil_pools_forward_equals_onnxruntime(name):
    from pathguard.models.networks.padding import explicit_pads

    model, shape, data = _padded_case(name)
    kind, pads = PADDED[name][2]
    layer = [m for m in model.children() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))][-1]
    assert type(layer).__name__ == kind and explicit_pads(layer) == pads
    x = np.random.default_rng(1).random((4, *shape), dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, _ort(data, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(PADDED))
def test_four_sided_pads_and_ceil_pools_effective_path_matches_loop_reference(name):
    from pathguard.models.effective_path import EffectivePathExtractor

    model, shape, _ = _padded_case(name)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(4))
    full = EffectivePathExtractor(model, theta=0.5, input_shape=shape, fast_path=False).extract(x, ranks=(1, 2))
    tail = EffectivePathExtractor(model, theta=0.5, input_shape=shape, fast_path=False, last_k=2)
    last = tail.extract(x, ranks=(1, 2))
    assert last.layers == full.layers[-2:]
    total = 0
    for i in range(len(x)):
        for r in (1, 2):
            ref = ref_extract(model, x[i : i + 1], 0.5, r)
            assert set(ref) <= set(full.layers)
            for layer in full.layers:
                assert full.image(r, i)[layer].tolist() == ref.get(layer, []), (name, r, i, layer)
                total += len(ref.get(layer, []))
            for layer in last.layers:  # the partial walk is the tail of the full one
                assert last.image(r, i)[layer].tolist() == ref.get(layer, []), (name, r, i, layer)
    assert total > 0


@pytest.mark.parametrize("name", sorted(PADDED))
def test_four_sided_pads_and_ceil_pools_fast_walk_equals_torch_walk(name):
    from tests.test_ep_fastpath import _pair, _same

    model, shape, _ = _padded_case(name)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(6))
    for last_k in (None, 2):
        fast, slow = _pair(model, shape, theta=0.5, last_k=last_k)
        assert fast.uses_fast_path(3), fast.fast_path_reason
        _same(fast.extract(x, ranks=(1, 2)), slow.extract(x, ranks=(1, 2)))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the pads are constants: the input size is fixed
@pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")
def test_export_onnx_of_an_imported_model_with_four_sided_pads(tmp_path):
    """The torch graph of an imported model with padded modules exports to ONNX (logits and taps as onnxruntime
    runs them)."""
    from pathguard.models.networks import export_onnx

    layers = [*PADDED["conv_pads_0011_s2"][0], *PADDED["maxpool_pads_ceil"][0][1:2]]
    layers += [("AveragePool", {**_AVG, "pads": [0, 1, 1, 0], "ceil_mode": 1, "count_include_pad": 1})]
    model = import_onnx(_onnx_chain(layers, (2, 10, 10)))
    assert {"PaddedConv2d", "PaddedMaxPool2d", "PaddedAvgPool2d"} <= {type(m).__name__ for m in model.children()}
    export_onnx(model, tmp_path / "classifier.onnx")
    x = np.random.default_rng(2).random((3, 2, 10, 10), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "classifier.onnx"), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"input": x})
    with torch.no_grad():
        logits, taps = model.forward_with_taps(torch.from_numpy(x))
    for got, want in zip(outs, [logits, *taps.values()], strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("op", "attrs", "match"),
    [
        ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "dilations": [2, 2]}, "with dilations"),
        ("AveragePool", {"kernel_shape": [2, 2], "dilations": [2, 2]}, "dilations are not supported"),
        ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1]}, "are not 4 pads"),
        ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME"}, "auto_pad 'SAME' is not supported"),
    ],
)
def test_unsupported_padding_is_refused(op, attrs, match):
    with pytest.raises(UnsupportedModelError, match=match):
        import_onnx(_graph_with(helper.make_node(op, ["c"], ["g"], name="pool", **attrs)))
