"""experts -> distill -> evaluate through the main CLI on a small real dataset from ../shared/data."""
import json

import pytest

from tests.helpers import SHARED_DATA, run_cli


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mnist.npz").is_file(), reason=f"no mnist.npz in {SHARED_DATA}")
def test_pipeline_on_real_mnist(tmp_path):
    result = run_cli("ray_mtt", "--dataset", "mnist", "--data-dir", str(SHARED_DATA), "--run_dir", str(tmp_path),
                     "--device", "cpu", "--model.width", "16", "--data.train_per_class", "500", "--experts.num_experts", "1", "--experts.epochs", "2",
                     "--experts.batch_size", "256", "--distill.syn_steps", "5", "--distill.expert_epochs", "1",
                     "--distill.max_start_epoch", "1", "--distill.iterations", "6", "--distill.eval_every", "3",
                     "--distill.eval_runs", "1", "--distill.lr_img", "100", "--eval.num_runs", "2",
                     "--eval.epochs", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random real" in result.stdout and "distilled" in result.stdout
    summary = json.loads((tmp_path / "mnist" / "ipc1" / "results.json").read_text())
    assert summary["test"]["convnet"]["mean"] > 0.3  # chance is 0.1
    assert summary["random_real_test"]["convnet"]["mean"] > 0.3
    assert summary["s_per_iter"] > 0
    assert (tmp_path / "mnist" / "ipc1" / "best.pt").is_file()
