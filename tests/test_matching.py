"""PAD's depth mask and ATT's automatic length: exact in both grad modes, against brute force."""
import pytest
import torch

from ray_mtt.core.matching import Matching, SyntheticSet, matching_grad_checkpointed, matching_grad_unrolled
from tests.test_distill import tiny_problem

GRADS = {"unrolled": matching_grad_unrolled, "checkpointed": matching_grad_checkpointed}


def run(fn, student, start, target, images, labels, plan, matching, lr=0.05):
    syn = SyntheticSet(images.clone().requires_grad_(True), labels,
                       torch.tensor(lr, dtype=torch.float64).requires_grad_(True))
    loss, steps = fn(student, syn, start, target, plan, matching=matching)
    return float(loss), steps, syn.images.grad, syn.lr.grad


def test_masked_loss_leaves_the_first_k_entries_out_of_both_norms():
    start, target, params = (torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                             for s in range(3))
    m = Matching(masked=4)
    assert float(m.loss(params, start, target)) == pytest.approx(
        float(((params[4:] - target[4:]) ** 2).sum() / ((start[4:] - target[4:]) ** 2).sum()))
    p = params.clone().requires_grad_(True)
    m.loss(p, start, target).backward()
    assert torch.allclose(m.adjoint(params, start, target), p.grad) and (p.grad[:4] == 0).all()


@pytest.mark.parametrize("steps, batch", [(1, 8), (5, 3)])
def test_masked_checkpointed_equals_masked_unrolled(steps, batch):
    student, *rest = tiny_problem(steps, batch)
    matching = Matching(masked=student.num_params // 3)  # the first conv layer and part of the next
    loss_u, _, gi_u, glr_u = run(matching_grad_unrolled, student, *rest, matching)
    loss_c, _, gi_c, glr_c = run(matching_grad_checkpointed, student, *rest, matching)
    assert loss_c == pytest.approx(loss_u, rel=1e-12)
    assert torch.allclose(gi_c, gi_u, rtol=1e-9, atol=1e-14) and float(glr_c) == pytest.approx(float(glr_u), rel=1e-9)
    plain = run(matching_grad_unrolled, student, *rest, Matching())
    assert loss_u != pytest.approx(plain[0])  # the mask changes the loss


@pytest.mark.parametrize("mode", GRADS)
def test_masked_gradient_matches_finite_differences(mode):
    student, start, target, images, labels, plan = tiny_problem()
    matching = Matching(masked=student.num_params // 2)
    _, _, grad_images, grad_lr = run(GRADS[mode], student, start, target, images, labels, plan, matching)
    h = 1e-6
    for flat_index in torch.randperm(images.numel(), generator=torch.Generator().manual_seed(0))[:5]:
        bump = torch.zeros(images.numel(), dtype=torch.float64)
        bump[flat_index] = h
        bump = bump.view_as(images)
        up = run(GRADS[mode], student, start, target, images + bump, labels, plan, matching)[0]
        down = run(GRADS[mode], student, start, target, images - bump, labels, plan, matching)[0]
        assert (up - down) / (2 * h) == pytest.approx(float(grad_images.flatten()[flat_index]), rel=1e-4, abs=1e-10)
    up = run(GRADS[mode], student, start, target, images, labels, plan, matching, lr=0.05 + h)[0]
    down = run(GRADS[mode], student, start, target, images, labels, plan, matching, lr=0.05 - h)[0]
    assert (up - down) / (2 * h) == pytest.approx(float(grad_lr), rel=1e-5)


def brute_force_length(student, start, target, images, labels, plan, lr=0.05):
    """ATT by hand: every prefix's parameters without a graph, the L1-closest one (ties: later)."""
    params, distances = start.clone(), []
    for idx, _ in plan:  # the tiny problem's plan has no DSA
        p = params.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(student(p, images[idx]), labels[idx])
        params = params - lr * torch.autograd.grad(loss, p)[0]
        distances.append(float((params - target).abs().sum()))
    best = min(distances)
    return max(n + 1 for n, d in enumerate(distances) if d == best)


@pytest.mark.parametrize("mode", GRADS)
def test_auto_length_picks_the_closest_step_and_its_gradient(mode):
    student, start, target, images, labels, plan = tiny_problem(steps=12)
    # a target near step 5 of the student's own path: the closest step lies inside the unroll
    params = start.clone()
    for idx, _ in plan[:5]:
        p = params.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(student(p, images[idx]), labels[idx])
        params = params - 0.05 * torch.autograd.grad(loss, p)[0]
    target = params.detach() + 1e-4
    expected = brute_force_length(student, start, target, images, labels, plan)
    assert 1 < expected < len(plan)
    loss, steps, grad_images, grad_lr = run(GRADS[mode], student, start, target, images, labels, plan,
                                            Matching(auto_length=True))
    assert steps == expected
    # the same as a plain match over just those steps
    loss_p, steps_p, grad_images_p, grad_lr_p = run(matching_grad_unrolled, student, start, target, images, labels,
                                                    plan[:expected], Matching())
    assert steps_p == expected and loss == pytest.approx(loss_p, rel=1e-12)
    assert torch.allclose(grad_images, grad_images_p, rtol=1e-9, atol=1e-14)
    assert float(grad_lr) == pytest.approx(float(grad_lr_p), rel=1e-9)


def test_auto_length_ties_go_to_the_later_step():
    d = [torch.tensor(v) for v in (3.0, 1.0, 2.0, 1.0, 5.0)]
    assert Matching(auto_length=True).steps(d) == 4 and Matching().steps(d) == 5
