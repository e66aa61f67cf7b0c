"""The distillation benchmark measures (time, memory, counted FLOPs, phases), and logs to MLflow when asked."""
import pytest

from tests.helpers import run_cli


@pytest.mark.slow  # four memory children, a fresh process each: ~50 s
def test_bench_logs_timing_speedups_and_memory_to_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("ray_mtt.bench", "--configs", "cifar10_ipc1", "--syn-steps", "2", "--width", "32",
                     "--variants", "unrolled,checkpointed", "--warmup", "0", "--repeats", "2",
                     "--memory-steps", "2,12", "--flops", "--peak-memory", "--tracking-uri", uri,
                     "--run_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray_mtt").experiment_id],
                              filter_string="tags.`ray_mtt.kind` = 'bench'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["s_per_iter/cifar10_ipc1/unrolled"] > 0 and metrics["speedup/cifar10_ipc1/unrolled"] == 1.0
    assert metrics["speedup/cifar10_ipc1/checkpointed"] > 0
    assert metrics["tflops/cifar10_ipc1/unrolled"] > 0 and metrics["iteration_peak_mib/cifar10_ipc1/checkpointed"] > 0
    memory = {v: {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, f"peak_mib/cifar10_ipc1/{v}")}
              for v in ("unrolled", "checkpointed")}
    assert sorted(memory["unrolled"]) == [2, 12]
    # The measured peaks tell the two paths apart: the unrolled graph keeps every step's activations
    # (measured here: 40 -> 123 MiB from N=2 to 12; checkpointed 34 -> 41).
    unrolled, checkpointed = memory["unrolled"], memory["checkpointed"]
    assert unrolled[12] > unrolled[2] + 30, unrolled
    assert checkpointed[12] < checkpointed[2] + 0.5 * (unrolled[12] - unrolled[2]), (checkpointed, unrolled)
    assert "bench.json" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]


TINY = ("--configs", "cifar10_ipc1", "--width", "8")


def bench_json(tmp_path, *args) -> dict:
    import json
    out = tmp_path / "bench.json"
    result = run_cli("ray_mtt.bench", *TINY, *args, "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("grad_mode", ["unrolled", "checkpointed"])
def test_profile_times_every_phase_of_one_iteration(tmp_path, grad_mode):
    raw = bench_json(tmp_path, "--profile", "--syn-steps", "2", "--grad-mode", grad_mode)
    prof = raw["profile"]["cifar10_ipc1"]
    backward = "outer backward" if grad_mode == "unrolled" else "outer backward (recomputes each step)"
    assert list(prof["phases"]) == ["expert rows read", "DSA parameter sampling", "DSA application",
                                    "student forward", "inner gradients", backward, "optimizer steps"]
    timed = sum(prof["phases"].values())
    assert all(s > 0 for s in prof["phases"].values())
    assert 0.5 * prof["total_s"] < timed <= prof["total_s"]  # the phases are the iteration, minus glue
    assert set(prof["system"]) == set(prof["phases"])
    names = [op["name"] for op in prof["operators"]]
    assert any("convolution" in n for n in names), names


def test_flops_are_counted_per_student_step(tmp_path):
    """Counted, not guessed: an unrolled iteration's FLOPs grow linearly with N, and the checkpointed
    path, which recomputes each step's forward and backward, counts more."""
    def flops(steps):
        raw = bench_json(tmp_path, "--flops", "--syn-steps", str(steps), "--variants", "unrolled,checkpointed",
                         "--warmup", "0", "--repeats", "1")
        assert raw["fp32_peak_tflops"] > 0
        return raw["flops"]["cifar10_ipc1/unrolled"], raw["flops"]["cifar10_ipc1/checkpointed"]
    (two, two_ck), (four, four_ck) = flops(2), flops(4)
    assert four == pytest.approx(2 * two, rel=0.01)
    assert two_ck > two and four_ck > four


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    """The per-point memory children must not inherit a large parent's peak (ru_maxrss would)."""
    import subprocess
    import sys
    import torch
    from ray_mtt.measure.memory import peak_rss_mb
    ballast = torch.ones(2**28)  # 1 GiB in this process
    assert peak_rss_mb() > 1024
    code = "from ray_mtt.measure.memory import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 900, child.stdout
    del ballast
