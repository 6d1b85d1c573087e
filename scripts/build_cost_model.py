#!/usr/bin/env python3
"""Per-image cost of a bundle build, measured on this machine, and what it predicts for ImageNet with ResNet-50.

The class-path pass dominates a build: per image one forward pass and one Effective Path extraction over the
extracted (last-k) layers, which examines the whole fan-in of every selected output neuron. Measured on one
thread (one worker), batch 512, random inputs:

    t_image = a * MACs(forward) + c * examined synapses + d * extracted layers

fitted exactly on LeNet-5 (all layers), the CIFAR-10 CNN (last 3) and ResNet-20 (last 3, the weights of its
training checkpoint) and checked on ResNet-20 with all 20 layers extracted (a depth and examined count none of
the fitted ones has). For ResNet-50 on ImageNet the examined synapses are the largest examined fraction measured
on the CIFAR-10 networks times the synapses of its last k layers, and decoding is measured on a synthetic 500x375
JPEG resized to 224x224 (about the ImageNet median size).

    scripts/build_cost_model.py --out docs/figures/build-cost-model.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pathguard.models.bundle import load_classifier
from pathguard.models.effective_path import EffectivePathExtractor
from pathguard.models.evaluation.bench_ep import best_time
from pathguard.models.networks import TappedSequential
from pathguard.models.networks.architectures import RESNET20, build_classifier

ROOT = Path(__file__).resolve().parents[1]

# ResNet-50 on ImageNet (224x224, 1000 classes): forward MACs and the synapses of its last weighted layers,
# from the architecture (torchvision's layout): fc 2048x1000; layer4's last bottleneck at 7x7:
# conv3 1x1 512->2048, conv2 3x3 512->512, conv1 1x1 2048->512.
RESNET50_MACS = 4.09e9
RESNET50_LAST = [
    ("fc", 2048 * 1000),
    ("conv3", 2048 * 49 * 512),
    ("conv2", 512 * 49 * 4608),
    ("conv1", 512 * 49 * 2048),
]
IMAGENET_TRAIN = 1_281_167


def measure(name: str, model: TappedSequential, last_k: int | None, n: int = 512) -> dict[str, float]:
    """Per-image forward and forward + extraction seconds, and the synapses the extraction examines: the whole
    fan-in of every selected output neuron, per layer."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((n, *model.config.input_shape), dtype=np.float32))
    ex = EffectivePathExtractor(model, theta=0.5, last_k=last_k)
    full = EffectivePathExtractor(model, theta=0.5)
    with torch.no_grad():
        fwd = best_time(lambda: model(x), 3) / n
    ext = best_time(lambda: ex.extract(x, ranks=(1,)), 3) / n
    pb = ex.extract(x, ranks=(1,))
    examined = 0.0
    for layer in ex.layers:
        info, ids, off = ex.layer_info[layer], pb.ids[1][layer], pb.offsets[1][layer]
        for i in range(n):
            neurons = torch.unique(ids[off[i] : off[i + 1]] // info.fan_in)
            examined += len(neurons) * info.fan_in / n
    synapses = float(sum(ex.layer_info[layer].n_synapses for layer in ex.layers))
    return {
        "model": name,
        "last_k": last_k,
        "layers": len(ex.layers),
        "macs": float(sum(i.n_synapses for i in full.layer_info.values())),
        "synapses": synapses,
        "examined": examined,
        "examined_fraction": examined / synapses,
        "forward_s": fwd,
        "image_s": ext,
    }


def decode_seconds(n: int = 50) -> float:
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(0, 4, (375, 500, 3)), axis=1)  # photo-like gradients, not noise
    raw = np.clip(smooth - smooth.min() + 40, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()

    def run() -> None:
        for _ in range(n):
            with Image.open(io.BytesIO(data)) as img:
                arr = np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), np.float32)
            arr /= 255.0

    return best_time(run, 3) / n


def _resnet20_checkpoint() -> TappedSequential:
    """ResNet-20 with the weights of its training checkpoint (trained weights select realistic paths), batch norm
    folded as in a served classifier."""
    from safetensors.torch import load_file

    from pathguard.models.networks.folding import fold_batchnorm

    model = build_classifier(RESNET20)
    state = load_file(str(ROOT / "artifacts/classifiers/cifar10-resnet20/checkpoint/state.safetensors"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return fold_batchnorm(model)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)  # one worker = one CPU
    torch.manual_seed(0)
    lenet = load_classifier(ROOT / "artifacts/classifiers/mnist-lenet5")
    cnn = load_classifier(ROOT / "artifacts/classifiers/cifar10-cnn")
    resnet = _resnet20_checkpoint()
    fit = [measure("lenet5", lenet, None), measure("cifar_cnn", cnn, 3), measure("resnet20", resnet, 3)]
    check = [measure("resnet20", resnet, None)]
    # t_image = a * MACs + c * examined synapses + d * extracted layers: exact on the three fitted, checked on the
    # fourth (all 20 layers of ResNet-20, a depth and an examined count none of the fitted ones has)
    design = np.array([[m["macs"], m["examined"], m["layers"]] for m in fit])
    a, c, d = np.linalg.solve(design, np.array([m["image_s"] for m in fit]))
    for m in fit + check:
        m["predicted_s"] = a * m["macs"] + c * m["examined"] + d * m["layers"]
    fractions = [m["examined_fraction"] for m in fit + check if m["model"] != "lenet5"]
    decode = decode_seconds()
    rows = []
    synapses = 0.0
    for k, (layer, s) in enumerate(RESNET50_LAST, start=1):
        synapses += s
        examined = max(fractions) * synapses  # the largest examined fraction measured on the CIFAR-10 networks
        per_image = a * RESNET50_MACS + c * examined + d * k + decode
        bitmaps = 1000 * synapses / 8  # one bit per synapse and class
        rows.append(
            {
                "last_k": k,
                "added_layer": layer,
                "synapses": synapses,
                "per_image_s": per_image,
                "worker_hours": per_image * IMAGENET_TRAIN / 3600,
                "class_path_bytes": bitmaps,
            }
        )
    result = {"a_s_per_mac": a, "c_s_per_examined_synapse": c, "d_s_per_layer": d, "decode_224_s": decode}
    result |= {"examined_fraction_used": max(fractions), "measured": fit + check}
    result["resnet50_imagenet"] = rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"a = {a * 1e9:.4f} ns/MAC, c = {c * 1e9:.3f} ns/examined synapse, d = {d * 1e6:.1f} us/layer, "
        f"JPEG decode+resize = {decode * 1e3:.2f} ms, examined fraction used = {max(fractions):.4f}"
    )
    head = ["model", "extracted layers", "forward MACs", "examined synapses", "forward ms", "measured ms/image"]
    print("| " + " | ".join([*head, "model ms/image"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for m in fit + check:
        k = "all" if m["last_k"] is None else f"last {m['last_k']}"
        print(
            f"| {m['model']} | {k} | {m['macs'] / 1e6:.2f} M | "
            f"{m['examined'] / 1e6:.3f} M of {m['synapses'] / 1e6:.2f} M"
            f" | {m['forward_s'] * 1e3:.3f} | {m['image_s'] * 1e3:.3f} | {m['predicted_s'] * 1e3:.3f} |"
        )
    print()
    print("| ResNet-50 last k | synapses | s/image (1 CPU) | worker-hours (1.28M images) | class-path bitmaps |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['last_k']} (+{r['added_layer']}) | {r['synapses'] / 1e6:.1f} M | {r['per_image_s']:.3f} | "
            f"{r['worker_hours']:.0f} | {r['class_path_bytes'] / 2**30:.2f} GiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
