"""Effective Path extraction benchmarks (``pathguard bench-ep``).

- LeNet-5 throughput, rank-1 + rank-2, all layers (batched extractor, forward pass included);
- speed-up over a per-neuron loop implementation of the same rule (:func:`loop_reference_paths`), whose
  output is checked to be identical on the timed images;
- an AlexNet-sized network (:func:`alexnet`, random weights, 224x224): per-image time of full extraction and
  of partial extraction of the last 3 weighted layers, next to the paper's Table 1;
- peak resident memory of each case, measured in a fresh subprocess.

Timings depend on the machine and on other load: run on a quiet machine, the command prints the thread count.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pathguard.models.bundle import load_classifier
from pathguard.models.data import load_dataset
from pathguard.models.effective_path import DEFAULT_THETA, EffectivePathExtractor
from pathguard.models.networks import tap_points
from pathguard.models.networks.padding import PaddedMaxPool2d, explicit_pads

__all__ = ["PAPER_TABLE1", "alexnet", "best_time", "loop_reference_paths", "run_benchmarks"]

PAPER_TABLE1 = {"alexnet_full_s": 1.43, "alexnet_partial_s": 0.43, "resnet50_full_s": 68.32, "resnet50_partial_s": 0.83}


def alexnet(num_classes: int = 1000) -> nn.Sequential:
    """AlexNet (single-tower layout of the torchvision model: 64-192-384-256-256 convs, 4096-4096 FCs).

    Input (N, 3, 224, 224); weighted layers conv1..conv5, fc6, fc7, fc8 (the paper's "last 3" = the FCs).
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(3, 64, 11, stride=4, padding=2)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(3, stride=2)),
                ("conv2", nn.Conv2d(64, 192, 5, padding=2)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(3, stride=2)),
                ("conv3", nn.Conv2d(192, 384, 3, padding=1)),
                ("relu3", nn.ReLU()),
                ("conv4", nn.Conv2d(384, 256, 3, padding=1)),
                ("relu4", nn.ReLU()),
                ("conv5", nn.Conv2d(256, 256, 3, padding=1)),
                ("relu5", nn.ReLU()),
                ("pool5", nn.MaxPool2d(3, stride=2)),
                ("flatten", nn.Flatten()),
                ("drop6", nn.Dropout()),
                ("fc6", nn.Linear(256 * 6 * 6, 4096)),
                ("relu6", nn.ReLU()),
                ("drop7", nn.Dropout()),
                ("fc7", nn.Linear(4096, 4096)),
                ("relu7", nn.ReLU()),
                ("fc8", nn.Linear(4096, num_classes)),
            ]
        )
    ).eval()


# --------------------------------------------------------------------------------------------------
# Per-neuron loop implementation (the baseline of the speed-up figure)
# --------------------------------------------------------------------------------------------------


def _loop_select(c: torch.Tensor, y: float, theta: float) -> torch.Tensor:
    """Selection rule for one neuron: contributions ``c`` (K,) of real inputs -> selected positions."""
    if y < 0:
        c = -c
    total = float(c.sum())
    if total <= 0 or 1.0 / c.numel() >= theta:
        return c.argmax().view(1)
    vals, idx = torch.sort(c, descending=True, stable=True)
    cum = torch.cumsum(vals.double(), 0)
    before = torch.cat([cum.new_zeros(1), cum[:-1]])  # exclusive prefix sums
    keep = (before < theta * total) & (vals > 0)
    return idx[keep]


