"""The algorithm layer must run on a box with only torch: importing it never loads ray or mlflow."""
import subprocess
import sys

from tests.conftest import REPO

CORE = ["config", "data", "augment", "models", "train", "trajectories", "experts", "distill", "evaluate",
        "pipeline", "bench"]


def test_core_modules_import_neither_ray_nor_mlflow():
    code = ("import sys\n" + "".join(f"import ray_mtt.{m}\n" for m in CORE) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
