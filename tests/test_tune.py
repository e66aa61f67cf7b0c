"""Real Ray Tune sweeps on tiny digits trials; the MLflow store is read back with MlflowClient."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import REPO, assert_one_line_error, run_cli

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

TINY = ["--model.width", "16", "--experts.num_experts", "1", "--experts.epochs", "3", "--distill.syn_steps", "2",
        "--distill.iterations", "4", "--distill.eval_every", "2", "--distill.eval_runs", "1",
        "--eval.num_runs", "1", "--eval.epochs", "5", "--device", "cpu", "--max-concurrent", "2",
        "--space", "distill.expert_epochs=1", "--space", "distill.max_start_epoch=choice:1,2"]


def sweep(run_dir, *extra, **kwargs):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "ray_mtt.tune", "--run_dir", str(run_dir), *TINY, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env, **kwargs)


def children(client, parent):
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def check_store(client, expected_children):
    parents = client.search_runs([client.get_experiment_by_name("ray_mtt").experiment_id],
                                 filter_string="tags.`ray_mtt.kind` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    kids = children(client, parent)
    assert len(kids) == expected_children
    for kid in kids:
        steps = sorted(m.step for m in client.get_metric_history(kid.info.run_id, "loss"))
        assert steps == list(range(len(steps)))  # every iteration once, no replays
        early = kid.data.tags["ray_mtt.early_stopped"] == "true"
        assert (len(steps) == 4 and not early) or (early and 2 <= len(steps) < 4)  # ASHA's grace period: 2
        assert client.get_run(kid.info.run_id).info.status == "FINISHED"
        assert client.get_metric_history(kid.info.run_id, "val_acc")
        files = {f.path for f in client.list_artifacts(kid.info.run_id, "synthetic")}
        assert "synthetic/iter_000000.png" in files
        assert {f.path for f in client.list_artifacts(kid.info.run_id, "distilled")} == {"distilled/best.pt"}
    best_id = parent.data.tags["ray_mtt.best_trial_run_id"]
    table = client.download_artifacts(best_id, "accuracy_by_architecture.json")
    text = open(table).read()
    for model in ("convnet", "resnet18", "alexnet"):
        assert model in text
    assert "test accuracy" in client.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
    # The sweep's summary is its trials' own: the best and worst of what each child run recorded.
    per_trial = [kid.data.metrics["best_val_acc"] for kid in kids]
    assert parent.data.metrics["best_val_acc"] == pytest.approx(max(per_trial))
    assert parent.data.metrics["worst_val_acc"] == pytest.approx(min(per_trial))
    assert client.get_run(best_id).data.metrics["best_val_acc"] == pytest.approx(max(per_trial))


@pytest.mark.slow
def test_sweep_tracks_parent_children_metrics_images_tensors_and_table(tmp_path):
    # ZCA on: the driver fits it once and the trials and the final scoring receive it.
    result = sweep(tmp_path, "--num-samples", "2", "--make-experts", "--data.zca", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best trial" in result.stdout and "skipping vgg11" in result.stdout
    check_store(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), 2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sweep_logs_to_a_real_mlflow_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                               str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health in 60 s")
        result = sweep(tmp_path, "--num-samples", "2", "--make-experts", "--tracking-uri", uri)
        assert result.returncode == 0, result.stderr[-3000:]
        check_store(MlflowClient(uri), 2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_losing_finished_trials(tmp_path):
    args = [sys.executable, "-m", "ray_mtt.tune", "--run_dir", str(tmp_path), *TINY, "--num-samples", "3",
            "--make-experts", "--no-asha"]
    args[args.index("--max-concurrent") + 1] = "1"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    storage = tmp_path / "tune" / "ray" / "digits_ipc1"  # Tune's state and the trials' checkpoints
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        trials = [t for t in storage.glob("*") if t.is_dir()] if storage.is_dir() else []
        if len(trials) >= 2 and any(storage.glob("*/checkpoint_*/checkpoint.pt")):  # one trial is under way
            break
        time.sleep(0.5)
    assert proc.poll() is None, "sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2 and "--resume" in output.strip().splitlines()[-1], output[-2000:]
    result = sweep(tmp_path, "--num-samples", "3", "--no-asha", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    check_store(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), 3)


def test_bad_sweep_inputs_are_one_line_errors(tmp_path, capsys):
    """The first case as the program a user runs; the rest in process (each program start costs
    Python, torch and Ray imports), through the same run_cli that turns an error into one line."""
    from ray_mtt.cli.common import run_cli as run_main
    from ray_mtt.cli.tune import main
    cases = [
        (["--dataset", "imagenet21k"], "unknown dataset 'imagenet21k'; known:"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere")], "data dir"),
        ([], "no expert trajectories"),
        (["--space", "distill.lr_img=loguniform:10"], "bad range"),
        (["--space", "distill.n_steps=choice:1,2"], "unknown key 'distill.n_steps'"),
    ]
    assert_one_line_error(run_cli("ray_mtt.tune", "--run_dir", str(tmp_path), *cases[0][0]), cases[0][1])
    for argv, fragment in cases[1:]:
        with pytest.raises(SystemExit) as stopped:
            run_main(main, ["--run_dir", str(tmp_path), *argv])
        stderr = capsys.readouterr().err
        assert stopped.value.code == 2 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith("error: ") and fragment in stderr.strip(), stderr
