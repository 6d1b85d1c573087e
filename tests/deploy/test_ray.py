"""The Ray build's deployment files: the builder image (Ray + the cluster extra, never the serving image) and the
KubeRay RayJob that runs `pathguard build --ray` on a cluster."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pathguard.service.cli import build_parser
from tests.conftest import ROOT
from tests.deploy.manifests import (
    DEPLOY,
    copy_parts,
    dockerignore_rules,
    in_build_context,
    load_yaml_documents,
    parse_dockerfile,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILDER = DEPLOY / "ray" / "Dockerfile"


@pytest.fixture(scope="module")
def job() -> dict:
    (doc,) = load_yaml_documents(DEPLOY / "ray" / "rayjob.yaml")
    return doc


def _ray_requirement() -> Requirement:
    (req,) = [r for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"]["cluster"]) if r.name == "ray"]
    assert req.name == "ray" and "default" in req.extras
    return req


def _containers(job: dict) -> list[tuple[str, dict, dict]]:
    """(group, container, pod spec) of the head and every worker group."""
    spec = job["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c, g["template"]["spec"]) for name, g in groups for c in g["template"]["spec"]["containers"]]


def test_ray_is_an_extra_and_never_a_serving_dependency():
    req = _ray_requirement()
    assert not any(Requirement(r).name == "ray" for r in PYPROJECT["project"]["dependencies"])
    serving = "\n".join(i.args for s in parse_dockerfile()[1] for i in s.instructions)
    assert "ray" not in re.findall(r"[a-z]+", serving.lower()), "the serving image has no Ray"
    assert "cluster" in (ROOT / "Makefile").read_text(), "the test environment installs the cluster extra"
    assert req.specifier.contains(Version("2.60.0"))


def test_builder_image_installs_the_cluster_extra_on_the_ray_image():
    args, stages = parse_dockerfile(BUILDER)
    (stage,) = stages
    base = stage.base.replace("${RAY_IMAGE}", args["RAY_IMAGE"])
    image, tag = base.split(":")
    assert image == "rayproject/ray" and tag.endswith("-py311-cpu")
    assert _ray_requirement().specifier.contains(Version(tag.split("-")[0])), "the image's Ray is in the extra's range"
    runs = "\n".join(i.args for i in stage.all("RUN"))
    torch = re.search(r"pip install torch==(\S+) --index-url https://download.pytorch.org/whl/cpu", runs)
    makefile_pin = re.search(r"pip install --quiet torch==(\S+)", (ROOT / "Makefile").read_text())
    assert torch and makefile_pin and torch.group(1) == makefile_pin.group(1), "the same CPU torch everywhere"
    assert 'pip install ".[cluster]"' in runs
    rules = dockerignore_rules()
    for inst in stage.all("COPY"):
        for src in copy_parts(inst)[1]:
            assert (ROOT / src).exists() and in_build_context(src, rules), f"{src} is not in the build context"


def test_rayjob_runs_a_valid_build_command_on_the_cluster(job):
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["pathguard", "build"]
    args = build_parser().parse_args(argv[1:])
    assert args.ray == "auto", "inside a RayJob the driver joins its own cluster"
    assert args.model and args.data and args.out
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    assert _ray_requirement().specifier.contains(Version(cluster["rayVersion"]))
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no shard tasks beside the driver"
    images = {c["image"] for _, c, _ in _containers(job)}
    assert images == {"pathguard-builder:0.1.0"}, "every node runs the builder image (docs/deploy.md builds it)"
    assert "pathguard-builder:0.1.0" in BUILDER.read_text()


def test_every_node_sees_the_images_and_the_driver_writes_the_bundle(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    inputs = [args.model, args.data, args.calibration]
    for group, container, pod in _containers(job):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        for path in inputs:  # the workers read the images themselves, at the same path on every node
            (mount,) = [m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")]
            assert mount.get("readOnly") is True, f"{group}: the training images are mounted read-only"
            assert claims[mount["name"]] == "pathguard-training-data"
        writes = [m for p, m in mounts.items() if args.out.startswith(p.rstrip("/") + "/")]
        if group == "head":  # the driver runs on the head and writes the bundle
            (out,) = writes
            assert not out.get("readOnly") and claims[out["name"]] == "pathguard-bundles"
        else:
            assert writes == [], "workers never write the bundle"
        res = container["resources"]
        assert res["requests"]["cpu"] and res["limits"]["memory"]
