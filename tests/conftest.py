import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_mtt.config import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAY_MTT_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# The ffcv extra needs Debian libraries, so a plain `pip install -e '.[test]'` skips its tests;
# .ci/run installs it and sets RAY_MTT_REQUIRE_FFCV=1, so there a missing ffcv fails them instead.
HAS_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(not HAS_FFCV and not os.environ.get("RAY_MTT_REQUIRE_FFCV"),
                                reason="ffcv not installed: pip install -e '.[ffcv]' (see README)")


def tiny_config(tmp_path: Path, **sections) -> Config:
    """Digits (real, bundled), width 16, 1 expert of 3 epochs, N=3: seconds on a CPU."""
    cfg = Config(run_dir=str(tmp_path / "runs"), device="cpu")
    cfg.model.width = 16
    cfg.experts.num_experts, cfg.experts.epochs, cfg.experts.batch_size = 1, 3, 128
    d = cfg.distill
    d.syn_steps, d.expert_epochs, d.max_start_epoch, d.iterations, d.eval_every, d.eval_runs = 3, 1, 2, 4, 2, 1
    cfg.eval.num_runs, cfg.eval.epochs = 1, 20
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg.validate()


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def digits():
    from ray_mtt.data import load_dataset
    from ray_mtt.config import DataConfig
    return load_dataset(DataConfig(dataset="digits"))
