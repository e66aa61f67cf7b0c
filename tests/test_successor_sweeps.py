"""Sweeping the successors' settings: expert settings give each trial its own store; MLflow records them."""
import pytest

from ray_mtt.core.config import Config
from tests.helpers import tiny_config

pytest.importorskip("ray")


def test_each_combination_of_swept_expert_settings_gets_and_trains_its_own_store(tmp_path, digits):
    from ray_mtt.core.distill import distill
    from ray_mtt.core.trajectories import TrajectoryStore
    from ray_mtt.scale.tune import parse_space, swept_experts, train_trial_experts, trial_store
    cfg = tiny_config(tmp_path, experts={"optimizer": "gsam", "gsam_rho": 0.05})
    space = parse_space(["experts.gsam_rho=choice:0.01,0.05", "experts.gsam_alpha=uniform:0.1:1",
                         "distill.mask_ratio=uniform:0:0.5", "distill.ema=choice:0,0.99"], cfg)
    swept = swept_experts(space)
    assert swept == ["experts.gsam_alpha", "experts.gsam_rho"]
    other = Config(run_dir=cfg.run_dir)
    other.experts.optimizer, other.experts.gsam_rho = "gsam", 0.01
    assert trial_store(cfg, swept) != trial_store(other, swept)
    assert trial_store(cfg, swept).endswith("__gsam_alpha=0.3,gsam_rho=0.05")
    train_trial_experts(cfg, digits, swept)
    store = TrajectoryStore(cfg.experts.dir)
    assert store.completed() == [0] and store.read_meta()["optimizer"] == "gsam(rho=0.05, alpha=0.3)"
    distill(cfg, digits, progress=False)  # the trial distills from its own store


def test_mlflow_records_the_successors_settings_label_entropy_and_threshold_skips(tmp_path, digits):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from ray_mtt.core.distill import distill
    from ray_mtt.core.experts import train_experts
    from ray_mtt.scale.tracking import TrackedRun
    cfg = tiny_config(tmp_path, experts={"epochs": 10, "lr": 0.05},
                      distill={"soft_labels": True, "loss_threshold": 1e-9, "mask_ratio": 0.25, "ema": 0.9,
                               "iterations": 2, "eval_every": 1})
    train_experts(cfg, digits, progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = TrackedRun(uri, cfg, "successors")
    result = distill(cfg, digits, reporter=tracked.reporter(digits, cfg.distill.ipc), progress=False)
    from ray_mtt.core.evaluate import load_synthetic, score_with_baseline
    cfg.eval.epochs = 2
    rows = score_with_baseline(load_synthetic(result["best"], "cpu"), cfg, digits)  # hard-label row included
    tracked.finish(rows, {"best_val_acc": result["val_acc"]})
    client = MlflowClient(uri)
    run = client.get_run(tracked.run_id)
    assert {"test_acc/distilled/convnet", "test_acc/distilled_hard_labels/convnet",
            "test_acc/random_real/convnet"} <= set(run.data.metrics)
    assert run.data.params["distill.mask_ratio"] == "0.25" and run.data.params["distill.ema"] == "0.9"
    assert run.data.params["experts.optimizer"] == "sgd" and "experts.schedule_ir" in run.data.params
    skips = [m.value for m in client.get_metric_history(tracked.run_id, "threshold_skips")]
    assert skips == [0, 1, 1]  # per evaluation (iterations 0, 1, 2): every match is above 1e-9
    assert len(client.get_metric_history(tracked.run_id, "label_entropy")) == 3
    assert len(client.get_metric_history(tracked.run_id, "val_acc_ema")) == 3
