import pytest
import torch

from ray_mtt.augment import DSA
from ray_mtt.distill import (Reporter, SyntheticSet, distill, matching_grad_checkpointed, matching_grad_unrolled,
                             sample_plan)
from ray_mtt.experts import train_experts
from ray_mtt.models import FlatModel, build_model
from tests.conftest import tiny_config


def tiny_problem(steps=4, batch=4):
    torch.manual_seed(0)
    student = FlatModel(build_model("convnet", 3, 4, 8, width=6, depth=1).double())
    start = student.flatten()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    labels = torch.arange(4).repeat(2)
    plan = sample_plan(8, steps, batch, DSA(), 8, "cpu")
    return student, start, target, images, labels, plan


def run(fn, student, start, target, images, labels, plan, lr=0.05):
    syn = SyntheticSet(images.clone().requires_grad_(True), labels,
                       torch.tensor(lr, dtype=torch.float64).requires_grad_(True))
    loss = fn(student, syn, start, target, plan)
    return float(loss), syn.images.grad, syn.lr.grad


def test_unrolled_gradient_matches_finite_differences():
    student, start, target, images, labels, plan = tiny_problem()
    _, grad_images, grad_lr = run(matching_grad_unrolled, student, start, target, images, labels, plan)
    h = 1e-6
    for flat_index in torch.randperm(images.numel(), generator=torch.Generator().manual_seed(0))[:6]:
        bump = torch.zeros(images.numel(), dtype=torch.float64)
        bump[flat_index] = h
        bump = bump.view_as(images)
        up = run(matching_grad_unrolled, student, start, target, images + bump, labels, plan)[0]
        down = run(matching_grad_unrolled, student, start, target, images - bump, labels, plan)[0]
        assert (up - down) / (2 * h) == pytest.approx(float(grad_images.flatten()[flat_index]), rel=1e-4, abs=1e-9)
    up = run(matching_grad_unrolled, student, start, target, images, labels, plan, lr=0.05 + h)[0]
    down = run(matching_grad_unrolled, student, start, target, images, labels, plan, lr=0.05 - h)[0]
    assert (up - down) / (2 * h) == pytest.approx(float(grad_lr), rel=1e-5)


@pytest.mark.parametrize("steps, batch", [(1, 8), (5, 3), (12, 4)])
def test_checkpointed_gradient_equals_unrolled(steps, batch):
    problem = tiny_problem(steps, batch)
    loss_u, gi_u, glr_u = run(matching_grad_unrolled, *problem)
    loss_c, gi_c, glr_c = run(matching_grad_checkpointed, *problem)
    assert loss_c == pytest.approx(loss_u, rel=1e-12)
    assert torch.allclose(gi_c, gi_u, rtol=1e-9, atol=1e-14)
    assert float(glr_c) == pytest.approx(float(glr_u), rel=1e-9)


def test_plan_covers_each_image_once_per_pass():
    plan = sample_plan(10, 4, 4, DSA("none"), 8, "cpu")
    first_pass = torch.cat([idx for idx, _ in plan[:3]])  # chunks of 4, 4, 2
    assert sorted(first_pass.tolist()) == list(range(10))
    assert [len(idx) for idx, _ in plan] == [4, 4, 2, 4]


def test_distill_resumes_to_the_same_result_as_an_uninterrupted_run(tmp_path, digits):
    cfg = tiny_config(tmp_path, distill={"iterations": 6, "eval_every": 0})
    train_experts(cfg, digits, progress=False)
    straight = distill(cfg, digits, progress=False)
    straight_images = torch.load(cfg.distill_dir / "checkpoint.pt")["images"]

    cfg.distill.out_dir = str(tmp_path / "resumed")
    cfg.distill.iterations = 4
    distill(cfg, digits, progress=False)
    cfg.distill.iterations = 6

    class Recorder(Reporter):
        def __init__(self):
            self.steps, self.evaluations = [], []

        def step(self, iteration, metrics):
            self.steps.append(iteration)

        def evaluation(self, iteration, metrics, synthetic):
            self.evaluations.append((iteration, metrics["val_acc"], tuple(synthetic["images"].shape)))

    recorder = Recorder()
    distill(cfg, digits, reporter=recorder, progress=False)
    assert recorder.steps == [4, 5]
    assert [(it, shape) for it, _, shape in recorder.evaluations] == [(6, (10, 1, 8, 8))]
    resumed_images = torch.load(cfg.distill_dir / "checkpoint.pt")["images"]
    assert torch.equal(resumed_images, straight_images)
    assert not torch.equal(resumed_images, digits.preprocess(digits.random_real(1, torch.Generator().manual_seed(0))[0]))
    assert 0 <= straight["val_acc"] <= 1


def test_checkpointed_mode_runs_the_loop(tmp_path, digits):
    cfg = tiny_config(tmp_path, distill={"iterations": 2, "eval_every": 0, "grad_mode": "checkpointed"})
    train_experts(cfg, digits, progress=False)
    assert distill(cfg, digits, progress=False)["best"].is_file()
