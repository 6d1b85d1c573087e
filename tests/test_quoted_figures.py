"""Figures the docs quote come from committed files of the committed bundles: the 10,000-image clean FPRs of
README's bundle table are `pathguard score --json` outputs beside each report, taken on the bundle as committed."""

from __future__ import annotations

import json
import re

import pytest

from pathguard.models.bundle import bundle_sha256
from pathguard.service.cli import main
from tests.conftest import ARTIFACTS, ROOT

BUNDLES = ("mnist-lenet5", "cifar10-cnn", "cifar10-resnet20")
REPORTS = ROOT / "docs" / "reports"


def test_score_json_writes_the_figures_with_the_bundle_id(tmp_path, capsys):
    out = tmp_path / "deep" / "clean-fpr.json"
    assert main(["score", str(ARTIFACTS / "mnist-lenet5"), "--n", "300", "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert written == printed
    assert written["bundle_sha256"] == bundle_sha256(ARTIFACTS / "mnist-lenet5")
    assert written["n"] == 300 and written["split"] == "test" and written["target_fpr"] == 0.05
    assert 0.0 <= written["flagged_rate"] <= 0.15 and written["accuracy"] > 0.97


@pytest.mark.parametrize("bundle", BUNDLES)
def test_readme_clean_fprs_are_the_committed_score_files_of_the_committed_bundles(bundle):
    path = REPORTS / bundle / "clean-fpr.json"
    assert path.is_file(), f"run `pathguard score artifacts/{bundle} --json {path.relative_to(ROOT)}`"
    figures = json.loads(path.read_text())
    assert figures["bundle_sha256"] == bundle_sha256(ARTIFACTS / bundle), (
        f"{path.relative_to(ROOT)} was taken on another build of artifacts/{bundle}: rerun "
        f"`pathguard score artifacts/{bundle} --json {path.relative_to(ROOT)}` and update the quoted figures"
    )
    assert figures["n"] == 10000 and figures["split"] == "test"
    row = next(
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| `artifacts/{bundle}`")
    )
    quoted = re.search(
        r"\| ([0-9.]+)% of 10,000 \(\[json\]\(docs/reports/" + re.escape(bundle) + r"/clean-fpr\.json\)\)", row
    )
    assert quoted, row
    assert float(quoted.group(1)) == pytest.approx(100 * figures["flagged_rate"], abs=0.005)
