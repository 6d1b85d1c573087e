"""The ``pathguard`` command line. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_CLASSIFIER_DIRS = {
    "mnist": "artifacts/classifiers/mnist-lenet5",
    "cifar10": "artifacts/classifiers/cifar10-cnn",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pathguard.models.evaluation.train import ARCH_DEFAULTS, DEFAULTS, train_classifier

    cfg = ARCH_DEFAULTS.get(args.arch, DEFAULTS[args.dataset]) if args.arch else DEFAULTS[args.dataset]
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed") if getattr(args, k) is not None}
    cfg = replace(cfg, **overrides)
    default_out = (
        DEFAULT_CLASSIFIER_DIRS[args.dataset] if not args.arch else f"artifacts/classifiers/{args.dataset}-{args.arch}"
    )
    out = Path(args.out or default_out)
    report = train_classifier(args.dataset, out, cfg, arch=args.arch, resume=args.resume)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from pathguard.models.data import data_dir, download

    written = download(args.dataset)
    print(f"{args.dataset}: {len(written)} file(s) written to {data_dir()}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a supported classifier (mnist: LeNet-5, cifar10: CNN)")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], required=True)
    p.add_argument("--arch", choices=["lenet5", "cifar_cnn", "resnet20"], help="architecture (default: the dataset's)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (written after every epoch)")
    p.add_argument("--out", help="output folder (default: artifacts/classifiers/<dataset>-<arch>)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_train)


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download a dataset's canonical files into PATHGUARD_DATA_DIR")
    p.add_argument("dataset", choices=["mnist", "cifar10"])
    p.set_defaults(func=_cmd_download)


def _cmd_bench_nic(args: argparse.Namespace) -> int:
    from pathguard.models.evaluation.bench_nic import run_benchmark

    report = run_benchmark(
        repeats=args.repeats,
        quick=args.quick,
        cifar_dir=Path(args.cifar_classifier) if args.cifar_classifier else None,
        mnist_dir=Path(args.mnist_classifier) if args.mnist_classifier else None,
        randomization=args.randomization,
        datasets=tuple(args.datasets),
    )
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _add_bench_nic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-nic", help="NIC fit time, head accuracies and per-image scoring latency (MNIST, CIFAR-10)"
    )
    p.add_argument("--repeats", type=int, default=300, help="timed calls per measurement (median reported)")
    p.add_argument("--quick", action="store_true", help="tiny fit sizes: checks the command, figures meaningless")
    p.add_argument("--mnist-classifier", help="classifier folder (default artifacts/classifiers/mnist-lenet5)")
    p.add_argument(
        "--cifar-classifier",
        help="classifier folder (default artifacts/classifiers/cifar10-cnn; "
        "a random-weight CNN of the same architecture when missing)",
    )
    p.add_argument(
        "--randomization",
        action="store_true",
        help="also fit 3 randomized members on MNIST and compare clean FPR / FGSM+BIM detection (eval extra)",
    )
    p.add_argument("--datasets", nargs="+", choices=["mnist", "cifar10"], default=["mnist", "cifar10"])
    p.add_argument("--out", help="also write the JSON report here")
    p.set_defaults(func=_cmd_bench_nic)


def _cmd_build(args: argparse.Namespace) -> int:
    from pathguard.models.builder import BuildConfig, build_bundle, build_bundle_from_onnx

    own = args.data is not None or args.calibration is not None  # the user's image folders
    onnx_on_dataset = args.dataset is not None and args.model is not None and not own
    if not onnx_on_dataset and (
        (args.dataset is None) == (not own) or (own and (args.model is None or args.data is None))
    ):
        print("error: give --dataset mnist|cifar10 (optionally with --model MODEL.onnx), or --model MODEL.onnx "
              "--data DIR", file=sys.stderr)  # fmt: skip
        return 2
    if args.model is not None and args.classifier is not None:
        print("error: give --model MODEL.onnx or --classifier DIR, not both", file=sys.stderr)
        return 2
    supervised_options = ("supervised_detector", "supervised_features", "supervised_n")
    if not args.supervised_attacks and any(getattr(args, k) is not None for k in supervised_options):
        print("error: --supervised-detector / --supervised-features / --supervised-n need --supervised-attacks",
              file=sys.stderr)  # fmt: skip
        return 2
    optional: dict[str, Any] = {}
    if args.fusion:  # otherwise BuildConfig's default: every component
        optional["fusion"] = _names(args.fusion)
    if args.supervised_attacks:
        optional["supervised_attacks"] = _names(args.supervised_attacks)
        for key in supervised_options:
            if getattr(args, key) is not None:  # otherwise BuildConfig's default
                optional[key] = getattr(args, key)
    try:
        cfg = BuildConfig(
            name=args.name or Path(args.out).name,
            version=args.version,
            theta=args.theta,
            ep_last_k=args.ep_last_k,
            n_ep_fit=args.n_ep_fit,
            n_calib=args.n_calib,
            target_fpr=args.target_fpr,
            nic=json.loads(args.nic) if args.nic else {},
            mahalanobis=json.loads(args.mahalanobis) if args.mahalanobis else {},
            components=json.loads(args.components) if args.components else {},
            rule=args.rule,
            seed=args.seed,
            **optional,
        )
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers is not None and args.ray is None:
        print("error: --workers sets the local Ray's CPUs: use it with --ray", file=sys.stderr)
        return 2
    refusal = _out_refusal(Path(args.out), args.force)
    if refusal is not None:  # checked before the build's hours, and again by the writer itself
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        executor = None
        if args.ray is not None:  # an existing cluster's address, or "" for a local Ray with this machine's cores
            from pathguard.models.builder import RayExecutor

            executor = stack.enter_context(RayExecutor(address=args.ray or None, workers=args.workers))
        if own:
            report = build_bundle_from_onnx(args.model, args.data, args.out, cfg, args.calibration, executor)
        else:
            classifier = args.model or args.classifier or DEFAULT_CLASSIFIER_DIRS[args.dataset]
            report = build_bundle(args.dataset, classifier, args.out, cfg, executor)
    if not args.no_stored_graph:
        report["stored_graph"] = _store_graph(Path(args.out), "build")
        report["sha256"] = report["stored_graph"].get("bundle_sha256", report["sha256"])  # the bundle as left
    print(json.dumps(report, indent=2, default=float))
    return 0


def _cmd_refit(args: argparse.Namespace) -> int:
    from pathguard.models.builder import refit_bundle

    try:
        params = json.loads(args.components)
    except ValueError as exc:
        print(f"error: --components is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(params, dict) or not params or not all(isinstance(v, dict) for v in params.values()):
        print('error: --components maps each component to refit to its parameters, e.g. '
              '\'{"effective_path": {"last_k": 3}}\'', file=sys.stderr)  # fmt: skip
        return 2
    try:
        report = refit_bundle(args.bundle, params, args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or args.bundle)
    if report.pop("had_stored_graph") and not args.no_stored_graph:
        report["stored_graph"] = _store_graph(out, "refit")
        report["sha256"] = report["stored_graph"].get("bundle_sha256", report["sha256"])
    print(json.dumps(report, indent=2, default=float))
    return 0


def _add_refit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refit",
        help="fit again, with new parameters, components the verdict does not read (Effective Path when not fused); "
        "the verdict and its calibration are kept byte for byte",
    )
    p.add_argument("bundle", help="a bundle of a bundled dataset (its splits are read again)")
    p.add_argument(
        "--components",
        required=True,
        help="JSON: component -> changed build parameters, merged over the bundle's, e.g. '{\"effective_path\": "
        '{"last_k": 3, "selection": "absolute", "quantile": 0.1}}\'',
    )
    p.add_argument("--out", help="write the refitted bundle here (default: replace the bundle)")
    p.add_argument("--no-stored-graph", action="store_true", help="do not store the guarded graph again")
    p.set_defaults(func=_cmd_refit)


def _store_graph(out: Path, command: str) -> dict[str, Any]:
    """Store the new bundle's guarded graph in it (a server without torch serves it); a bundle whose verdict fuses a
    component with no in-graph form keeps none, and ``command`` (build or refit) says why."""
    from pathguard.models.components.graph import NotInGraphError
    from pathguard.models.guarded import store_in_bundle

    try:
        sha = store_in_bundle(out)
    except NotInGraphError as exc:
        print(f"pathguard {command}: note: no stored guarded graph (a server needs torch for this bundle): {exc}",
              file=sys.stderr)  # fmt: skip
        return {"stored": False, "why": str(exc)}
    return {"stored": True, "bundle_sha256": sha}


def _out_refusal(out: Path, force: bool) -> str | None:
    """Why ``build --out`` must not write to ``out``: never over something that is not a bundle (a file, a folder
    of other files), and over an existing bundle only with ``--force``."""
    from pathguard.models.bundle.format import check_bundle_target, is_bundle
    from pathguard.models.errors import BundleError

    try:
        check_bundle_target(out)
    except BundleError as exc:
        return str(exc)
    if is_bundle(out) and not force:
        return f"{out} is an existing bundle; pass --force to replace it"
    return None


def _names(csv: str) -> list[str]:
    return [c.strip() for c in csv.split(",") if c.strip()]


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a detection bundle from a trained classifier and its training data")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], help="a bundled dataset (with its bundled classifier)")
    p.add_argument(
        "--model",
        help="your own classifier: an ONNX file (opset >= 13, input (N, C, H, W) in [0, 1]); "
        "with --dataset, built on that bundled dataset's training images",
    )
    p.add_argument("--data", help="with --model: its training images, DIR/<class>/*.png|jpg")
    p.add_argument("--calibration", help="with --model: images the classifier never trained on (same class folders)")
    p.add_argument("--classifier", help="classifier folder (default: artifacts/classifiers/<dataset>-<arch>)")
    p.add_argument(
        "--out",
        required=True,
        help="bundle folder to write, e.g. artifacts/mnist-lenet5: a new or empty folder, or an existing bundle with "
        "--force (a folder of other files is refused)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing bundle at --out (atomically, once the build is done)"
    )
    p.add_argument(
        "--no-stored-graph",
        action="store_true",
        help="do not store the guarded graph in the bundle (by default it is, so a server without torch serves it; "
        "`pathguard export BUNDLE --in-bundle` stores it later)",
    )
    p.add_argument("--name", help="bundle name (default: the --out folder name)")
    p.add_argument("--version", default="1")
    p.add_argument("--theta", type=float, default=0.5, help="Effective Path selection threshold")
    p.add_argument("--ep-last-k", type=int, help="extract only the last k weighted layers (default: all)")
    p.add_argument("--n-ep-fit", type=int, help="training images aggregated into class paths (default: all)")
    p.add_argument("--n-calib", type=int, default=5000, help="held-out training images for calibration")
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--nic", help="NICDetector parameters as JSON, e.g. '{\"n_fit\": 3000}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fusion",
        help="comma-separated verdict components: effective_path, ep_channels (channel-level Effective Path, "
        "in-graph), nic (NIC final model), nic_vi (NIC value "
        "invariants, two-sided), mahalanobis (class-conditional Gaussians per layer), and the prediction-consistency "
        "family: margin (logit margin), noise_flip, noise_l1, noise_drop (noise response), squeeze (feature "
        "squeezing); default: the first three",
    )
    p.add_argument(
        "--rule",
        default="fisher",
        help="how the components' p-values combine: fisher (default), tippett (Sidak-corrected minimum), harmonic "
        "(harmonic mean), or outer(inner), e.g. tippett(fisher): inner within each family (layer statistics, "
        "consistency), outer across them",
    )
    p.add_argument(
        "--components",
        help='build parameters per component as JSON, e.g. \'{"noise_flip": {"copies": 8, "flip_rate": 0.02}, '
        '"squeeze": {"bits": 5}}\'',
    )
    p.add_argument(
        "--mahalanobis",
        help="with mahalanobis in --fusion: ClassGaussian parameters as JSON, e.g. "
        '\'{"layers": ["pool2", "fc1"], "pool": "mean"}\' (default: every tap, per-channel means)',
    )
    p.add_argument(
        "--supervised-attacks",
        help="optional supervised mode (needs the eval extra): comma-separated attacks, e.g. fgsm,bim,deepfool, run "
        "on held-out training images to train a supervised detector reported beside the verdict (the verdict "
        "stays benign-only)",
    )
    p.add_argument(
        "--supervised-detector",
        choices=["logistic", "linear", "random_forest", "adaboost", "gradient_boosting"],
        help="supervised model: logistic regression (default) or the EP paper's linear joint similarity (arrays), "
        "or an ensemble (its trees stored as plain arrays, no pickle)",
    )
    p.add_argument(
        "--supervised-features",
        choices=["all", "effective_path"],
        help="all (default: EP similarities, NIC violations, fusion components) or effective_path (similarities "
        "only; required by --supervised-detector linear)",
    )
    p.add_argument("--supervised-n", type=int, help="held-out images to attack (default: all 20%% of --n-calib)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the passes over images as Ray tasks (the cluster extra): on the cluster at ADDRESS (e.g. "
        "ray://head:10001, or auto), or without ADDRESS on a local Ray with this machine's cores; same bundle bytes",
    )
    p.add_argument("--workers", type=int, help="with --ray and no ADDRESS: the local Ray's CPUs (default: all cores)")
    p.set_defaults(func=_cmd_build)


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathguard.models.bundle import BundleError, verify_bundle

    try:
        manifest = verify_bundle(args.bundle)
    except BundleError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {args.bundle} ({manifest.get('name')} v{manifest.get('version')}, {len(manifest['files'])} files)")
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every file of a bundle against its manifest")
    p.add_argument("bundle")
    p.set_defaults(func=_cmd_verify)


def _cmd_export(args: argparse.Namespace) -> int:
    from pathguard.models.bundle import BundleError, load_bundle
    from pathguard.models.components.graph import NotInGraphError
    from pathguard.models.export import write_guarded, write_triton
    from pathguard.models.guarded import store_in_bundle

    if not (args.guarded or args.triton or args.in_bundle):
        print("pathguard export: give --guarded FILE, --triton DIR and/or --in-bundle", file=sys.stderr)
        return 2
    try:
        if args.in_bundle:  # first: the exports below then read the bundle with its stored graph
            sha = store_in_bundle(args.bundle)
            print(f"stored the guarded graph in {args.bundle} (guarded.onnx, guarded.json); bundle sha256 {sha}")
            if not (args.guarded or args.triton):
                return 0
        bundle = load_bundle(args.bundle)
        if args.guarded:
            write_guarded(bundle, args.guarded, seed=args.seed, components=args.components)
            print(f"wrote {args.guarded}")
        if args.triton:
            entry = write_triton(
                bundle,
                args.triton,
                args.name,
                args.max_batch_size,
                args.threads,
                args.seed,
                gpu=args.gpu,
                components=args.components,
            )
            print(f"wrote {entry}/config.pbtxt and {entry}/1/model.onnx")
    except (BundleError, NotInGraphError, ValueError, OSError) as exc:
        print(f"pathguard export: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the bundle's guarded graph (classifier + verdict in one ONNX model), or a Triton entry"
    )
    p.add_argument("bundle")
    p.add_argument("--guarded", metavar="FILE", help="write the guarded graph to FILE (.onnx)")
    p.add_argument("--triton", metavar="DIR", help="write a Triton model repository entry DIR/<name>/")
    p.add_argument(
        "--in-bundle",
        action="store_true",
        help="store the guarded graph in the bundle (guarded.onnx, guarded.json; the bundle's sha256 changes): a "
        "server without torch serves it",
    )
    p.add_argument("--name", help="the Triton model's name (default: the bundle's)")
    p.add_argument("--max-batch-size", type=int, default=64, help="Triton's max_batch_size (default 64)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads in Triton (0: its default)")
    p.add_argument("--seed", type=int, help="seed of the in-graph noise (default: fresh noise every run)")
    p.add_argument("--gpu", action="store_true", help="Triton instance on the GPU (KIND_GPU) instead of the CPU")
    p.add_argument(
        "--components",
        choices=("verdict", "all"),
        default="verdict",
        help="verdict: the verdict's components (default); all: also every other component with an in-graph form",
    )
    p.set_defaults(func=_cmd_export)


def _cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from pathguard.models.bundle import load_bundle, verdict_sha256
    from pathguard.models.data import load_dataset

    bundle = load_bundle(args.bundle, target_fpr=args.target_fpr, seed=0)  # noise seeded: figures reproduce
    split = load_dataset(bundle.dataset, args.split)
    idx = np.arange(min(args.n, len(split)))
    flagged, correct, sup_flagged = 0, 0, 0
    for s in range(0, len(idx), 500):
        part = split.subset(idx[s : s + 500])
        res = bundle.pipeline.detect(part.x)
        flagged += int(res.adversarial.sum())
        correct += int((res.predicted == part.y).sum())
        sup_flagged += int(res.supervised.adversarial.sum()) if res.supervised is not None else 0
    n = len(idx)
    out = {
        "bundle": bundle.name,
        "bundle_sha256": bundle.sha256,
        "verdict_sha256": verdict_sha256(bundle.path),
        "split": args.split,
        "n": n,
        "accuracy": correct / n,
        "threshold": bundle.pipeline.threshold,
        "target_fpr": bundle.pipeline.target_fpr,
        "flagged_rate": flagged / n,
    }
    if bundle.pipeline.supervised is not None:
        out["supervised_flagged_rate"] = sup_flagged / n
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score clean images of the bundle's dataset: accuracy and flagged rate (FPR)")
    p.add_argument("bundle")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--target-fpr", type=float)
    p.add_argument(
        "--json",
        metavar="PATH",
        help="also write the figures to PATH (e.g. docs/reports/<bundle>/clean-fpr.json, beside its report)",
    )
    p.set_defaults(func=_cmd_score)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        from pathguard.models.evaluation.attacks import ATTACKS
        from pathguard.models.evaluation.evaluate import evaluate
    except ImportError as exc:  # the attack libraries live in the `eval` extra
        print(f"pathguard evaluate needs the eval extra (pip install 'pathguard[eval]'): {exc}", file=sys.stderr)
        return 2
    if args.adaptive:
        return _evaluate_adaptive(args)
    attacks = list(ATTACKS) if args.attacks == "all" else [a for a in args.attacks.split(",") if a]
    overrides = {}
    for item in args.n_attack or []:
        name, _, n = item.partition("=")
        overrides[name] = int(n)
    report = evaluate(
        args.bundle,
        attacks,
        args.n,
        args.out,
        n_clean=args.n_clean,
        n_attack_overrides=overrides,
        cache=args.cache,
        seed=args.seed,
        order=args.order,
    )
    fused = report["detectors"]["fused"]["per_attack"]
    print(json.dumps({"clean_fpr": report["clean"]["fpr"], "fused_auc": {a: v["auc"] for a, v in fused.items()}}))
    print(f"wrote {args.out}/report.json, report.md and figures")
    return 0


def _evaluate_adaptive(args: argparse.Namespace) -> int:
    from pathguard.models.evaluation.adaptive import AdaptiveSettings, adaptive_evaluate

    settings = AdaptiveSettings(n=args.n, steps=args.steps, rounds=args.rounds, draws=args.draws, seed=args.seed,
                                lambda_factor=args.lambda_factor, nic_members=args.nic_members)  # fmt: skip
    if args.budgets:
        settings.budgets = [b for b in args.budgets.split(",") if b]
    if args.targets:
        settings.targets = [t for t in args.targets.split(",") if t]
    if args.component_budgets:
        settings.component_budgets = [b for b in args.component_budgets.split(",") if b]
    report = adaptive_evaluate(args.bundle, args.out, settings)
    pgd = {t: {b: s["adaptive"]["success"] for b, s in per.items()} for t, per in report["pgd"].items()}
    print(json.dumps({"adaptive_pgd_success": pgd, "cw_l2": report["cw_l2"]}))
    print(f"wrote {args.out}/report.json and report.md")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="attack test images and report every detector's AUC / detection rate")
    p.add_argument("--bundle", default="artifacts/mnist-lenet5")
    p.add_argument("--attacks", default="all", help="comma-separated attack names, or 'all'")
    p.add_argument("--n", type=int, default=200, help="test images attacked per attack (default 200)")
    p.add_argument("--n-clean", type=int, help="clean test images scored (default: --n)")
    p.add_argument("--n-attack", action="append", metavar="ATTACK=N", help="per-attack image count, repeatable")
    p.add_argument("--out", required=True, help="report folder, e.g. docs/reports/mnist-lenet5")
    p.add_argument("--cache", help="folder caching generated adversarial examples between runs")
    p.add_argument(
        "--order",
        choices=("interleaved", "stored"),
        default="interleaved",
        help="which test images are the first n: the classes in turn (default), or the split's stored order",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("adaptive attacks (--adaptive: white-box attacks on the bundle's detector)")
    a.add_argument("--adaptive", action="store_true", help="run the adaptive attacks instead of --attacks")
    a.add_argument(
        "--budgets",
        help="comma-separated PGD budgets (default: linf_2,linf_4,linf_8,l2_0.5,l2_1.0; "
        "also linf_0.1, linf_0.3, l2_2.0)",
    )
    a.add_argument("--targets", help="comma-separated: fused and/or fused components (default: all of them)")
    a.add_argument("--component-budgets", help="budgets of the one-component targets (default: every budget)")
    a.add_argument("--steps", type=int, default=20, help="PGD steps per lambda round (default 20)")
    a.add_argument("--rounds", type=int, default=4, help="lambda search rounds after lambda 0 (default 4)")
    a.add_argument("--draws", type=int, default=20, help="noise draws per step for noise components (EOT)")
    a.add_argument(
        "--nic-members",
        choices=("fixed", "random"),
        default="fixed",
        help="random: NIC scores each input with a randomized member drawn per input, as served with "
        "PATHGUARD_NIC_MEMBERS=random (the attack averages over the members); needs such a bundle",
    )
    a.add_argument("--lambda-factor", type=float, default=10.0,
                   help="lambda is multiplied (divided) by this between rounds (default 10)")  # fmt: skip
    p.set_defaults(func=_cmd_evaluate)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_evaluate,
    _add_train,
    _add_download,
    _add_build,
    _add_refit,
    _add_verify,
    _add_score,
    _add_export,
]
SUBCOMMANDS.append(_add_bench_nic)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pathguard.models.bundle import BundleError, verify_bundle
    from pathguard.service.app import check_exposure, check_pin, create_app
    from pathguard.service.settings import Settings

    names = {"bundle": "bundle", "host": "host", "port": "port", "engine": "engine", "mode": "mode",
             "repository": "model_repository", "control_mode": "model_control_mode",
             "load_model": "load_models"}  # fmt: skip
    cli = {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}
    settings = Settings(**cli)
    try:
        check_exposure(settings)
    except ValueError as exc:
        print(f"pathguard serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    if settings.model_repository is not None:
        if not settings.model_repository.is_dir():
            print(f"pathguard serve: model repository {settings.model_repository} is not a folder", file=sys.stderr)
            return 2
    else:
        try:
            verify_bundle(settings.bundle)
            check_pin(settings)
        except BundleError as exc:
            print(f"pathguard serve: refusing to start: {user_error_message(exc)}", file=sys.stderr)
            return 2
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=_log_config(args.log_level),
        access_log=False,  # pathguard's own access log (PATHGUARD_ACCESS_LOG) names the route, not the raw path
    )
    return 0


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration plus the ``pathguard`` loggers (service messages, access log) on stderr."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["pathguard"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle over HTTP (default artifacts/mnist-lenet5 on 127.0.0.1:8080)",
        description="Serve a bundle. Every setting is read from PATHGUARD_* environment variables "
        "(see docs/service.md); the options below override them.",
    )
    p.add_argument("--bundle", help="bundle folder (PATHGUARD_BUNDLE, default artifacts/mnist-lenet5)")
    p.add_argument(
        "--repository",
        help="model repository: DIR/<name>/ or DIR/<name>/<version>/ bundles (PATHGUARD_MODEL_REPOSITORY)",
    )
    p.add_argument(
        "--control-mode",
        choices=["none", "poll", "explicit"],
        help="how the repository's models load (PATHGUARD_MODEL_CONTROL_MODE, default none: all at start)",
    )
    p.add_argument(
        "--load-model",
        action="append",
        help="explicit mode: a model to load at start (repeatable; PATHGUARD_LOAD_MODELS)",
    )
    p.add_argument("--host", help="bind address (PATHGUARD_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (PATHGUARD_PORT, default 8080)")
    p.add_argument("--engine", choices=["onnx", "torch"], help="classifier runtime (PATHGUARD_ENGINE, default onnx)")
    p.add_argument("--mode", choices=["enforce", "shadow"], help="PATHGUARD_MODE, default enforce")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathguard.models.evaluation.bench_http import BenchConfig, render_markdown, run_bench

    cfg = BenchConfig(
        bundles=[Path(b) for b in args.bundle or ["artifacts/mnist-lenet5"]],
        requests=args.requests,
        concurrency=tuple(args.concurrency),
        modes=tuple(args.checks),
        images=args.images,
        warmup=args.warmup,
        rounds=args.rounds,
        engine=args.engine,
        server_python=args.server_python,
    )
    report = run_bench(cfg)
    command = "pathguard bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "pathguard bench"
    text = render_markdown(report, command)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="p50/p99 latency and throughput of /v1/detect against /v1/predict over HTTP")
    p.add_argument("--bundle", action="append", help="bundle folder (repeatable; default artifacts/mnist-lenet5)")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per route, concurrency and check mode")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument(
        "--checks",
        nargs="+",
        choices=["parallel", "serial", "graph", "guarded", "guarded-graph", "guarded-verdict", "stored"],
        default=["parallel", "serial"],
        help="check modes, each on its own server: on the Python pipeline parallel, serial, graph (NIC inside the "
        "onnx graph); on the guarded graph (PATHGUARD_DETECT_GRAPH=on) guarded (every component reported), "
        "guarded-graph, guarded-verdict (PATHGUARD_REPORTED_COMPONENTS=graph / verdict); stored: the bundle's stored "
        "guarded graph (PATHGUARD_DETECT_GRAPH=stored; `pathguard export BUNDLE --in-bundle`)",
    )
    p.add_argument(
        "--server-python",
        help="the Python that runs the servers, e.g. a virtualenv's installed without torch (default: this one)",
    )
    p.add_argument("--images", type=int, default=1000, help="distinct test images cycled through")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4, help="alternating predict/detect rounds per cell")
    p.add_argument("--engine", choices=["onnx", "torch"], default="onnx")
    p.add_argument("--out", help="write the markdown table here (e.g. docs/bench.md)")
    p.add_argument("--json", help="write the raw report here")
    p.set_defaults(func=_cmd_bench)


def _cmd_repo(args: argparse.Namespace) -> int:
    """A thin client of the model repository API: POST /v2/repository/index, .../models/<name>/load|unload."""
    import httpx

    headers = {"x-api-key": args.api_key} if args.api_key else {}
    base = args.url.rstrip("/")
    path = "/v2/repository/index" if args.action == "list" else f"/v2/repository/models/{args.name}/{args.action}"
    try:
        resp = httpx.post(base + path, json={}, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"pathguard repo: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    try:
        body = resp.json()
    except ValueError:
        body = {"error": resp.text.strip()[:500]}
    if resp.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        print(f"pathguard repo {args.action}: HTTP {resp.status_code}: {error or body}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
    elif args.action == "list":
        rows = [("NAME", "VERSION", "STATE", "REASON")]
        rows += [(m["name"], m.get("version", "-"), m["state"], m.get("reason", "")) for m in body]
        widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
        for r in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(r[:3], widths, strict=True)), r[3])
    elif args.action == "load":
        print(f"{body['name']}: version {body['version']} ({body['bundle_sha256'][:12]}) is serving")
    else:
        print(f"{body['name']}: unloaded")
    return 0


def _add_repo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "repo",
        help="list, load or unload the models of a running server (its model repository API)",
        description="list: every model of the server's repository with its state. load NAME: load or reload a "
        "model (explicit control mode); the version serving keeps serving if the new one fails. unload NAME.",
    )
    p.add_argument("action", choices=["list", "load", "unload"])
    p.add_argument("name", nargs="?", help="the model (load, unload)")
    p.add_argument("--url", default=os.environ.get("PATHGUARD_URL", "http://127.0.0.1:8080"),
                   help="the server (PATHGUARD_URL, default http://127.0.0.1:8080)")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("PATHGUARD_API_KEY"), help="(PATHGUARD_API_KEY)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (a load verifies and warms up)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    p.set_defaults(func=_cmd_repo_checked)


def _cmd_repo_checked(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        print(f"pathguard repo {args.action}: name the model", file=sys.stderr)
        return 2
    return _cmd_repo(args)


SUBCOMMANDS += [_add_serve, _add_bench, _add_repo]


def _cmd_bench_ep(args: argparse.Namespace) -> int:
    import torch

    from pathguard.models.evaluation.bench_ep import markdown_summary, run_benchmarks, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = {"lenet_images": 512, "loop_images": 4, "alexnet_images": 2, "alexnet_batch": 2} if args.quick else {}
    report = run_benchmarks(Path(args.classifier), memory=not args.no_memory, **quick)  # type: ignore[arg-type]
    if args.out:
        write_report(report, Path(args.out))
    print(markdown_summary(report))
    return 0


def _add_bench_ep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-ep", help="Effective Path extraction benchmark (LeNet-5, loop speed-up, AlexNet)")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER_DIRS["mnist"], help="LeNet-5 classifier folder")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the command (figures meaningless)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess runs")
    p.add_argument("--out", help="write the JSON report here (e.g. docs/figures/ep/bench.json)")
    p.set_defaults(func=_cmd_bench_ep)


def _cmd_ep_report(args: argparse.Namespace) -> int:
    import torch

    from pathguard.models.evaluation.ep_report import run_report

    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_report(
        Path(args.out),
        Path(args.mnist_classifier),
        Path(args.cifar_classifier),
        theta_images=args.theta_images,
        cifar_images=args.cifar_images,
        skip_mnist=args.skip_mnist,
        skip_cifar=args.skip_cifar,
    )
    for name in ("mnist", "cifar10"):
        if name in report:
            keys = ("density", "jaccard_mean_offdiag", "bitmap_bytes")
            brief = {k: report[name][k] for k in keys if k in report[name]}
            print(name, json.dumps(brief, indent=2))
    return 0


def _add_ep_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ep-report", help="reproduce the Effective Path paper's profiling figures (densities, Jaccard)")
    p.add_argument("--out", default="docs/figures/ep", help="folder for report.json and the PNG figures")
    p.add_argument("--mnist-classifier", default=DEFAULT_CLASSIFIER_DIRS["mnist"])
    p.add_argument("--cifar-classifier", default=DEFAULT_CLASSIFIER_DIRS["cifar10"])
    p.add_argument("--theta-images", type=int, default=10000, help="training images per theta in the theta sweep")
    p.add_argument("--cifar-images", type=int, default=50000, help="CIFAR-10 training images for its class paths")
    p.add_argument("--skip-mnist", action="store_true", help="keep the MNIST section of an existing report.json")
    p.add_argument("--skip-cifar", action="store_true", help="keep the CIFAR-10 section of an existing report.json")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=_cmd_ep_report)


SUBCOMMANDS += [_add_bench_ep, _add_ep_report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathguard",
        description="Inference-time adversarial-input detection (Effective Path + NIC) for image classifiers.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error instead of a one-line message"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# the builder's extra (pathguard[build]): what building, evaluating and the Python pipeline import, serving a stored
# guarded graph does not
BUILD_MODULES = frozenset({"torch", "sklearn", "scipy", "numba", "onnx", "safetensors", "tqdm"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. An error the user can fix (missing data, a bad folder or bundle, a bad setting) is one
    line on stderr and exit status 2; ``--debug`` shows its traceback instead. Anything else is a defect and
    keeps its traceback."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the previous warning filters and display on the way out
        warnings.filterwarnings("always", category=UserWarning, module=r"pathguard\.")
        warnings.showwarning = _warning_line(args.command, warnings.showwarning)
        try:
            result: int = args.func(args)
        except ModuleNotFoundError as exc:
            if args.debug or (exc.name or "").split(".")[0] not in BUILD_MODULES:
                raise
            print(
                f"pathguard {args.command}: error: this needs {exc.name}, one of the builder's dependencies, which is "
                "not installed; install them with: pip install 'pathguard[build]' (serving a bundle with a stored "
                "guarded graph needs none of them)",
                file=sys.stderr,
            )
            return 2
        except Exception as exc:
            if args.debug or not _is_user_error(exc):
                raise
            print(f"pathguard {args.command}: error: {user_error_message(exc)}", file=sys.stderr)
            return 2
    return result


def _warning_line(command: str, fallback: Callable[..., None]) -> Callable[..., None]:
    """Show pathguard's own warnings (e.g. NIC scaled to a short training set) as one line on stderr; leave
    every other warning to ``fallback``. (By name: importing pathguard.models would load torch for every
    command.)"""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if any(
            c.__module__ == "pathguard.models.errors" and c.__name__ == "PathguardWarning" for c in category.__mro__
        ):
            print(f"pathguard {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, *args, **kwargs)

    return show


def _is_user_error(exc: BaseException) -> bool:
    from pathguard.models.errors import PathguardError

    # ValueError covers bad settings (pydantic's ValidationError), bad JSON and unsupported configurations.
    return isinstance(exc, PathguardError | ValueError | FileNotFoundError | NotADirectoryError)


def _settings_errors(exc: BaseException) -> str:
    """A bad PATHGUARD_* value (pydantic's ValidationError on Settings) as 'PATHGUARD_PORT='abc': reason'."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError) or exc.title != "Settings":
        return ""
    parts = []
    for err in exc.errors()[:3]:
        name = "PATHGUARD_" + "_".join(str(x) for x in err.get("loc", ())).upper()
        parts.append(f"{name}={err.get('input')!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def user_error_message(exc: BaseException) -> str:
    """One line: what is wrong and, where the message does not already say it, how to fix it."""
    from pathguard.models.errors import (
        BundleCompatibilityError,
        BundleError,
        BundleIntegrityError,
        ClassifierLoadError,
        DatasetError,
    )

    settings_errors = _settings_errors(exc)
    if settings_errors:
        return f"{settings_errors}; fix the variable (settings: docs/service.md)"
    if isinstance(exc, FileNotFoundError | NotADirectoryError) and exc.filename is not None:
        text = f"{exc.strerror or 'not found'}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())  # one line, whatever the message held
    if isinstance(exc, DatasetError):
        hint = ""  # its message already says where the data is looked for and how to get it
    elif isinstance(exc, BundleIntegrityError):
        hint = "rebuild the bundle with `pathguard build` or restore its original files (`pathguard verify` checks)"
    elif isinstance(exc, BundleCompatibilityError):
        hint = "upgrade pathguard or rebuild the bundle with this version"
    elif isinstance(exc, BundleError):
        hint = "pass a bundle folder written by `pathguard build`, e.g. artifacts/mnist-lenet5"
    elif isinstance(exc, ClassifierLoadError):
        hint = (
            "pass a classifier folder written by `pathguard train` (classifier.json and classifier.safetensors), "
            "e.g. artifacts/classifiers/mnist-lenet5"
        )
    elif "unknown architecture" in text:
        hint = "classifier.json must name one of those; train a supported one with `pathguard train`"
    elif isinstance(exc, FileNotFoundError | NotADirectoryError):
        hint = "check the path"
    else:
        hint = ""
    return f"{text}; {hint}" if hint else text


if __name__ == "__main__":
    sys.exit(main())
