"""The product on a cluster shaped like a real one (tests/cluster_bed.py): worker nodes that cannot
see the driver's data or run folders, trajectories and sweep state in S3, GPUs requested and
waited for, nodes that join and die mid-job. Nothing here may pass by reading a shared disk."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,  # a Ray cluster of real nodes per test: minutes
    # Worker nodes mount a tmpfs in their own mount namespace; CI runs as root, as the bed needs.
    pytest.mark.skipif(os.geteuid() != 0, reason="the cluster test bed needs root (unshare -m, mount)"),
]
ray = pytest.importorskip("ray")
pytest.importorskip("moto")
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from ray_mtt.core.errors import UserError  # noqa: E402
from ray_mtt.core.trajectories import TrajectoryStore  # noqa: E402
from ray_mtt.scale.experts_job import run_job  # noqa: E402
from ray_mtt.scale.options import JobResources  # noqa: E402
from tests.cluster_bed import BUCKET, S3Endpoint, SharedNothingCluster, free_port  # noqa: E402
from tests.helpers import REPO, assert_store_complete, needs_ffcv, tiny_config  # noqa: E402

EXPERTS, EPOCHS = 4, 3


def write_small_mnist(folder):
    """scikit-learn's real 8x8 digits, upscaled to MNIST's 28x28, as <folder>/mnist.npz: a dataset that
    exists only on the driver's disk (digits itself ships with the package on every node)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = np.kron(np.round(digits.images * 255 / 16), np.ones((3, 3)))  # 24x24
    x = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.uint8)[..., None]
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "mnist.npz", x_train=x[:1500], y_train=digits.target[:1500],
                        x_test=x[1500:], y_test=digits.target[1500:], classes=np.array([str(i) for i in range(10)]))


@pytest.fixture
def s3():
    endpoint = S3Endpoint()
    saved = {k: os.environ.get(k) for k in endpoint.env}
    os.environ.update(endpoint.env)  # the driver's credentials, as on the head node
    yield endpoint
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    endpoint.stop()


@pytest.fixture
def bed(tmp_path, s3):
    private = tmp_path / "driver_only"
    write_small_mnist(private / "data")
    cluster = SharedNothingCluster(tmp_path, hidden=[private], env=s3.env)
    cluster.private = private
    yield cluster
    cluster.shutdown()


def expert_config(bed, prefix="experts", train_per_class=60, experts=EXPERTS):
    cfg = tiny_config(bed.private, data={"dataset": "mnist", "data_dir": str(bed.private / "data"),
                                         "val_per_class": 5, "train_per_class": train_per_class},
                      experts={"num_experts": experts, "epochs": EPOCHS, "batch_size": 16,
                               "dir": f"s3://{BUCKET}/{prefix}"})
    cfg.model.width = 8
    return cfg.absolute_paths()


def assert_complete(store: TrajectoryStore, experts: int = EXPERTS) -> dict[int, list[dict]]:
    return assert_store_complete(store, experts, EPOCHS)


def overlapping(epochs: dict[int, list[dict]]) -> bool:
    """Whether two experts trained at the same time (their epoch-save windows overlap)."""
    spans = sorted((e[1]["saved_at"], e[-1]["saved_at"]) for e in epochs.values())
    return any(a[1] > b[0] for a, b in zip(spans, spans[1:]))


def test_experts_train_on_workers_that_cannot_see_the_data_and_land_in_s3(bed, s3):
    for _ in range(2):
        bed.add_worker(cpus=1)
    assert os.path.exists(bed.private / "data" / "mnist.npz")
    assert not any(bed.sees(bed.private / "data" / "mnist.npz", node) for node in bed.worker_node_ids())
    cfg = expert_config(bed)
    store = run_job(cfg, bed.address, JobResources(workers=2, min_workers=2, use_gpu="no"))
    assert overlapping(assert_complete(store))
    keys = s3.keys("experts/")
    assert "experts/expert_0003.npy" in keys and any(k.startswith("experts/_ray/") for k in keys)
    assert not list(bed.private.glob("**/expert_*"))  # nothing written to the driver's disk


def gpu_requests() -> list[dict]:
    """What the cluster has been asked for and cannot place, with a GPU in it: Ray Train's elastic
    request to the autoscaler (ray.autoscaler.sdk.request_resources, kept in Ray's KV store) and any
    placement group still pending."""
    import json

    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get
    requested = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")
    pending = [b for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"
               for b in g["bundles"].values()]
    return [b for b in requested + pending if b.get("GPU", 0) > 0]


