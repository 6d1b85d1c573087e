#!/usr/bin/env python3
"""Effective Path's selection rules on attacks of held-out TRAINING images: agreement, AUC and cost per form.

The forms compared on one committed bundle, all fitted here on the same images of the bundle's fit split (class
paths on the first ``--n-fit`` images, the benign score on the next ``--n-score``):

- ``cumulative``: the paper's rule at the bundle's theta (the exact form, refitted on these images so that every form
  sees the same data; the bundle's own component, fitted on its whole fit split, is scored beside it);
- ``absolute q``: the sort-free absolute rule, each layer's threshold the ``q`` quantile of the cumulative rule's cuts
  on the first ``--n-profile`` fit images (:func:`pathguard.models.effective_path.extractor.profile_thresholds`);
- ``relative q``: the sort-free relative rule, each layer's threshold the ``q`` quantile of the cumulative rule's
  cuts as fractions of their neurons' sums, on the same images;
- each of them on the last ``k`` layers only (``--last-k``, early termination: the walk stops ``k`` layers down).

Scored on the attacks cached by ``scripts/heldout_attacks.py`` (the first images of ``calib_b``; successful adversarial
examples only) against the next ``--n-clean`` ``calib_b`` images as clean negatives. No test image is touched.

- agreement: per layer, the Jaccard index of each form's rank-1 synapse set with the cumulative form's, on clean and
  on attacked images (``--n-jaccard`` of each);
- detection: AUC and detection rate at 5% FPR (threshold on the clean negatives) per attack, and their means;
- cost: in-process p50 per image at batch 1, one thread, from the forward pass's taps (the served path): the
  compiled walk of ranks 1 and 2, the class-path similarity and the benign score; and the same in the graph (the
  form's :class:`~pathguard.models.effective_path.ingraph.GraphEffectivePath` in onnxruntime, one thread), for the
  forms within the in-graph walk's synapse budget.

The rule that picks a bundle's default form, fixed before any attack is scored: among the forms whose mean AUC is
within 0.01 of the cumulative form's on all layers, the one with the highest mean AUC per millisecond; when none is
within 0.01, the cumulative form on all layers stays, and the page states the trade-off.

    scripts/compare_ep_rules.py --bundle artifacts/mnist-lenet5 --attacks DIR \\
        --out docs/reports/validation/mnist-lenet5-ep-rules.json

The tables of the validation page come from the JSON (``--tables JSON`` prints them again without recomputing;
``--retime BUNDLE JSON N`` times every form's walk again on N clean images, see :func:`retime`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from compare_ep_forms import jaccard, rates

from pathguard.models.bundle import load_bundle
from pathguard.models.bundle.splits import training_split_indices
from pathguard.models.data import load_dataset
from pathguard.models.effective_path import BenignEPScore, ClassPaths, EffectivePathExtractor
from pathguard.models.effective_path.extractor import profile_thresholds
from pathguard.models.effective_path.ingraph import GraphEffectivePath, GraphWalk
from pathguard.models.networks import tap_points

WITHIN = 0.01  # the rule's AUC tolerance against the cumulative form


def features(cp: ClassPaths, ex: EffectivePathExtractor, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, 2L) rank-1 then rank-2 similarities of ``x`` over the extractor's layers."""
    out = []
    for s in range(0, len(x), batch):
        sims = cp.similarity(ex.extract(x[s : s + batch], ranks=(1, 2)))
        out.append(np.concatenate([sims[1], sims[2]], axis=1))
    return np.concatenate(out)


def rank1_sets(ex: EffectivePathExtractor, x: np.ndarray) -> dict[str, list[set[int]]]:
    pb = ex.extract(x, ranks=(1,))
    return {layer: [set(pb.image(1, i)[layer].tolist()) for i in range(len(x))] for layer in pb.layers}


def columns(layers: list[str], k: int | None) -> np.ndarray:
    """Feature columns (rank 1, then rank 2) of the last ``k`` layers."""
    n = len(layers)
    keep = np.arange(0 if k is None else n - k, n)
    return np.r_[keep, keep + n]


