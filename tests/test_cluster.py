"""The product on a cluster shaped like a real one (tests/cluster_bed.py): worker nodes that share no
disk with the driver or each other (their own /tmp, $HOME and Ray temp dir), token authentication,
jobs submitted through Ray's job API, trajectories and sweep state in S3, MLflow on PostgreSQL,
GPUs requested and waited for, nodes that join and die mid-job. Nothing here may pass by reading
a shared disk."""
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
from tests.cluster_bed import RAY  # noqa: E402
from tests.cluster_bed import BUCKET, S3Endpoint, SharedNothingCluster, TrackingServer  # noqa: E402
from tests.helpers import REPO, assert_store_complete, needs_ffcv, tiny_config  # noqa: E402

EXPERTS, EPOCHS = 4, 3
EVAL_EVERY = 4  # a sweep trial's validations, hence Tune checkpoints, every 4 iterations


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


def start_bed(tmp_path, env: dict, job_api: bool = False) -> SharedNothingCluster:
    private = tmp_path / "driver_only"
    write_small_mnist(private / "data")
    cluster = SharedNothingCluster(tmp_path, hidden=[private], env=env, job_api=job_api)
    cluster.private = private
    return cluster


@pytest.fixture
def bed(tmp_path, s3):
    cluster = start_bed(tmp_path, s3.env)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def tracking(tmp_path, s3):
    server = TrackingServer(tmp_path, s3)
    yield server
    server.stop()


def start_head(tmp_path, s3, tracking_uri: str | None = None) -> SharedNothingCluster:
    """A `ray up` head as cluster/aws.yaml makes it: the job API, and the places every command
    defaults to in its environment (the bucket; the head's MLflow server, when there is one)."""
    places = {"RAY_MTT_STORAGE": f"s3://{BUCKET}/ray_mtt", **({"RAY_MTT_TRACKING_URI": tracking_uri} if tracking_uri
                                                                else {})}
    return start_bed(tmp_path, {**s3.env, **places}, job_api=True)


@pytest.fixture
def head(tmp_path, s3, tracking):
    cluster = start_head(tmp_path, s3, tracking.uri)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def experts_head(tmp_path, s3):
    """A head for a job that records nothing in MLflow (the experts job)."""
    cluster = start_head(tmp_path, s3)
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


def tiny_flags(bed) -> list[str]:
    return ["--dataset", "mnist", "--data-dir", str(bed.private / "data"), "--data.val_per_class", "5",
            "--data.train_per_class", "60", "--model.width", "8", "--experts.batch_size", "16", "--device", "cpu",
            "--run_dir", str(bed.private / "runs")]