def _loop_conv(m: nn.Conv2d, x: torch.Tensor, sel: set[int], theta: float) -> tuple[list[int], set[int]]:
    """One selected output point at a time; ``x`` (C, H, W) is the layer input."""
    c_in, h, w = x.shape
    if isinstance(m.padding, str):
        raise NotImplementedError("string padding is not supported by the loop reference")
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    top, left, bottom, right = explicit_pads(m)
    o_n, cg = m.out_channels, c_in // m.groups
    oh_n = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow_n = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(x, (left, right, top, bottom))
    valid = F.pad(torch.ones(1, h, w, dtype=torch.bool), (left, right, top, bottom))
    pos = F.pad(torch.arange(h * w).view(1, h, w), (left, right, top, bottom), value=-1)
    weight = m.weight.detach()
    bias = m.bias.detach() if m.bias is not None else torch.zeros(o_n)
    ids, nxt = [], set()
    for p in sorted(sel):
        o, rest = divmod(p, oh_n * ow_n)
        oh, ow = divmod(rest, ow_n)
        g = o // (o_n // m.groups)
        rows, cols = slice(oh * sh, oh * sh + dh * (kh - 1) + 1, dh), slice(ow * sw, ow * sw + dw * (kw - 1) + 1, dw)
        win = xp[g * cg : (g + 1) * cg, rows, cols].reshape(-1)  # (Cg*KH*KW,)
        ok = valid[0, rows, cols].reshape(-1).repeat(cg)
        c = win * weight[o].reshape(-1)
        cols_ok = ok.nonzero().squeeze(1)
        chosen = cols_ok[_loop_select(c[cols_ok], float(c.sum()) + float(bias[o]), theta)]
        chan = g * cg + chosen // (kh * kw)
        spatial = pos[0, rows, cols].reshape(-1)[chosen % (kh * kw)]
        ids += (p * cg * kh * kw + chosen).tolist()
        nxt.update((chan * h * w + spatial).tolist())
    return ids, nxt


def _loop_linear(m: nn.Linear, x: torch.Tensor, sel: set[int], theta: float) -> tuple[list[int], set[int]]:
    weight = m.weight.detach()
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.out_features)
    ids, nxt = [], set()
    for o in sorted(sel):
        c = x * weight[o]
        chosen = _loop_select(c, float(c.sum()) + float(bias[o]), theta)
        ids += (o * m.in_features + chosen).tolist()
        nxt.update(chosen.tolist())
    return ids, nxt


