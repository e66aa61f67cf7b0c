"""experts -> distill -> evaluate through the main CLI on a small real dataset from ../shared/data."""
import json

import pytest

from tests.helpers import SHARED_DATA, run_cli


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mnist.npz").is_file(), reason=f"no mnist.npz in {SHARED_DATA}")
def test_pipeline_on_real_mnist(tmp_path):
    """The product's claim, on real data: the distilled set beats random real images of the same IPC.
    Measured with these seeds on the 2-core CPU: 64.8 +- 2.6 % against 45.0 +- 1.7 % (3 networks);
    with 6 iterations instead of 40 the two were within 3 points, too close to assert."""
    result = run_cli("ray_mtt", "--dataset", "mnist", "--data-dir", str(SHARED_DATA), "--run_dir", str(tmp_path),
                     "--device", "cpu", "--engine", "local", "--tracking-uri", "none", "--model.width", "16",
                     "--data.train_per_class", "500", "--experts.num_experts", "1", "--experts.epochs", "3",
                     "--experts.batch_size", "256", "--distill.syn_steps", "10", "--distill.expert_epochs", "2",
                     "--distill.max_start_epoch", "1", "--distill.iterations", "40", "--distill.eval_every", "20",
                     "--distill.eval_runs", "1", "--distill.lr_img", "1000", "--eval.num_runs", "3",
                     "--eval.epochs", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random real" in result.stdout and "distilled" in result.stdout
    summary = json.loads((tmp_path / "mnist" / "ipc1" / "results.json").read_text())
    distilled, real = summary["test"]["convnet"]["mean"], summary["random_real_test"]["convnet"]["mean"]
    assert real > 0.3  # chance is 0.1: the baseline itself learned
    assert distilled > real + 0.10, (distilled, real)
    assert summary["s_per_iter"] > 0
    assert (tmp_path / "mnist" / "ipc1" / "best.pt").is_file()