def test_a_submitted_experts_job_trains_on_workers_that_share_nothing_and_lands_in_the_bucket(experts_head, s3):
    head = experts_head
    """`ray job submit` with the token, and no --storage: the cluster's RAY_MTT_STORAGE puts the
    trajectories in the bucket. The workers see neither the data nor the driver's /tmp or $HOME.
    The experts are FTD's and PAD's (GSAM on an EL2N schedule), so PAD's scoring tasks run on those
    workers too and write their scores into the bucket beside the trajectories."""
    for _ in range(2):
        head.add_worker(cpus=1)
    marker = Path(tempfile.mkdtemp(dir="/tmp")) / "driver_tmp_file"
    marker.write_text("x")
    for path in (head.private / "data" / "mnist.npz", marker, head.token):
        assert path.exists() and not any(head.sees(path, node) for node in head.worker_node_ids()), path
    assert all(head.sees(Path("/tmp/home/.ray/auth_token"), n) for n in head.worker_node_ids())  # each its own
    no_token = subprocess.run([RAY, "job", "list", "--address", head.job_api], capture_output=True, text=True,
                              env={k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")})
    assert no_token.returncode != 0  # a client without the token is refused
    job = head.submit(sys.executable, "-m", "ray_mtt.experts", *tiny_flags(head), "--num-experts", str(EXPERTS),
                      "--epochs", str(EPOCHS), "--workers", "2", "--min-workers", "2", "--use-gpu", "no",
                      "--experts.optimizer", "gsam", "--experts.data_schedule", "pad", "--experts.schedule_aee", "1",
                      "--experts.removal_epochs", "1", "--experts.removal_ratios", "0.2",
                      "--experts.difficulty_networks", "2", "--experts.difficulty_epochs", "1")
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0 and "succeeded" in output, output[-3000:]
    assert "EL2N scoring: 2 of 2 networks" in output
    store = TrajectoryStore(f"s3://{BUCKET}/ray_mtt/mnist/experts_convnet")
    assert overlapping(assert_complete(store))
    assert store.read_meta()["optimizer"].startswith("gsam(") and store.read_meta()["data_schedule"].startswith("pad(")
    keys = s3.keys("ray_mtt/mnist/experts_convnet/")
    assert any(k.startswith("ray_mtt/mnist/experts_convnet/_ray/") for k in keys)
    scores = {f"ray_mtt/mnist/experts_convnet/difficulty/{name}.npy" for name in ("el2n_net000", "el2n_net001", "el2n")}
    assert scores <= set(keys)
    assert not list(head.private.glob("**/expert_*"))  # nothing written to the driver's disk


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


def sweep_flags(bed, *extra) -> list[str]:
    return [*tiny_flags(bed), "--experts.num_experts", "2", "--experts.epochs", "3", "--distill.syn_steps", "2",
            "--distill.iterations", "40", "--distill.eval_every", str(EVAL_EVERY), "--distill.eval_runs", "1",
            "--eval.num_runs", "1", "--eval.epochs", "5", "--space", "distill.expert_epochs=1", "--space",
            "distill.max_start_epoch=choice:1,2", "--eval-models", "convnet,alexnet", "--name", "bed", *extra]


def checkpoints_per_trial(s3) -> dict[str, int]:
    """Tune checkpoints in the bucket so far, per trial folder (one per validation)."""
    seen = {tuple(k.split("/")[3:5]) for k in s3.keys("ray_mtt/sweeps/bed/") if "/checkpoint_" in k}
    return {trial: sum(1 for t, _ in seen if t == trial) for trial, _ in seen}


def two_trials_mid_run(s3) -> bool:
    """Two trials have saved a checkpoint and neither is near its end (10 validations each)."""
    return sum(1 <= n <= 5 for n in checkpoints_per_trial(s3).values()) >= 2


def test_a_submitted_sweep_on_nodes_that_share_nothing_survives_losing_one(head, s3, tracking):
    """The headline command with no place flags, submitted as a job: experts, Tune state and trial
    checkpoints go to the bucket, records to the head's server (PostgreSQL). A node is killed while
    both trials run: its trial can only resume from its checkpoint in the bucket (the node's /tmp
    died with it), so a broken restore shows as a trial that starts over."""
    nodes = [head.add_worker(cpus=1) for _ in range(2)]
    # A file tracking store on a multi-node cluster is refused before anything runs.
    refused = subprocess.run([sys.executable, "-m", "ray_mtt.tune", "--address", head.address,
                              *sweep_flags(head, "--make-experts", "--tracking-uri",
                                           f"sqlite:///{head.private}/mlflow.db")],
                             cwd=REPO, env=head.env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "run `mlflow server` on the head" in refused.stderr, refused.stderr[-2000:]
    sweep = head.submit(sys.executable, "-m", "ray_mtt.tune", *sweep_flags(head, "--num-samples", "3", "--no-asha",
                                                                           "--make-experts", "--max-concurrent", "2"))
    deadline = time.time() + 600
    while not two_trials_mid_run(s3) and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.5)
    assert two_trials_mid_run(s3), f"two trials never ran at once: {checkpoints_per_trial(s3)}"
    nodes[0].kill()  # mid-trial: the sweep must finish on the node that is left
    output, _ = sweep.communicate(timeout=1200)
    assert sweep.returncode == 0 and "best trial" in output, output[-4000:]
    client = MlflowClient(tracking.uri)
    check_tracked(client, s3)
    tracking.restart()  # a second `ray up` restarts the head's server: every record is still there
    check_tracked(MlflowClient(tracking.uri), s3)
    assert restored_trials(s3), "no trial was restored after the node died"
    assert not (head.private / "runs" / "tune" / "bed" / "trials").exists()  # no trial wrote the driver's disk


def restored_trials(s3) -> list[str]:
    """Trials whose Tune record counts a failure (they were restarted from their checkpoint)."""
    import json
    states = [k for k in s3.keys("ray_mtt/sweeps/bed/") if k.rsplit("/", 1)[-1].startswith("experiment_state")]
    body = s3.s3.get_object(Bucket=BUCKET, Key=sorted(states)[-1])["Body"].read()
    trials = json.loads(body)["trial_data"]
    failures = {json.loads(state)["trial_id"]: json.loads(runtime).get("num_failures") for state, runtime in trials}
    print(f"failures per trial: {failures}")
    return [trial for trial, count in failures.items() if count]


def check_tracked(client, s3) -> None:
    experiment = client.get_experiment_by_name("ray_mtt")
    parent, = client.search_runs([experiment.experiment_id], filter_string="tags.`ray_mtt.kind` = 'sweep'")
    kids = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    for kid in kids:  # a restored trial redoes at most the iterations since its last checkpoint
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "loss")]
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        assert len(repeated) <= EVAL_EVERY and all(s >= EVAL_EVERY for s in repeated), (
            f"trial run {kid.info.run_id} started over: iterations {repeated} logged twice")
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
    with pytest.raises(UserError, match="1 of 2 nodes cannot see; pass --storage s3://"):  # the head sees it
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
    env = bed.env
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