def _loop_maxpool(m: nn.MaxPool2d, x: torch.Tensor, sel: set[int]) -> set[int]:
    if isinstance(m, PaddedMaxPool2d):
        raise NotImplementedError("four-sided max pool padding is not supported by the loop reference")
    _, idx = F.max_pool2d(x[None], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
    plane, out_plane = x.shape[1] * x.shape[2], idx.shape[2] * idx.shape[3]
    flat = idx.reshape(-1)
    return {(p // out_plane) * plane + int(flat[p]) for p in sel}


@torch.no_grad()
def loop_reference_paths(
    model: nn.Sequential, x: torch.Tensor, theta: float = DEFAULT_THETA, rank: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Effective paths one image and one selected neuron at a time (Eq. 1-3), for plain sequential nets
    of Conv2d, Linear, ReLU, MaxPool2d, Flatten, Dropout (and input-side modules before the first layer).

    Same output format as :func:`pathguard.models.effective_path.extract_effective_paths`.
    """
    out = []
    for i in range(x.shape[0]):
        acts, h = [], x[i : i + 1]
        for name, m in model.named_children():
            acts.append((name, m, h[0]))
            h = m(h)
        order = torch.sort(h[0], descending=True, stable=True).indices
        sel: set[int] = {int(order[rank - 1])}
        found: dict[str, torch.Tensor] = {}
        for name, m, xin in reversed(acts):
            if isinstance(m, nn.Conv2d):
                ids, sel = _loop_conv(m, xin, sel, theta)
            elif isinstance(m, nn.Linear):
                ids, sel = _loop_linear(m, xin, sel, theta)
            elif isinstance(m, nn.MaxPool2d):
                sel = _loop_maxpool(m, xin, sel)
                continue
            else:
                continue
            found[name] = torch.tensor(sorted(ids), dtype=torch.int64)
        out.append({k: found[k] for k in reversed(list(found))})
    return out


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def bench_lenet(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256, ranks: Sequence[int] = (1, 2), repeats: int = 3
) -> dict[str, Any]:
    """Throughput (images/s) of batched extraction on ``x``, forward pass included."""
    ext = EffectivePathExtractor(model, batch_size=batch_size)
    t = best_time(lambda: ext.extract(x, ranks=ranks), repeats)
    n = int(x.shape[0])
    return {
        "images": n,
        "batch_size": batch_size,
        "ranks": list(ranks),
        "seconds": t,
        "images_per_s": n / t,
        "ms_per_image": 1e3 * t / n,
    }


@torch.inference_mode()
def forward_taps(model: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the tapped activations (:func:`~pathguard.models.networks.tap_points`) of a plain Sequential."""
    points, taps = tap_points(model), {}
    for i, module in enumerate(model):
        x = module(x)
        if i in points:
            taps[points[i]] = x
    return x, taps


def bench_latency(
    model: nn.Sequential,
    x: torch.Tensor,
    last_k: int | None,
    from_taps: bool,
    repeats: int = 200,
    fast_path: bool = True,
) -> dict[str, Any]:
    """Per-request latency at batch 1 (rank 1 + 2): median and p90 over ``repeats`` single images.

    ``from_taps``: the forward pass already ran (as in the server, where onnxruntime returns the taps) and
    only :meth:`EffectivePathExtractor.extract_from_taps` is timed; otherwise the forward pass is included.
    ``fast_path``: the compiled small-batch walk (default, as served) or the batched torch walk.
    """
    ext = EffectivePathExtractor(model, last_k=last_k, batch_size=1, fast_path=fast_path)
    ext.warm_up()
    times = []
    for i in range(repeats):
        xi = x[i % x.shape[0] : i % x.shape[0] + 1]
        logits, taps = forward_taps(model, xi) if from_taps else (None, {})
        t0 = time.perf_counter()
        if logits is None:
            ext.extract(xi)
        else:
            ext.extract_from_taps(xi, logits, taps)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "last_k": last_k,
        "from_taps": from_taps,
        "fast_path": fast_path,
        "p50_ms": 1e3 * times[len(times) // 2],
        "p90_ms": 1e3 * times[int(0.9 * len(times))],
    }


def bench_speedup(model: nn.Sequential, x: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """Per-image time of :func:`loop_reference_paths` vs the batched extractor (rank 1 + 2), same images.

    The vectorized side is timed on ``x`` repeated to one full batch, so both sides do the same per-image work.
    """
    t0 = time.perf_counter()
    loop = {r: loop_reference_paths(model, x, rank=r) for r in (1, 2)}
    t_loop = (time.perf_counter() - t0) / x.shape[0]
    ext = EffectivePathExtractor(model, batch_size=batch_size)
    pb = ext.extract(x)
    identical = all(
        torch.equal(pb.image(r, i)[name], loop[r][i][name])
        for r in (1, 2)
        for i in range(x.shape[0])
        for name in pb.layers
    )
    reps = -(-batch_size // x.shape[0])
    xb = x.repeat(reps, 1, 1, 1)[:batch_size]
    t_vec = best_time(lambda: ext.extract(xb), 3) / xb.shape[0]
    return {
        "images": int(x.shape[0]),
        "loop_ms_per_image": 1e3 * t_loop,
        "vectorized_ms_per_image": 1e3 * t_vec,
        "speedup": t_loop / t_vec,
        "identical_paths": identical,
    }


def _extract_call(ext: EffectivePathExtractor, x: torch.Tensor, ranks: Sequence[int]) -> Callable[[], object]:
    def call() -> object:
        return ext.extract(x, ranks=ranks)

    return call


def bench_alexnet(batch_size: int = 8, images: int = 16, repeats: int = 2, seed: int = 0) -> dict[str, Any]:
    """AlexNet (random weights, 224x224 inputs): per-image seconds, full vs partial (last 3) extraction."""
    torch.manual_seed(seed)
    model = alexnet()
    x = torch.rand(images, 3, 224, 224)
    out: dict[str, Any] = {"batch_size": batch_size, "images": images, "paper_table1": PAPER_TABLE1}
    with torch.inference_mode():
        out["forward_s_per_image"] = (
            best_time(lambda: [model(x[s : s + batch_size]) for s in range(0, images, batch_size)], repeats) / images
        )
    for label, last_k in (("full", None), ("partial_last3", 3)):
        ext = EffectivePathExtractor(model, last_k=last_k, batch_size=batch_size)
        for ranks in ((1,), (1, 2)):
            key = f"{label}_rank{''.join(map(str, ranks))}_s_per_image"
            out[key] = best_time(_extract_call(ext, x, ranks), repeats) / images
        pb = ext.extract(x[:batch_size], ranks=(1,))
        out[f"{label}_synapses_per_image"] = {n: pb.ids[1][n].numel() / len(pb) for n in pb.layers}
    logits, taps = forward_taps(model, x)
    part = EffectivePathExtractor(model, last_k=3, batch_size=batch_size)

    def from_taps(bs: int) -> Callable[[], object]:
        def call() -> object:
            return [
                part.extract_from_taps(x[s : s + bs], logits[s : s + bs], {k: v[s : s + bs] for k, v in taps.items()})
                for s in range(0, images, bs)
            ]

        return call

    out["partial_last3_rank12_from_taps_s_per_image_batch1"] = best_time(from_taps(1), repeats) / images
    out["partial_last3_rank12_from_taps_s_per_image"] = best_time(from_taps(batch_size), repeats) / images
    out["speedup_vs_paper_partial"] = PAPER_TABLE1["alexnet_partial_s"] / out["partial_last3_rank1_s_per_image"]
    out["speedup_vs_paper_full"] = PAPER_TABLE1["alexnet_full_s"] / out["full_rank1_s_per_image"]
    return out


# --------------------------------------------------------------------------------------------------
# Peak memory, one case per fresh process
# --------------------------------------------------------------------------------------------------


def _memory_case(case: str, batch_size: int, threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)
    if case == "lenet":
        model: nn.Module = load_classifier(Path("artifacts/classifiers/mnist-lenet5"))
        x = torch.from_numpy(load_dataset("mnist", "test").x[: 4 * batch_size])
        ext = EffectivePathExtractor(model, batch_size=batch_size)
    else:
        model = alexnet()
        x = torch.rand(2 * batch_size, 3, 224, 224)
        ext = EffectivePathExtractor(model, batch_size=batch_size, last_k=3 if case == "alexnet_partial" else None)
    with torch.inference_mode():
        model(x[:batch_size])
    base = _status_mb("VmRSS")
    _reset_peak_rss()
    ext.extract(x)
    peak = _status_mb("VmHWM")
    queue.put(
        {"case": case, "batch_size": batch_size, "baseline_rss_mb": base, "peak_rss_mb": peak, "extra_mb": peak - base}
    )


def peak_memory(case: str, batch_size: int, threads: int) -> dict[str, Any]:
    """Peak RSS of one extraction case in a spawned process: ``extra_mb`` = peak during the extraction
    minus the RSS after loading the model and data and running one forward pass."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_case, args=(case, batch_size, threads, queue))
    proc.start()
    result: dict[str, Any] = queue.get()
    proc.join()
    return result


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def run_benchmarks(
    classifier_dir: Path,
    lenet_images: int = 5000,
    lenet_batch: int = 256,
    loop_images: int = 20,
    alexnet_images: int = 16,
    alexnet_batch: int = 8,
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every benchmark and return a JSON-able report."""

    threads = torch.get_num_threads()
    report: dict[str, Any] = {"torch": torch.__version__, "threads": threads}
    model = load_classifier(classifier_dir)
    x = torch.from_numpy(load_dataset("mnist", "test").x[:lenet_images])
    log(f"LeNet-5 throughput on {lenet_images} images, batch {lenet_batch}, {threads} thread(s)")
    report["lenet_rank12"] = bench_lenet(model, x, lenet_batch, (1, 2))
    report["lenet_rank1"] = bench_lenet(model, x, lenet_batch, (1,))
    report["lenet_latency_batch1"] = [
        bench_latency(model, x, k, t, fast_path=f) for f in (True, False) for k in (None, 3) for t in (False, True)
    ]
    log(f"loop reference on {loop_images} images")
    report["lenet_speedup"] = bench_speedup(model, x[:loop_images], lenet_batch)
    log(f"AlexNet on {alexnet_images} random 224x224 images, batch {alexnet_batch}")
    report["alexnet"] = bench_alexnet(alexnet_batch, alexnet_images)
    if memory:
        log("peak memory (fresh processes)")
        report["memory"] = [
            peak_memory("lenet", lenet_batch, threads),
            peak_memory("alexnet_partial", alexnet_batch, threads),
            peak_memory("alexnet_full", alexnet_batch, threads),
        ]
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def markdown_summary(report: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_benchmarks` report (as pasted into docs/effective_path.md)."""
    r12, r1, sp, ax = report["lenet_rank12"], report["lenet_rank1"], report["lenet_speedup"], report["alexnet"]
    lines = [
        f"torch {report['torch']}, {report['threads']} intra-op thread(s).",
        "",
        "| LeNet-5, all layers | value |",
        "|---|---|",
        f"| rank-1 + rank-2, batch {r12['batch_size']} | **{r12['images_per_s']:.0f} images/s** "
        f"({r12['ms_per_image']:.3f} ms/image) |",
        f"| rank-1 only, batch {r1['batch_size']} | {r1['images_per_s']:.0f} images/s |",
        f"| per-neuron loop implementation (rank-1 + rank-2) | {sp['loop_ms_per_image']:.1f} ms/image |",
        f"| speed-up of the batched extractor over the loop | **{sp['speedup']:.0f}x** "
        f"(identical paths: {sp['identical_paths']}) |",
    ]
    for lat in report.get("lenet_latency_batch1", []):
        scope = "all layers" if lat["last_k"] is None else f"last {lat['last_k']} layers"
        how = "from taps (forward already done)" if lat["from_taps"] else "forward included"
        walk = "compiled walk" if lat.get("fast_path", False) else "torch walk"
        lines.append(
            f"| batch 1, rank-1 + rank-2, {scope}, {how}, {walk} "
            f"| p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms |"
        )
    lines += [
        "",
        f"| AlexNet (random weights, 224x224), seconds per image | batch {ax['batch_size']} | paper Table 1 |",
        "|---|---|---|",
        f"| forward pass only | {ax['forward_s_per_image']:.4f} | |",
        f"| full extraction, rank 1 (forward included) | {ax['full_rank1_s_per_image']:.4f} | 1.43 |",
        f"| full extraction, rank 1 + 2 | {ax['full_rank12_s_per_image']:.4f} | |",
        f"| partial (last 3: fc6-fc8), rank 1 (forward incl.) | {ax['partial_last3_rank1_s_per_image']:.4f} | 0.43 |",
        f"| partial, rank 1 + 2 (forward included) | {ax['partial_last3_rank12_s_per_image']:.4f} | |",
        f"| partial, rank 1 + 2, from taps (serving case), batch 1 "
        f"| {ax['partial_last3_rank12_from_taps_s_per_image_batch1']:.4f} | |",
        f"| partial, rank 1 + 2, from taps, batch {ax['batch_size']} "
        f"| {ax['partial_last3_rank12_from_taps_s_per_image']:.4f} | |",
    ]
    if "memory" in report:
        lines += [
            "",
            "| peak memory of one extraction | batch | extra RSS (MiB) | process peak RSS (MiB) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m['case']} | {m['batch_size']} | {m['extra_mb']:.0f} | {m['peak_rss_mb']:.0f} |"
            for m in report["memory"]
        ]
    return "\n".join(lines) + "\n"
