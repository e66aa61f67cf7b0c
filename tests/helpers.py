"""What several test modules share: paths, the tiny config, CLI runs and their error checks, data writers."""
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_mtt.core.config import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAY_MTT_SHARED_DATA", REPO.parent / "shared" / "data"))

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


def run_in_process(command: str, *argv: str) -> subprocess.CompletedProcess:
    """A command run as `python -m ray_mtt.<command>` would run it (run_cli: one-line errors, exit
    codes), in this process: a program start costs seconds of torch and Ray imports."""
    import contextlib
    import io

    from ray_mtt.cli import run_command
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_command(command, list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([command, *argv], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, *fragments):
    """Exit code 2, one `error: ...` line on stderr naming each fragment, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_cifar10(root, n_per_batch=20):
    """The official cifar-10-batches-py/ pickles with random images; returns {file: (images, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (n_per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [i % 10 for i in range(n_per_batch)]
        batches[name] = (images, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images.reshape(n_per_batch, -1), b"labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def write_jpeg(path, color, size=(80, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def assert_store_complete(store, experts: int, epochs: int) -> dict[int, list[dict]]:
    """Experts 0..experts-1 finished, each with epochs + 1 rows that pass their checksums; returns
    each expert's per-epoch records."""
    assert store.completed() == list(range(experts))
    records = {}
    for k in store.completed():
        traj = store.open(k)
        assert traj.num_snapshots == epochs + 1
        for e in range(traj.num_snapshots):
            traj.snapshot(e)  # checks every row's CRC
        records[k] = traj.info["epochs"]
    return records
