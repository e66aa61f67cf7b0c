"""Where outputs go on a cluster (scale/places.py): defaults from the environment the cluster sets,
local places refused on a cluster that spans nodes or may grow, the headline command's early
checks, its ETA and its Ctrl-C line."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ray_mtt.core.config import Config
from ray_mtt.core.errors import UserError
from ray_mtt.scale import places
from tests.helpers import REPO, assert_one_line_error, run_in_process

pytest.importorskip("ray")
from ray_mtt.scale.experts_job import duration  # noqa: E402

AUTOSCALER = {"max_workers": 8, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 0}, "node_config": {}},
                                       "gpu_worker": {"min_workers": 0, "max_workers": 8,
                                                      "resources": {"CPU": 8, "GPU": 1}, "node_config": {}}}}


def test_the_cluster_environment_sets_the_default_store_and_tracking(monkeypatch, tmp_path):
    monkeypatch.delenv(places.STORAGE_ENV, raising=False)
    monkeypatch.delenv(places.TRACKING_ENV, raising=False)
    cfg = Config(run_dir=str(tmp_path))
    assert places.apply_storage_default(cfg).expert_dir == str(tmp_path / "digits" / "experts_convnet")
    assert places.default_tracking_uri(tmp_path).startswith("sqlite:///")
    monkeypatch.setenv(places.STORAGE_ENV, "s3://bucket/ray_mtt/")
    monkeypatch.setenv(places.TRACKING_ENV, "http://10.0.0.5:5000")
    cfg = Config()
    cfg.data.dataset, cfg.data.zca = "tiny_imagenet", True
    assert places.apply_storage_default(cfg).expert_dir == "s3://bucket/ray_mtt/tiny_imagenet/experts_convnet_zca"
    assert places.default_sweep_storage("runs") == "s3://bucket/ray_mtt/sweeps"
    assert places.default_tracking_uri("runs") == "http://10.0.0.5:5000"
    named = Config()
    named.experts.dir = "/mnt/experts"  # a flag still wins
    assert places.apply_storage_default(named).expert_dir == "/mnt/experts"


def test_a_head_whose_autoscaler_can_add_workers_counts_as_many_nodes(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not places.autoscaler_can_add_nodes()  # not a `ray up` head
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(AUTOSCALER))
    assert places.autoscaler_can_add_nodes()
    fixed = {**AUTOSCALER, "available_node_types": {"head": AUTOSCALER["available_node_types"]["head"],
                                                    "gpu_worker": {**AUTOSCALER["available_node_types"]["gpu_worker"],
                                                                   "max_workers": 0}}}
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(fixed))
    assert not places.autoscaler_can_add_nodes()


def test_local_places_and_file_tracking_are_refused_with_the_fix():
    places.check_shared({"sweep storage": "s3://b/sweeps"}, "http://10.0.0.5:5000")
    with pytest.raises(UserError, match="run `mlflow server` on the head.*RAY_MTT_TRACKING_URI"):
        places.check_shared({}, "sqlite:////home/ray/runs/mlflow.db")
    with pytest.raises(UserError, match="trajectory store /home/ray/runs/x is a local folder.*s3://BUCKET"):
        places.check_shared({"sweep storage": "s3://b/sweeps", "trajectory store": "/home/ray/runs/x"})


def test_eta_reads_as_a_person_would_say_it():
    assert [duration(s) for s in (45, 600, 5.5 * 3600, 197566.0 * 60)] == ["45 s", "10 min", "5.5 h", "137 days"]


def test_a_sweep_without_experts_says_so_before_reading_any_data(tmp_path, monkeypatch):
    """The store is checked before any file is read: the data folder here is empty (reading it would
    fail), and the one line is about the experts, in the store RAY_MTT_STORAGE names."""
    (tmp_path / "no_data_here").mkdir()
    monkeypatch.setenv(places.STORAGE_ENV, (tmp_path / "bucket").as_uri())
    result = run_in_process("tune", "--dataset", "mnist", "--data-dir", str(tmp_path / "no_data_here"),
                            "--run_dir", str(tmp_path))
    assert_one_line_error(result, f"no expert trajectories in {(tmp_path / 'bucket').as_uri()}/mnist/experts_convnet")


EXPERTS = [sys.executable, "-m", "ray_mtt.experts", "--dataset", "digits", "--address", "local", "--use-gpu", "no",
           "--device", "cpu", "--num-experts", "2"]


@pytest.mark.slow
def test_a_fresh_autoscaling_cluster_refuses_a_local_store(tmp_path):
    """A `ray up` head before any worker joined: one node, which sees its own disk; the autoscaler's
    config says workers may come, so the local store is refused instead of probed."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(AUTOSCALER))
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run([*EXPERTS, "--epochs", "2", "--run_dir", str(tmp_path / "runs")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "is a local folder, which other nodes", "RAY_MTT_STORAGE=s3://")


@pytest.mark.slow
def test_ctrl_c_says_what_was_saved_and_rerunning_resumes(tmp_path):
    run_dir = tmp_path / "runs"
    command = [*EXPERTS, "--epochs", "400", "--run_dir", str(run_dir)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from ray_mtt.core.trajectories import TrajectoryStore
    store = TrajectoryStore(str(run_dir / "digits" / "experts_convnet"))
    deadline = time.time() + 240
    while time.time() < deadline and not any(store.saved_epoch_count(k) > 2 for k in range(2)):
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    line = [x for x in stderr.splitlines() if x.startswith("interrupted: ")]
    assert job.returncode == 130 and len(line) == 1, stderr[-3000:]
    assert "0 of 2 experts complete, partial: #0" in line[0] and str(store.root) in line[0]
    assert "rerun the same command to resume" in line[0]
