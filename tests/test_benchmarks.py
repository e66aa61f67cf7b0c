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
