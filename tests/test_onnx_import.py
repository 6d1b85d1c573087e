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
