"""Every script in benchmarks/ still runs: RESULTS.md quotes their figures and tells readers to rerun them."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def test_the_benchmarks_folder_has_scripts():
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports_and_answers_help(script: Path):
    """Run as RESULTS.md runs it, from the repository root: every import resolves and --help exits 0."""
    result = subprocess.run([sys.executable, str(script.relative_to(REPO)), "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_compare_methods_pairs_each_row_with_mtts_network_of_the_same_index():
    """The paired column is the mean and population std of per-network differences, not of means."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from compare_methods import paired_table

    def row(*accs):
        return {"convnet": {"mean": sum(accs) / len(accs), "std": 0.0, "accs": list(accs)}}
    results = {"variants": {"mtt": {"rows": {"distilled": row(0.40, 0.44)}},
                            "mask": {"rows": {"distilled": row(0.41, 0.47)}}}}
    lines = paired_table(results).splitlines()
    assert lines[2] == "| mtt | distilled | 42.0 +- 0.0 % | +0.0 +- 0.0 |"
    assert lines[3] == "| mask | distilled | 44.0 +- 0.0 % | +2.0 +- 1.0 |"  # differences +1 and +3 points
    assert "| - |" in paired_table({"variants": {"mask": results["variants"]["mask"]}})  # no MTT row: no pairing
