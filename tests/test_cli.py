"""Every bad input a user can make gives one line naming the problem and the fix, exit code 2."""
import pickle
from pathlib import Path

import pytest

from ray_mtt.core.experts import train_experts
from tests.helpers import REPO, assert_one_line_error, run_cli, run_in_process, tiny_config

TINY = ["--model.width", "16", "--experts.num_experts", "1", "--experts.epochs", "3", "--distill.syn_steps", "2",
        "--distill.expert_epochs", "1", "--distill.max_start_epoch", "2", "--distill.iterations", "1",
        "--distill.eval_every", "0", "--distill.eval_runs", "1", "--eval.num_runs", "1", "--eval.epochs", "5",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def expert_run(tmp_path_factory):
    """One tiny digits expert, trained in-process; CLI calls point at its run dir."""
    tmp = tmp_path_factory.mktemp("cli")
    from ray_mtt.core.config import DataConfig
    from ray_mtt.core.data import load_dataset
    cfg = tiny_config(tmp)
    train_experts(cfg, load_dataset(DataConfig(dataset="digits")), progress=False)
    return tmp, ["--run_dir", cfg.run_dir, *TINY]


def test_unknown_dataset():
    assert_one_line_error(run_cli("ray_mtt.experts", "--dataset", "cifar11"), "unknown dataset 'cifar11'", "cifar10")


def test_unknown_model(tmp_path):
    assert_one_line_error(run_cli("ray_mtt.experts", "--model.name", "resnet50", "--run_dir", str(tmp_path)),
                          "unknown model 'resnet50'", "convnet")


def test_missing_data_dir(tmp_path):
    assert_one_line_error(run_cli("ray_mtt.experts", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope")),
                          "does not exist", "--data-dir")


def test_empty_and_malformed_data_dir(tmp_path):
    assert_one_line_error(run_cli("ray_mtt.experts", "--dataset", "cifar100", "--data-dir", str(tmp_path)),
                          "cifar100 not found", "--data.download true")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": [[1, 2, 3]], b"labels": [0]}))
    assert_one_line_error(run_cli("ray_mtt.experts", "--dataset", "cifar10", "--data-dir", str(tmp_path)),
                          "not a CIFAR batch")


def test_truncated_npz(tmp_path):
    """The first 5 kB of a real-layout cifar10.npz (a broken download) once ended in a BadZipFile traceback."""
    import numpy as np
    x = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "cifar10.npz", x_train=x, y_train=np.arange(100) % 10, x_test=x,
                        y_test=np.arange(100) % 10)
    (tmp_path / "cifar10.npz").write_bytes((tmp_path / "cifar10.npz").read_bytes()[:5000])
    assert_one_line_error(run_cli("ray_mtt.experts", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                                  "--engine", "local"), "cifar10.npz", "truncated or damaged, replace it")


def test_bad_config_values(tmp_path):
    assert_one_line_error(run_cli("ray_mtt.distill", "--distill.syn_steps", "-3"), "distill.syn_steps must be >= 1")
    assert_one_line_error(run_cli("ray_mtt.distill", "--distill.lr_img", "fast"), "cannot read 'fast' as float")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  n_steps: 3\n")
    assert_one_line_error(run_cli("ray_mtt.distill", "--config", str(bad)), "unknown key 'distill.n_steps'")


def test_distill_without_experts(tmp_path):
    assert_one_line_error(run_cli("ray_mtt.distill", "--run_dir", str(tmp_path), *TINY),
                          "no expert trajectories", "python -m ray_mtt.experts")


def test_trajectory_from_another_model(expert_run):
    _, args = expert_run
    assert_one_line_error(run_cli("ray_mtt.distill", *args, "--model.width", "32"), "width=16 (wanted 32)")


def test_experts_too_short_for_the_schedule(expert_run):
    _, args = expert_run
    assert_one_line_error(run_cli("ray_mtt.distill", *args, "--distill.max_start_epoch", "5"),
                          "has 3 epochs but", "--experts.epochs")


def test_ipc_larger_than_a_class(expert_run):
    _, args = expert_run
    assert_one_line_error(run_cli("ray_mtt.distill", *args, "--ipc", "1000"), "fewer than ipc=1000", "--ipc")


def test_corrupt_trajectory_file(expert_run, tmp_path):
    tmp, args = expert_run
    import shutil
    store = tmp_path / "store"
    shutil.copytree(tmp / "runs" / "digits" / "experts_convnet", store)
    npy = store / "expert_0000.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])
    assert_one_line_error(run_cli("ray_mtt.distill", *args, "--experts.dir", str(store),
                                  "--distill.out_dir", str(tmp_path / "out")),
                          "expert_0000.npy is partial or corrupt", "rerun `python -m ray_mtt.experts`")


def test_evaluate_missing_synthetic(tmp_path):
    assert_one_line_error(run_cli("ray_mtt.evaluate", "--synthetic", str(tmp_path / "x.pt")),
                          "not found", "python -m ray_mtt.distill")


@pytest.mark.parametrize("address, fragment", [("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1"),
                                               ("head-node", "is not HOST:PORT")])
def test_unreachable_ray_address_fails_in_seconds(tmp_path, address, fragment):
    pytest.importorskip("ray")
    result = run_in_process("experts", "--address", address, "--run_dir", str(tmp_path), *TINY)
    assert_one_line_error(result, fragment, "--address")


def test_help_lists_every_field_with_defaults():
    result = run_cli("ray_mtt.distill", "--help")
    assert result.returncode == 0
    for flag in ("--distill.syn_steps", "--distill.grad_mode", "--experts.epochs", "--eval.models", "--data.zca"):
        assert flag in result.stdout
    text = " ".join(result.stdout.split())  # argparse wraps help lines
    # Each flag's help is its field's comment in core/config.py, and shows the default.
    assert "N: student steps on the synthetic set per iteration (default: 20)" in text
    assert "conv channels of a ConvNet; 0 = the model's default (128); others take none (default: 0)" in text
    assert "How expert training reads the training split:" in text  # a comment above its field


def test_field_help_covers_every_config_field():
    import dataclasses

    from ray_mtt.core.config import SECTIONS, Config, field_help
    for section in [*SECTIONS, None]:
        cls = type(getattr(Config(), section)) if section else Config
        helps = field_help(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS and not helps.get(f.name)]
        assert missing == [], f"{cls.__name__} fields without a comment: {missing}"


@pytest.mark.slow
def test_a_dead_recorded_local_cluster_starts_a_fresh_one_instead_of_hanging(tmp_path):
    """A local Ray cluster that died uncleanly stays recorded in Ray's temp folder, and ray.init()
    then retried it for minutes; now the command says so and starts a fresh cluster."""
    import os
    import subprocess
    import sys
    import tempfile
    import time
    ray_tmp = tempfile.mkdtemp(prefix="rmtt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    (Path(ray_tmp) / "ray").mkdir()
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nobody answers there
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "ray_mtt.experts", "--run_dir", str(tmp_path), *TINY],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not answer: starting a fresh local one" in result.stdout
    assert "1 experts in" in result.stdout and time.time() - start < 180