def wait_for_a_pending_gpu_request(timeout_s: float = 180) -> None:
    """The event the test waits on: the job has asked Ray for GPUs that this cluster does not have.
    A job that asked for none would never show one, and this fails."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ray.is_initialized() and gpu_requests():
            return
        time.sleep(0.5)
    pytest.fail(f"the job asked Ray for no GPU within {timeout_s:.0f} s")


def test_the_job_asks_for_gpus_waits_for_them_and_grows_as_nodes_join(bed):
    # 24 experts on all ~1,450 training images: the job outlasts a node's arrival, Ray Train's resize
    # check and the restart that follows, on an idle machine too (12 finished before the resize there).
    cfg = expert_config(bed, train_per_class=0, experts=24)
    store = TrajectoryStore(cfg.expert_dir)
    errors = []

    def job():
        try:
            run_job(cfg, bed.address, JobResources(workers=2, min_workers=1, use_gpu="yes", resize_check_s=2))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    wait_for_a_pending_gpu_request()  # the event: Ray holds the job's GPU bundle, unplaceable on this cluster
    assert not store.completed() and not store.saved_epoch_count(0), "trained without a GPU node"
    bed.add_worker(cpus=1, gpus=1)
    deadline = time.time() + 120
    while not store.saved_epoch_count(0) > 1 and time.time() < deadline:
        time.sleep(0.2)
    bed.add_worker(cpus=1, gpus=1)  # a second GPU node joins mid-job
    joined = time.time()
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors
    epochs = assert_complete(store, 24)
    assert min(e[-1]["saved_at"] for e in epochs.values()) < joined  # it started on the first node alone
    assert overlapping(epochs), "the job never grew to the second GPU node"


def test_losing_a_node_mid_expert_loses_at_most_the_epoch_in_flight(bed):
    nodes = [bed.add_worker(cpus=1) for _ in range(2)]
    cfg = expert_config(bed, train_per_class=0)  # epochs long enough for the watcher to strike mid-expert
    store = TrajectoryStore(cfg.expert_dir)
    saved_before, killed = {}, threading.Event()

    def kill_when_mid_expert():
        deadline = time.time() + 240
        while time.time() < deadline:
            partial = {k: store.saved_epochs(k) for k in store.unfinished(EXPERTS)}
            if any(len(saved) >= 2 for saved in partial.values()):
                saved_before.update({k: s for k, s in partial.items() if s})
                nodes[0].kill()
                killed.set()
                return
            time.sleep(0.05)

    threading.Thread(target=kill_when_mid_expert, daemon=True).start()
    run_job(cfg, bed.address, JobResources(workers=2, min_workers=1, use_gpu="no", max_failures=3))
    assert killed.is_set()
    epochs = assert_complete(store)
    for k, saved in saved_before.items():
        for before in saved:
            assert epochs[k][before["epoch"]].get("saved_at") == before.get("saved_at"), f"expert {k} redid an epoch"


def mlflow_server(tmp_path, s3) -> tuple[subprocess.Popen, str]:
    """An MLflow server as on the head node: runs in a sqlite file on its disk, artifacts in the bucket."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
                               f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env={**os.environ, **s3.env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                return server, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not answer /health in 120 s")


def sweep_command(bed, *extra) -> list[str]:
    private = bed.private
    return [sys.executable, "-m", "ray_mtt.tune", "--address", bed.address, "--run_dir", str(private / "runs"),
            "--dataset", "mnist", "--data-dir", str(private / "data"), "--data.val_per_class", "5",
            "--data.train_per_class", "60", "--model.width", "8", "--experts.dir", f"s3://{BUCKET}/experts",
            "--experts.num_experts", "2", "--experts.epochs", "3", "--experts.batch_size", "16",
            "--distill.syn_steps", "2", "--distill.iterations", "8", "--distill.eval_every", "2",
            "--distill.eval_runs", "1", "--eval.num_runs", "1", "--eval.epochs", "5", "--device", "cpu",
            "--space", "distill.expert_epochs=1", "--space", "distill.max_start_epoch=choice:1,2",
            "--eval-models", "convnet,alexnet", "--name", "bed", *extra]


def test_a_sweep_on_nodes_that_share_nothing_survives_losing_one(bed, s3, tmp_path):
    nodes = [bed.add_worker(cpus=1) for _ in range(2)]
    env = {**os.environ, **s3.env, "RAY_AUTH_MODE": "disabled"}
    # A file tracking store on a multi-node cluster is refused before anything runs.
    refused = subprocess.run(sweep_command(bed, "--num-samples", "1", "--storage", f"s3://{BUCKET}/sweeps"),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "run `mlflow server` on the head" in refused.stderr, refused.stderr[-2000:]
    server, uri = mlflow_server(tmp_path, s3)
    try:
        sweep = subprocess.Popen(sweep_command(bed, "--num-samples", "3", "--make-experts", "--max-concurrent", "2",
                                               "--storage", f"s3://{BUCKET}/sweeps", "--tracking-uri", uri),
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while not any("checkpoint_" in k for k in s3.keys("sweeps/bed/")) and time.time() < deadline:
            time.sleep(0.5)
        nodes[0].kill()  # mid-trial: the sweep must finish on the node that is left
        output, _ = sweep.communicate(timeout=900)
        assert sweep.returncode == 0, output[-4000:]
        assert "best trial" in output
        check_tracked(MlflowClient(uri), s3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert any(k.endswith("experiment_state.json") or "experiment_state" in k for k in s3.keys("sweeps/bed/"))
    assert not (bed.private / "runs" / "tune" / "bed" / "trials").exists()  # no trial wrote the driver's disk


def check_tracked(client, s3) -> None:
    experiment = client.get_experiment_by_name("ray_mtt")
    parent, = client.search_runs([experiment.experiment_id], filter_string="tags.`ray_mtt.kind` = 'sweep'")
    kids = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    best = parent.data.tags["ray_mtt.best_trial_run_id"]
    assert "alexnet" in open(client.download_artifacts(best, "accuracy_by_architecture.json")).read()
    keys = s3.keys("mlflow/")
    assert any(k.endswith("distilled/best.pt") for k in keys)  # artifacts landed in the bucket
    assert any("/synthetic/" in k and k.endswith(".png") for k in keys)


def test_a_local_store_that_workers_cannot_see_is_a_one_line_error(bed):
    bed.add_worker(cpus=1)
    cfg = expert_config(bed)
    cfg.experts.dir = str(bed.private / "experts")  # the driver's disk, hidden from the worker
    with pytest.raises(UserError, match="1 of 1 nodes cannot see; pass --storage s3://"):
        run_job(cfg, bed.address, JobResources(use_gpu="no"))


@needs_ffcv
def test_a_beton_written_once_reaches_workers_through_the_bucket(bed, s3):
    bed.add_worker(cpus=1)
    cfg = expert_config(bed, prefix="beton_experts")
    cfg.data.loader = "ffcv"
    store = run_job(cfg, bed.address, JobResources(workers=1, use_gpu="no"))
    assert_complete(store)
    assert [k for k in s3.keys("beton_experts/_data/") if k.endswith(".beton")]


def test_a_dead_node_under_a_job_out_of_retries_is_one_line_and_rerunning_resumes(bed, s3):
    """The node dies (as under Ray's memory monitor or a lost raylet) with no restarts left: the
    command ends in one line saying what happened and how to resume, not a Ray traceback."""
    node = bed.add_worker(cpus=1)
    cfg = expert_config(bed, prefix="dead_node")
    store = TrajectoryStore(cfg.expert_dir)
    command = [sys.executable, "-m", "ray_mtt.experts", "--address", bed.address, "--max-failures", "0",
               "--use-gpu", "no", "--dataset", "mnist", "--data-dir", cfg.data.data_dir,
               "--data.val_per_class", "5", "--data.train_per_class", "60", "--model.width", "8",
               "--num-experts", str(EXPERTS), "--epochs", str(EPOCHS), "--experts.batch_size", "16",
               "--storage", cfg.expert_dir, "--run_dir", cfg.run_dir, "--device", "cpu"]
    env = {**os.environ, **s3.env, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not any(store.saved_epoch_count(k) > 1 for k in range(EXPERTS)) and time.time() < deadline:
        time.sleep(0.1)
    node.kill()
    _, stderr = driver.communicate(timeout=600)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert driver.returncode == 2 and len(lines) == 1, stderr[-3000:]
    assert "rerun the same command to resume" in lines[0] and "Traceback" not in stderr
    bed.add_worker(cpus=1)
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_complete(store)