def graph_ms(model, shape, ex, cp, score, xs: np.ndarray) -> tuple[float | None, str | None]:
    """(p50 ms per image of the extractor's form as the in-graph walk, similarity and score in onnxruntime, or None;
    why not)."""
    try:
        walk = GraphWalk(
            model, shape, ex.theta, ex.last_k, tap_points(model), thresholds=ex.thresholds, relative=ex.relative
        )
    except NotImplementedError as exc:
        return None, str(exc)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(GraphEffectivePath(walk, cp, score).to_onnx(), opts, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        logits, taps = model.forward_with_taps(torch.from_numpy(xs))
    start = torch.from_numpy(xs) if walk.start_tap is None else taps[walk.start_tap]
    feeds = [{"input": start[i : i + 1].numpy(), "logits": logits[i : i + 1].numpy()} for i in range(len(xs))]
    sess.run(None, feeds[0])  # warm-up, not counted
    times = []
    for feed in feeds:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), None


def walk_ms(model, ex: EffectivePathExtractor, cp: ClassPaths, score: BenignEPScore | None, xs: np.ndarray) -> dict:
    """Per image, batch 1: the served walk of ranks 1 and 2 from the forward pass's taps (computed beforehand, not
    timed), the class-path similarity and the score (None: left out); p50, mean and p90 in ms."""
    ex.warm_up()
    passes = []
    with torch.no_grad():
        for i in range(len(xs)):
            xt = torch.from_numpy(xs[i : i + 1])
            passes.append((xt, *model.forward_with_taps(xt)))
    times = []
    for xt, logits, taps in [passes[0], *passes]:  # the first run warms caches, not counted
        t0 = time.perf_counter()
        sims = cp.similarity(ex.extract_from_taps(xt, logits, taps, ranks=(1, 2)))
        if score is not None:
            score.score(np.concatenate([sims[1], sims[2]], axis=1))
        times.append(time.perf_counter() - t0)
    ms = 1e3 * np.array(times[1:])
    return {"p50": float(np.median(ms)), "mean": float(ms.mean()), "p90": float(np.quantile(ms, 0.9))}


