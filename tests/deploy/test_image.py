"""The serving image built and run for real (``scripts/image-test``, ``make image-test``) wherever a Docker daemon
answers: build (offline through the Dockerfile's build arguments where the registries it names are unreachable),
ready, one /v1/detect, one Open Inference Protocol infer, non-root, health check, compose config, clean stop.
Skipped, with the reason, where no daemon answers (e.g. CI without Docker)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT

SKIP = 77  # scripts/image-test: nothing tried, no daemon


def _no_daemon() -> str | None:
    """Why no Docker daemon can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"no Docker daemon answers ({lines[-1] if lines else 'docker info failed'})"
    return None


def test_the_image_builds_runs_and_answers():
    reason = _no_daemon()
    if reason is not None:
        pytest.skip(f"image test not run: {reason}; `make image-test` runs it where a daemon answers")
    run = subprocess.run([str(ROOT / "scripts" / "image-test")], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    print(run.stdout)
    if run.returncode == SKIP:
        pytest.skip(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "image-test: PASS"
    for step in (
        "built ",
        "ready in",
        "/v1/detect: label 7",
        "/v1/model: detection from the stored graph",
        "no torch in the image",
        "OIP infer:",
        "runs as uid 10001",
        "health check: healthy",
    ):
        assert any(line.startswith(f"image-test: {step}") for line in lines), step
