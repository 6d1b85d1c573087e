"""Fixtures of the deployment tests: the reliability script and the bundle the live tests serve."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ARTIFACTS, ROOT

BUNDLE = ARTIFACTS / "mnist-lenet5"  # the committed default bundle, what `pathguard serve` serves
SCRIPT = ROOT / "scripts" / "reliability.py"


def reliability_module() -> Any:
    """scripts/reliability.py as a module (Server, RedisServer, free_port, mnist_images...)."""
    spec = importlib.util.spec_from_file_location("pathguard_reliability", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def run_reliability(scenario: str, out_dir: Path, *args: str, timeout_s: float = 300) -> dict[str, Any]:
    """Run one scenario of scripts/reliability.py on the default bundle and return its figures."""
    out = out_dir / f"{scenario}.json"
    cmd = [sys.executable, str(SCRIPT), scenario, "--bundle", str(BUNDLE), "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{scenario} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures
