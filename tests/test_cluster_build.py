"""The build on a local Ray cluster (two CPUs, started here) writes the same bytes as the build in one process:
for an image folder with an unreadable file, for a bundled dataset, with shards that fail once and with a
worker process that dies mid-build."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import ray

from pathguard.models.builder import BuildConfig, LocalExecutor, RayExecutor, build_bundle, build_bundle_from_onnx
from pathguard.models.builder import shards as shards_module
from pathguard.models.bundle import load_bundle, read_verified
from pathguard.models.data import dataset_info, load_dataset
from pathguard.models.errors import DatasetError
from pathguard.service.cli import main
from tests.conftest import MNIST_CLASSIFIER, TINY_NIC
from tests.test_own_classifier import NIC, user_files  # noqa: F401 (the fixture)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _files(bundle: Path) -> dict[str, bytes]:
    """Every file of a bundle, the manifest without its time stamps (build time, per-stage seconds)."""
    files = read_verified(bundle)
    manifest = {k: v for k, v in files.manifest.items() if k not in ("created_at", "files")}
    manifest["build"] = {k: v for k, v in manifest["build"].items() if k != "seconds"}
    return {n: files.bytes(n) for n in files.manifest["files"]} | {"manifest": json.dumps(manifest).encode()}


def _assert_same(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [n for n in fa if fa[n] != fb[n]]
    assert not differ, f"files differ: {differ}"


def _fail_once(marker_dir: Path, kind: str, shard: shards_module.Shard, number: int) -> None:
    """Fail the first attempt of every shard (``raise``) or kill the worker on the first fit shard (``die``)."""
    marker = marker_dir / f"{shard.split}-{shard.start}-{len(shard.idx)}"
    if kind == "die" and (shard.split != "fit" or shard.start != 0):
        return
    if not marker.exists():
        marker.touch()
        if kind == "die":
            os._exit(1)
        raise RuntimeError(f"injected failure of shard {number}")


@pytest.fixture(scope="module")
def folder_builds(user_files, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("cluster")
    cfg = BuildConfig(name="tiny-resnet", target_fpr=0.1, nic=NIC)
    args = (user_files["model"], user_files["train"])
    local = build_bundle_from_onnx(*args, root / "local", cfg, user_files["calib"], LocalExecutor(progress=False))
    return root, cfg, args, local


def test_ray_build_of_an_image_folder_equals_the_local_build(local_ray, folder_builds, user_files):  # noqa: F811
    root, cfg, args, local = folder_builds
    with RayExecutor(progress=False) as ex:
        report = build_bundle_from_onnx(*args, root / "ray", cfg, user_files["calib"], ex)
    _assert_same(root / "local", root / "ray")
    assert report["skipped_files"] == local["skipped_files"] == [str(user_files["train"] / "circle" / "broken.png")]
    assert read_verified(root / "ray").manifest["source"]["skipped_files"] == 1
    assert report["executor"]["workers"] == 2
    rss = report["executor"]["peak_rss_bytes"]
    assert rss["worker_processes"] >= 1 and rss["workers"] > 0 and rss["driver"] > 0
    assert report["executor"]["fit_images"] == local["executor"]["fit_images"] == 150  # the broken file skipped


@pytest.mark.parametrize("kind", ["raise", "die"])
def test_failed_shards_are_retried_and_the_bundle_is_unchanged(local_ray, folder_builds, user_files, kind):  # noqa: F811
    root, cfg, args, _ = folder_builds
    markers = root / f"markers-{kind}"
    markers.mkdir()
    with RayExecutor(progress=False, before_shard=partial(_fail_once, markers, kind)) as ex:
        build_bundle_from_onnx(*args, root / f"ray-{kind}", cfg, user_files["calib"], ex)
    _assert_same(root / "local", root / f"ray-{kind}")
    assert any(markers.iterdir())  # the failures did happen


def _add_file(folder: Path, shard: shards_module.Shard, number: int) -> None:
    extra = folder / "cross" / "added-during-the-build.png"
    if not extra.exists():
        extra.write_bytes((folder / "cross" / "000.png").read_bytes())


def test_a_shard_that_always_fails_fails_the_build_with_its_error(local_ray, folder_builds, user_files, tmp_path):  # noqa: F811
    _, cfg, args, _ = folder_builds
    train = tmp_path / "train"
    shutil.copytree(args[1], train)
    # the folder changes once the build has started: the workers refuse to read it, on every attempt
    hook = partial(_add_file, train)
    with (
        RayExecutor(progress=False, retries=1, before_shard=hook) as ex,
        pytest.raises(DatasetError, match="changed during the build"),
    ):
        build_bundle_from_onnx(args[0], train, tmp_path / "b", cfg, user_files["calib"], ex)
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_ray_build_of_a_bundled_dataset_equals_the_local_build(local_ray, tmp_path, monkeypatch):
    cfg = BuildConfig(name="tiny", n_train=3000, n_calib=1000, target_fpr=0.1, nic=TINY_NIC)
    build_bundle("mnist", MNIST_CLASSIFIER, tmp_path / "local", cfg, LocalExecutor(progress=False))
    monkeypatch.setattr(shards_module, "SHARD_CHUNKS", 1)  # other shard boundaries: the chunk grid is the same
    with RayExecutor(progress=False) as ex:
        report = build_bundle("mnist", MNIST_CLASSIFIER, tmp_path / "ray", cfg, ex)
    _assert_same(tmp_path / "local", tmp_path / "ray")
    assert report["executor"]["shards"] > 8
    load_bundle(tmp_path / "ray")  # and it loads


def test_dataset_info_matches_the_data():
    for name in ("mnist", "cifar10"):
        for split in ("train", "test"):
            n, classes = dataset_info(name, split)
            data = load_dataset(name, split)
            assert (n, classes) == (len(data), data.classes)
    assert np.all(load_dataset("mnist", "train").y < 10)


def test_cli_builds_on_ray(local_ray, folder_builds, user_files, tmp_path, capsys):  # noqa: F811
    root, cfg, args, _ = folder_builds
    argv = ["build", "--model", str(args[0]), "--data", str(args[1]), "--calibration", str(user_files["calib"])]
    argv += ["--name", cfg.name, "--target-fpr", "0.1", "--nic", json.dumps(NIC)]
    assert main([*argv, "--out", str(tmp_path / "x"), "--workers", "2"]) == 2  # --workers needs --ray
    assert "--workers sets the local Ray's CPUs" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "cli"), "--ray", "--no-stored-graph"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["executor"]["workers"] == 2  # the Ray this process already runs
    _assert_same(root / "local", tmp_path / "cli")
