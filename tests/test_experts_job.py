"""The Ray Train expert job on a local 3-node cluster (nodes of 1 CPU sharing one disk), with process
faults injected: a killed Ray Train worker, a killed driver. Losing a whole node, on nodes that share
nothing, is in test_cluster.py."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray starts; Ray 2.60 otherwise wants a token
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from ray_mtt.scale.experts_job import run_job  # noqa: E402
from ray_mtt.scale.options import JobResources  # noqa: E402
from ray_mtt.core.trajectories import TrajectoryStore  # noqa: E402
from tests.helpers import REPO, assert_store_complete, needs_ffcv, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # a 3-node Ray cluster and Ray Train jobs: minutes

EXPERTS, EPOCHS = 4, 4


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def job_config(tmp_path):
    # Small batches make an epoch last ~1 s, so a fault can land in the middle of an expert.
    return tiny_config(tmp_path, experts={"num_experts": EXPERTS, "epochs": EPOCHS, "batch_size": 16}).absolute_paths()


def train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def assert_complete_and_uncorrupted(store: TrajectoryStore) -> dict[int, list[dict]]:
    return assert_store_complete(store, EXPERTS, EPOCHS)


class FaultWhenMidExpert(threading.Thread):
    """Waits until some expert has saved epochs 0 and 1 but is unfinished, then calls `fault`."""

    def __init__(self, store: TrajectoryStore, fault):
        super().__init__(daemon=True)
        self.store, self.fault, self.at, self.saved_before = store, fault, None, {}

    def run(self):
        deadline = time.time() + 240
        while time.time() < deadline:
            partial = {k: self.store.saved_epochs(k) for k in range(EXPERTS) if k not in self.store.completed()}
            if any(len(saved) >= 2 for saved in partial.values()):
                self.saved_before = {k: saved for k, saved in partial.items() if saved}
                self.at = time.time()
                self.fault()
                return
            time.sleep(0.05)


def assert_saved_epochs_not_redone(epochs: dict[int, list[dict]], fault: FaultWhenMidExpert):
    assert fault.at is not None, "the fault was never injected"
    for k, saved in fault.saved_before.items():
        for before in saved:
            after = epochs[k][before["epoch"]]
            assert after.get("saved_at") == before.get("saved_at"), f"expert {k} epoch {before['epoch']} was redone"


def test_workers_train_experts_concurrently_and_survive_a_killed_worker(cluster, tmp_path):
    cfg = job_config(tmp_path)
    store = TrajectoryStore(cfg.expert_dir)
    fault = FaultWhenMidExpert(store, lambda: train_workers()[0].send_signal(signal.SIGKILL))
    fault.start()
    run_job(cfg, cluster.address, JobResources(workers=2, min_workers=2, max_failures=3))
    epochs = assert_complete_and_uncorrupted(store)
    assert_saved_epochs_not_redone(epochs, fault)
    # Two experts trained at once: their epoch-save windows overlap.
    spans = sorted((e[1]["saved_at"], e[-1]["saved_at"]) for e in epochs.values())
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:]))


@needs_ffcv
def test_workers_stream_experts_from_a_beton(cluster, tmp_path):
    from ray_mtt.core.beton import beton_file
    cfg = job_config(tmp_path)
    cfg.data.loader = "ffcv"
    run_job(cfg, cluster.address, JobResources(workers=2, min_workers=2, max_failures=0))
    assert_complete_and_uncorrupted(TrajectoryStore(cfg.expert_dir))
    assert [p.name for p in beton_file(cfg).parent.glob("*.beton")] == [beton_file(cfg).name]  # one file, no temps


def test_killed_driver_reruns_without_redoing_finished_experts(cluster, tmp_path):
    cfg = job_config(tmp_path)
    store = TrajectoryStore(cfg.expert_dir)
    command = [sys.executable, "-m", "ray_mtt.experts", "--address", cluster.address, "--workers", "2", "--min-workers", "2",
               "--model.width", "16", "--num-experts", str(EXPERTS), "--epochs", str(EPOCHS),
               "--experts.batch_size", "16", "--storage", cfg.expert_dir, "--run_dir", cfg.run_dir]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not store.completed() and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = {k: store.read_info(k) for k in store.completed()}
    assert 0 < len(finished) < EXPERTS, (tmp_path / "driver.log").read_text()[-3000:]
    while train_workers():  # the dead driver's workers are torn down by Ray
        time.sleep(0.2)
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{EXPERTS} experts in" in rerun.stdout
    epochs = assert_complete_and_uncorrupted(store)
    for k, info in finished.items():
        assert epochs[k] == info["epochs"], f"finished expert {k} was retrained"


class KillOnce(threading.Thread):
    """Kills the first process whose title names `task` (Ray titles a busy worker ray::<task>)."""

    def __init__(self, task: str):
        super().__init__(daemon=True)
        self.task, self.at = task, None

    def run(self):
        deadline = time.time() + 240
        while time.time() < deadline:
            for p in psutil.process_iter(["cmdline"]):
                if f"ray::{self.task}" in " ".join(p.info["cmdline"] or []):
                    time.sleep(0.5)  # into the network's training, not at its first line
                    p.send_signal(signal.SIGKILL)
                    self.at = time.time()
                    return
            time.sleep(0.05)


def test_pad_scored_gsam_experts_run_on_ray_through_killed_tasks_and_workers(cluster, tmp_path):
    """The experts command with FTD's optimizer and PAD's schedule on a cluster: EL2N scoring as
    Ray tasks (one killed mid-network: Ray reruns it), then GSAM experts on the schedule in the
    Ray Train job (a worker killed mid-expert: resumed from its last saved epoch). The scores equal
    one process's computation of the same streams; the store records the optimizer and schedule."""
    from ray_mtt.core.config import DataConfig
    from ray_mtt.core.data import load_dataset
    from ray_mtt.core.difficulty import SCORES, network_file, network_scores, read_npy
    from ray_mtt.core.experts import epoch_batches
    from ray_mtt.core.storage import open_storage
    import torch
    schedule = {"optimizer": "gsam", "gsam_rho": 0.05, "data_schedule": "pad", "schedule_aee": 1,
                "removal_epochs": [2], "removal_ratios": [0.2], "difficulty_networks": 2, "difficulty_epochs": 3}
    cfg = tiny_config(tmp_path, experts={"num_experts": EXPERTS, "epochs": EPOCHS, "batch_size": 16, **schedule})
    cfg = cfg.absolute_paths()
    flags = [f"--experts.{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in schedule.items()]
    command = [sys.executable, "-m", "ray_mtt.experts", "--address", cluster.address, "--workers", "2",
               "--min-workers", "2", "--max-failures", "3", "--model.width", "16", "--num-experts", str(EXPERTS),
               "--epochs", str(EPOCHS), "--experts.batch_size", "16", *flags, "--storage", cfg.expert_dir,
               "--run_dir", cfg.run_dir]
    store = TrajectoryStore(cfg.expert_dir)
    scoring_fault = KillOnce("score_network")
    expert_fault = FaultWhenMidExpert(store, lambda: train_workers()[0].send_signal(signal.SIGKILL))
    scoring_fault.start()
    expert_fault.start()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert scoring_fault.at is not None, "no scoring task was killed"
    storage = open_storage(cfg.expert_dir)
    nets = [read_npy(storage, network_file(k)) for k in range(2)]
    assert np.allclose(read_npy(storage, SCORES), (nets[0] + nets[1]) / 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the task ran (cpus_per_worker 1)
    try:
        data = load_dataset(DataConfig(dataset="digits"))
        alone = [network_scores(cfg, data, k, epoch_batches(cfg, data)) for k in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert all(np.allclose(net, one, atol=1e-5) for net, one in zip(nets, alone))  # the rerun task's too
    meta = store.read_meta()
    assert meta["optimizer"] == "gsam(rho=0.05, alpha=0.3)" and meta["data_schedule"].startswith("pad(ir=")
    assert_saved_epochs_not_redone(assert_complete_and_uncorrupted(store), expert_fault)
