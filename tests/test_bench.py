"""The distillation benchmark measures, and logs to MLflow when asked."""
import pytest

from tests.helpers import run_cli

mlflow = pytest.importorskip("mlflow")


def test_bench_logs_timing_speedups_and_memory_to_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("ray_mtt.bench", "--configs", "cifar10_ipc1", "--syn-steps", "2", "--width", "8",
                     "--variants", "unrolled,checkpointed", "--warmup", "0", "--repeats", "2",
                     "--memory-steps", "2,4", "--tracking-uri", uri, "--run_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray_mtt").experiment_id],
                              filter_string="tags.`ray_mtt.kind` = 'bench'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["s_per_iter/cifar10_ipc1/unrolled"] > 0 and metrics["speedup/cifar10_ipc1/unrolled"] == 1.0
    assert metrics["speedup/cifar10_ipc1/checkpointed"] > 0
    memory = client.get_metric_history(runs[0].info.run_id, "peak_mib/cifar10_ipc1/unrolled")
    assert sorted(m.step for m in memory) == [2, 4]
    assert "bench.json" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