def save(report: dict, path: Path) -> None:
    """Write the report with the rule's choice among the forms measured so far (``partial`` until the last)."""
    best = report["forms"]["cumulative"]["mean_auc"]
    eligible = {k: v for k, v in report["forms"].items() if v["mean_auc"] >= best - WITHIN}
    report["chosen"] = max(eligible, key=lambda k: eligible[k]["auc_per_ms"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def tables(report: dict) -> str:
    """The validation page's tables (markdown) from a report."""
    forms = report["forms"]
    attacks = list(next(iter(forms.values()))["attacks"])
    lines = [
        "| form | layers | mean AUC | mean DR@5% | compiled walk ms | in-graph ms | mean AUC per ms (compiled) "
        "| Jaccard with cumulative, clean | Jaccard, attacked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, f in forms.items():
        jac = f["jaccard"]
        clean = np.mean(list(jac["clean"].values()))
        attacked = np.mean([np.mean(list(v.values())) for k, v in jac.items() if k != "clean"])
        graph = "over budget" if f["in_graph_ms_batch1"] is None else f"{f['in_graph_ms_batch1']:.2f}"
        layers = "all" if f["last_k"] is None else f"last {f['last_k']}"
        mark = "**" if key == report["chosen"] else ""
        lines.append(
            f"| {mark}{f['form']}{mark} | {layers} | {f['mean_auc']:.3f} | {100 * f['mean_dr']:.1f}% "
            f"| {f['walk_ms_batch1']:.2f} | {graph} | {f['auc_per_ms']:.2f} | {clean:.2f} | {attacked:.2f} |"
        )
    lines += ["", "| form | layers | " + " | ".join(f"{a} (n {report['data']['attacks'][a]})" for a in attacks) + " |"]
    lines.append("|---|---|" + "---|" * len(attacks))
    own = report["bundle_component"]
    cells = " | ".join(f"{own[a]['auc']:.3f} / {100 * own[a]['dr_at_fpr_0.05']:.0f}%" for a in attacks)
    lines.append(f"| the bundle's own component (its whole fit split) | all | {cells} |")
    for f in forms.values():
        cells = " | ".join(
            f"{f['attacks'][a]['auc']:.3f} / {100 * f['attacks'][a]['dr_at_fpr_0.05']:.0f}%" for a in attacks
        )
        layers = "all" if f["last_k"] is None else f"last {f['last_k']}"
        lines.append(f"| {f['form']} | {layers} | {cells} |")
    return "\n".join(lines) + "\n"


def retime(bundle_dir: Path, path: Path, n: int) -> None:
    """Time every form of a finished report again (the walk and the similarity, with the bundle's class paths: the
    cost depends on the synapses walked, not on the bitmaps' bits; the score, microseconds, is left out), on the
    first ``n`` clean negatives, and choose again."""
    torch.set_num_threads(1)
    report = json.loads(path.read_text())
    bundle = load_bundle(bundle_dir, seed=0)
    model, ep = bundle.classifier, bundle.pipeline.components["effective_path"]
    cfg = bundle.manifest["build"]["config"]
    train = load_dataset(bundle.dataset, "train")
    idx = training_split_indices(len(train), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))
    start = max(report["data"]["attacks"].values(), default=0)
    xs = train.x[idx["calib_b"][start : start + n]]  # a subset of the clean negatives
    for key, f in report["forms"].items():
        covered = ep.layers if f["last_k"] is None else ep.layers[-f["last_k"] :]
        ex = EffectivePathExtractor(
            model,
            theta=ep.extractor.theta,
            last_k=f["last_k"],
            thresholds={k: v for k, v in (f["thresholds"] or {}).items() if k in covered},
            relative=f.get("relative", False),
        )
        f["walk_ms"] = walk_ms(model, ex, ep.class_paths, None, xs)
        f["walk_ms_batch1"] = f["walk_ms"]["p50"]
        f["auc_per_ms"] = f["mean_auc"] / f["walk_ms_batch1"]
        print(key, f["walk_ms"], flush=True)
    report["retimed"] = {"images": len(xs), "what": "walk (ranks 1 and 2) and similarity, from taps; score left out"}
    save(report, path)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--tables":
        print(tables(json.loads(Path(sys.argv[2]).read_text())), end="")
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "--retime":
        retime(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--attacks", type=Path, required=True, help="scripts/heldout_attacks.py's folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-fit", type=int, default=5000)
    p.add_argument("--n-score", type=int, default=1000)
    p.add_argument("--n-profile", type=int, default=1000)
    p.add_argument("--n-clean", type=int, default=1600)
    p.add_argument("--n-jaccard", type=int, default=100)
    p.add_argument("--n-latency", type=int, default=100)
    p.add_argument("--quantiles", type=float, nargs="*", default=[0.25, 0.5], help="absolute rule's profiles")
    p.add_argument("--relative-quantiles", type=float, nargs="*", default=[0.1, 0.25, 0.5])
    p.add_argument("--last-k", type=int, nargs="*", default=[], help="early-termination depths besides all layers")
    args = p.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle, seed=0)
    model, ep = bundle.classifier, bundle.pipeline.components["effective_path"]
    theta, num_classes = ep.extractor.theta, len(bundle.classes)
    cfg = bundle.manifest["build"]["config"]
    train = load_dataset(bundle.dataset, "train")
    idx = training_split_indices(len(train), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))
    fit_x, fit_y = train.x[idx["fit"]], train.y[idx["fit"]]
    head, score_x = slice(0, args.n_fit), fit_x[args.n_fit : args.n_fit + args.n_score]
    files = sorted(args.attacks.glob("*.npz"))
    n_attacked = max(len(np.load(f)["success"]) for f in files)
    x_clean = train.x[idx["calib_b"][n_attacked : n_attacked + args.n_clean]]
    advs: dict[str, np.ndarray] = {}
    for f in files:
        with np.load(f) as z:
            label, x_adv = json.loads(str(z["meta"]))["label"], z["x_adv"][z["success"]]
        if len(x_adv) >= 10:
            advs[label] = x_adv.astype(np.float32)
    sets = {"clean": x_clean} | advs

    forms: dict[str, tuple[dict[str, float] | None, bool]] = {"cumulative": (None, False)}
    t0 = time.perf_counter()
    cumulative = EffectivePathExtractor(model, theta=theta)
    for q in args.quantiles:
        forms[f"absolute {q:g}"] = profile_thresholds(cumulative, fit_x[: args.n_profile], q), False
    for q in args.relative_quantiles:
        forms[f"relative {q:g}"] = profile_thresholds(cumulative, fit_x[: args.n_profile], q, True), True
    profile_s = time.perf_counter() - t0
    report: dict = {
        "bundle": {"name": bundle.name, "sha256": bundle.sha256, "theta": theta, "layers": list(ep.layers)},
        "data": {"fit": args.n_fit, "score": len(score_x), "profile": args.n_profile, "clean": len(x_clean),
                 "attacks": {a: len(x) for a, x in advs.items()}},
        "rule": f"within {WITHIN} of the cumulative form's mean AUC on all layers, the highest mean AUC per ms",
        "profile_s": round(profile_s, 1),
        "forms": {},
        "partial": True,
    }  # fmt: skip

    # the bundle's own component (its whole fit split), all layers, for reference
    own = {name: ep.ep_score.score(features(ep.class_paths, ep.extractor, x)) for name, x in sets.items()}
    report["bundle_component"] = {a: rates(own["clean"], own[a]) for a in advs}

    jac_sets = {name: x[: args.n_jaccard] for name, x in sets.items()}
    reference_sets = {name: rank1_sets(cumulative, x) for name, x in jac_sets.items()}
    for form, (thresholds, relative) in forms.items():
        t0 = time.perf_counter()
        ex = EffectivePathExtractor(model, theta=theta, thresholds=thresholds, relative=relative)
        cp = ClassPaths(num_classes).fit(ex, fit_x[head], fit_y[head])
        fit_s = time.perf_counter() - t0
        feats = {name: features(cp, ex, x) for name, x in sets.items()}
        score_feats = features(cp, ex, score_x)
        agreement = {}
        for name, x in jac_sets.items():
            mine = rank1_sets(ex, x)
            agreement[name] = {layer: jaccard(reference_sets[name][layer], mine[layer]) for layer in mine}
        for k in [None, *args.last_k]:
            cols = columns(ex.layers, k)
            score = BenignEPScore().fit(score_feats[:, cols])
            raw = {name: score.score(f[:, cols]) for name, f in feats.items()}
            per_attack = {a: rates(raw["clean"], raw[a]) for a in advs}
            covered = ex.layers if k is None else ex.layers[-k:]
            timed = EffectivePathExtractor(
                model,
                theta=theta,
                last_k=k,
                thresholds={n: v for n, v in (thresholds or {}).items() if n in covered},
                relative=relative,
            )
            timed.warm_up()

            xs = x_clean[: args.n_latency]
            ms = walk_ms(model, timed, cp, score, xs)["p50"]
            in_graph, why = graph_ms(model, bundle.input_shape, timed, cp, score, xs)
            mean_auc = float(np.mean([r["auc"] for r in per_attack.values()]))
            key = form if k is None else f"{form}, last {k}"
            report["forms"][key] = {
                "form": form,
                "last_k": k,
                "thresholds": thresholds,
                "relative": relative,
                "attacks": per_attack,
                "mean_auc": mean_auc,
                "mean_dr": float(np.mean([r["dr_at_fpr_0.05"] for r in per_attack.values()])),
                "walk_ms_batch1": ms,
                "auc_per_ms": mean_auc / ms,
                "in_graph_ms_batch1": in_graph,
                "in_graph_refused": why,
                "jaccard": {name: {layer: v for layer, v in agree.items() if layer in covered}
                            for name, agree in agreement.items()},
                "class_paths_s": round(fit_s, 1),
            }  # fmt: skip
            print(f"{key}: mean AUC {mean_auc:.3f}, {ms:.2f} ms, in graph {in_graph} ms", flush=True)
        save(report, args.out)  # after every form: a long run keeps what it finished

    report.pop("partial")
    save(report, args.out)
    print(tables(report), end="")
    print("chosen:", report["chosen"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
