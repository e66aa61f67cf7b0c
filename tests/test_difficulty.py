"""PAD's expert data: EL2N scores, the per-epoch schedule at 500 and 5,000 images per class, experts on it."""
import numpy as np
import pytest
import torch

from ray_mtt.core.config import ExpertConfig
from ray_mtt.core.difficulty import SCORES, class_orders, el2n, network_file, read_npy, scheduled_indices
from ray_mtt.core.errors import UserError
from ray_mtt.core.experts import train_experts
from ray_mtt.core.storage import open_storage
from tests.helpers import assert_one_line_error, run_in_process, tiny_config

PAD = ExpertConfig(data_schedule="pad", schedule_ir=0.75, schedule_aee=20, removal_epochs=[40, 60],
                   removal_ratios=[0.1, 0.2])


@pytest.mark.parametrize("per_class", [500, 5000])
@pytest.mark.parametrize("epoch, kept", [(0, 0.75), (10, 0.875), (20, 1.0), (30, 1.0), (40, 1.0), (41, 0.9),
                                         (60, 0.9), (61, 0.8), (99, 0.8)])
def test_schedule_selects_the_easiest_then_all_then_drops_the_easiest(per_class, epoch, kept):
    classes = 3
    rng = np.random.default_rng(0)
    labels = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class,
                                                                              generator=torch.Generator().manual_seed(0))]
    scores = rng.random(classes * per_class).astype(np.float32)
    picked = scheduled_indices(class_orders(scores, labels, classes), epoch, PAD)
    assert len(set(picked.tolist())) == len(picked)  # no image twice
    for c in range(classes):
        mine = picked[labels[picked] == c]
        ranked = sorted(torch.nonzero(labels == c).flatten().tolist(), key=lambda i: scores[i])
        n = int(kept * per_class) if epoch <= 20 else per_class - int(round((1 - kept) * per_class))
        assert len(mine) == n
        expected = ranked[:n] if epoch <= 20 else ranked[per_class - n:]  # easiest first; then the easiest go
        assert sorted(mine.tolist()) == sorted(expected)


def test_el2n_is_the_distance_of_the_softmax_to_the_one_hot_label(digits):
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.flatten(1).mean(1), -x.flatten(1).mean(1)] + [torch.zeros(len(x))] * 8, 1)
    scores = el2n(Fixed(), digits)
    probs = torch.softmax(Fixed()(digits.preprocess(digits.x_train)), 1)
    expected = (probs - torch.nn.functional.one_hot(digits.y_train, 10)).norm(dim=1)
    assert scores.shape == (len(digits.y_train),) and np.allclose(scores, expected.numpy(), atol=1e-6)


def test_scheduled_experts_score_once_resume_and_record_the_schedule(tmp_path, digits):
    cfg = tiny_config(tmp_path, experts={"data_schedule": "pad", "schedule_aee": 2, "removal_epochs": [2],
                                         "removal_ratios": [0.5], "difficulty_networks": 2, "difficulty_epochs": 1})
    with pytest.raises(UserError, match="run `python -m ray_mtt.difficulty`"):
        train_experts(cfg, digits, progress=False)
    args = ["--run_dir", cfg.run_dir, "--device", "cpu", "--model.width", "16", "--engine", "local",
            "--experts.data_schedule", "pad", "--experts.difficulty_networks", "2", "--experts.difficulty_epochs", "1"]
    out = run_in_process("difficulty", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    storage = open_storage(cfg.expert_dir)
    nets = [read_npy(storage, network_file(k)) for k in range(2)]
    assert not np.array_equal(nets[0], nets[1])  # two networks, two streams
    assert np.allclose(read_npy(storage, SCORES), (nets[0] + nets[1]) / 2)
    store = train_experts(cfg, digits, progress=False)
    assert store.read_meta()["data_schedule"].startswith("pad(ir=0.75, aee=2, remove=2:0.5")
    rerun = run_in_process("difficulty", *args)  # kept, not recomputed
    assert rerun.returncode == 0 and np.array_equal(read_npy(storage, SCORES), (nets[0] + nets[1]) / 2)
    plain = run_in_process("distill", "--run_dir", cfg.run_dir, "--device", "cpu", "--model.width", "16",
                           "--distill.iterations", "0", "--distill.max_start_epoch", "2", "--distill.expert_epochs", "1")
    assert_one_line_error(plain, "data_schedule='pad(ir=0.75", "(wanted 'none')")
