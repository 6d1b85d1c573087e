#!/usr/bin/env python3
"""Scale figures of `pathguard build`: one process vs a local Ray with 1 and 2 workers, same bundle bytes.

Each build runs as its own `pathguard build` process with the committed bundle's build settings; the wall time
is measured around the process, the rest comes from the build report (fit images per second of the class-path
pass, peak resident memory of the driver and of the largest worker process). Every build's files except the
manifest must equal the one-process build's, byte for byte.

    scripts/build_scale.py --datasets mnist cifar10 --out docs/figures/build-scale.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {"mnist": ROOT / "artifacts/mnist-lenet5", "cifar10": ROOT / "artifacts/cifar10-cnn"}
MODES = {"one process": [], "ray, 1 worker": ["--ray", "--workers", "1"], "ray, 2 workers": ["--ray", "--workers", "2"]}


def build_args(bundle: Path) -> list[str]:
    """The committed bundle's build settings as `pathguard build` flags."""
    m = json.loads((bundle / "manifest.json").read_text())
    cfg = m["build"]["config"]
    args = ["--dataset", m["dataset"], "--theta", str(cfg["theta"]), "--n-calib", str(cfg["n_calib"])]
    if cfg.get("ep_last_k") is not None:
        args += ["--ep-last-k", str(cfg["ep_last_k"])]
    if cfg.get("nic"):
        args += ["--nic", json.dumps(cfg["nic"])]
    components = m["verdict"].get("components")
    if components:
        args += ["--fusion", ",".join(components)]
    return [*args, "--seed", str(cfg["seed"]), "--name", m["name"]]


def digests(bundle: Path) -> dict[str, str]:
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    return {name: entry["sha256"] for name, entry in files.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"], choices=list(BUNDLES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pathguard-scale-") as tmp:
        for dataset in args.datasets:
            reference: dict[str, str] | None = None
            for mode in args.modes:
                out = Path(tmp) / f"{dataset}-{len(rows)}"
                cmd = [str(Path(sys.executable).parent / "pathguard"), "build", *build_args(BUNDLES[dataset])]
                cmd += ["--out", str(out), *MODES[mode]]
                t = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
                wall = time.perf_counter() - t
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                report = json.loads(done.stdout)
                files = digests(out)
                reference = reference or files
                ex = report["executor"]
                rss = ex["peak_rss_bytes"]
                row = {
                    "dataset": dataset,
                    "mode": mode,
                    "wall_s": round(wall, 1),
                    "stage_s": {k: round(v, 1) for k, v in report["seconds"].items()},
                    "fit_images": ex["fit_images"],
                    "fit_images_per_s": ex["fit_images_per_s"],
                    "peak_rss_mb": {
                        k: round(v / 2**20) for k, v in ex["peak_rss_bytes"].items() if k != "worker_processes"
                    },
                    "worker_processes": ex["peak_rss_bytes"]["worker_processes"],
                    "same_bytes_as_one_process": files == reference,
                    "differing_files": sorted(n for n in files if files[n] != reference.get(n)),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print()
    head = ["dataset", "build", "wall time", "class-path pass", "fit images/s", "peak RSS driver", "peak RSS worker"]
    print("| " + " | ".join([*head, "same bytes"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = r["peak_rss_mb"]
        print(
            f"| {r['dataset']} | {r['mode']} | {r['wall_s']} s | {r['stage_s'].get('effective_path', 0)} s | "
            f"{r['fit_images_per_s']:.0f} | {rss['driver']} MB | {rss.get('workers', '-')} MB | "
            f"{'yes' if r['same_bytes_as_one_process'] else 'NO: ' + ', '.join(r['differing_files'])} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
