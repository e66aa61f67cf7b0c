import pytest
import torch

from ray_mtt.core.augment import DSA
from ray_mtt.core.distill import Reporter, distill, init_synthetic
from ray_mtt.core.matching import SyntheticSet, matching_grad_checkpointed, matching_grad_unrolled, sample_plan
from ray_mtt.core.evaluate import score
from ray_mtt.core.experts import train_experts
from ray_mtt.core.models import FlatModel, create_model
from ray_mtt.core.seeds import generator
from tests.helpers import tiny_config


def tiny_problem(steps=4, batch=4):
    torch.manual_seed(0)
    student = FlatModel(create_model("convnet", 3, 4, 8, width=6, depth=1).double())
    start = student.flatten()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    labels = torch.arange(4).repeat(2)
    plan = sample_plan(8, steps, batch, DSA(), 8, "cpu")
    return student, start, target, images, labels, plan


def run(fn, student, start, target, images, labels, plan, lr=0.05):
    syn = SyntheticSet(images.clone().requires_grad_(True), labels,
                       torch.tensor(lr, dtype=torch.float64).requires_grad_(True))
    loss, _ = fn(student, syn, start, target, plan)
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


def test_plan_covers_each_image_once_per_pass_remainder_chunk_first():
    # The authors pop chunks from the end of the permutation's chunk list: the remainder goes first.
    torch.manual_seed(0)
    plan = sample_plan(10, 4, 4, DSA("none"), 8, "cpu")
    first_pass = torch.cat([idx for idx, _ in plan[:3]])  # chunks of 2, 4, 4
    assert sorted(first_pass.tolist()) == list(range(10))
    assert [len(idx) for idx, _ in plan] == [2, 4, 4, 2]
    torch.manual_seed(0)
    chunks = torch.randperm(10).split(4)
    assert torch.equal(plan[0][0], chunks[-1]) and torch.equal(plan[1][0], chunks[-2])


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
    assert straight["best_iteration"] in (0, 6)  # the validations it ran: at 0 and at the end


def test_distilled_set_beats_the_real_images_it_started_from(tmp_path, digits):
    """The point of it all, on a problem small enough for a unit test (~10 s): 40 iterations move
    ten real digits (one per class) to a set that trains better networks (measured: 88-90 % vs
    62-79 % over seeds 0-2)."""
    cfg = tiny_config(tmp_path, experts={"num_experts": 2, "epochs": 6},
                      distill={"syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 3, "iterations": 40,
                               "eval_every": 0, "lr_img": 100, "lr_lr": 1e-7},
                      eval={"epochs": 100, "num_runs": 3})
    train_experts(cfg, digits, progress=False)
    distill(cfg, digits, progress=False)
    final = torch.load(cfg.distill_dir / "checkpoint.pt")
    start = init_synthetic(cfg, digits, generator(cfg.seed, "distill_init"))
    distilled = score(final["images"], final["labels"], float(final["lr"]), cfg, digits, split="val")["convnet"]
    real = score(start.images.detach(), start.labels, cfg.distill.lr_teacher, cfg, digits, split="val")["convnet"]
    assert torch.equal(start.labels, final["labels"])
    assert distilled.mean > real.mean + 0.05, (distilled, real)


def test_checkpointed_loop_moves_the_set_as_the_unrolled_one_does(tmp_path, digits):
    cfg = tiny_config(tmp_path, distill={"iterations": 3, "eval_every": 0})
    train_experts(cfg, digits, progress=False)
    runs = {}
    for mode in ("unrolled", "checkpointed"):
        cfg.distill.grad_mode, cfg.distill.out_dir = mode, str(tmp_path / mode)
        distill(cfg, digits, progress=False)
        runs[mode] = torch.load(tmp_path / mode / "checkpoint.pt")
    start = init_synthetic(cfg, digits, generator(cfg.seed, "distill_init")).images.detach()
    moved = runs["unrolled"]["images"] - start
    assert moved.abs().max() > 1e-3  # the set did move ...
    assert torch.allclose(runs["checkpointed"]["images"] - start, moved, rtol=1e-3, atol=1e-5)  # ... the same way
    assert float(runs["checkpointed"]["lr"]) == pytest.approx(float(runs["unrolled"]["lr"]), rel=1e-5)
