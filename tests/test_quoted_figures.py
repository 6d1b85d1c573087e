"""Figures the docs quote come from committed files of the committed bundles: the 10,000-image clean FPRs of
README's bundle table are `pathguard score --json` outputs beside each report, taken on the verdict as committed."""

from __future__ import annotations

import json
import re

import pytest

from pathguard.models.bundle import bundle_sha256, verdict_sha256
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
    assert written["verdict_sha256"] == verdict_sha256(ARTIFACTS / "mnist-lenet5")
    assert written["n"] == 300 and written["split"] == "test" and written["target_fpr"] == 0.05
    assert 0.0 <= written["flagged_rate"] <= 0.15 and written["accuracy"] > 0.97


@pytest.mark.parametrize("bundle", BUNDLES)
def test_readme_clean_fprs_are_the_committed_score_files_of_the_committed_bundles(bundle):
    path = REPORTS / bundle / "clean-fpr.json"
    assert path.is_file(), f"run `pathguard score artifacts/{bundle} --json {path.relative_to(ROOT)}`"
    figures = json.loads(path.read_text())
    # the flagged rate and accuracy are the verdict's: pinned to the verdict id (a refit of a reported component or
    # a stored graph keeps them; the file names the bundle build it was taken on too)
    assert figures["verdict_sha256"] == verdict_sha256(ARTIFACTS / bundle), (
        f"{path.relative_to(ROOT)} was taken on another verdict than artifacts/{bundle}'s: rerun "
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


_BUDGET_NAMES = {"Linf 2/255": "linf_2", "Linf 4/255": "linf_4", "Linf 8/255": "linf_8", "L2 0.5": "l2_0.5",
                 "L2 1.0": "l2_1.0", "Linf 0.3": "linf_0.3"}  # fmt: skip


@pytest.mark.parametrize(("bundle", "label"), [("cifar10-resnet20", "residual CIFAR-10"), ("mnist-lenet5", "MNIST")])
def test_the_threat_models_figures_are_the_adaptive_reports(bundle, label):
    """README's threat-model table quotes the committed adaptive reports of the committed bundles' verdicts: the
    report names the verdict id it was taken on (a rebuild that leaves the verdict alone keeps it)."""
    report = json.loads((REPORTS / f"{bundle}-adaptive" / "report.json").read_text())
    assert report["bundle"]["verdict_sha256"] == verdict_sha256(ARTIFACTS / bundle), (
        f"the adaptive report was taken on another verdict than artifacts/{bundle}'s: rerun it (docs/reports/README.md)"
    )
    assert report["images"]["n"] >= 100
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Threat model") : readme.index("What that means:")]
    rows = [r for r in table.splitlines() if r.startswith(f"| {label}")]
    quoted = 0
    for row in rows:
        _, attack, oblivious, adaptive = (c.strip() for c in row.strip("|").split("|"))
        if attack.startswith("PGD "):
            for budget in attack.removeprefix("PGD ").split(", "):
                cell = report["pgd"]["fused"][_BUDGET_NAMES[budget]]
                assert oblivious == f"{cell['oblivious']['success']:.0%}", row
                assert adaptive == f"{cell['adaptive']['success']:.0%}", row
                quoted += 1
        elif attack == "CW-L2":
            cw = report["cw_l2"]
            assert oblivious.startswith(f"{cw['oblivious']['success']:.0%} ("), row
            assert f"{cw['oblivious']['mean_l2_of_misclassified']:.2f}" in oblivious, row
            assert adaptive.startswith(f"{cw['fused']['success']:.0%} ("), row
            assert f"{cw['fused']['l2_over_oblivious']:.2f}x" in adaptive, row
            quoted += 1
    assert quoted >= 6
