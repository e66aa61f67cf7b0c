"""The matching gradient: N student steps on the synthetic set, then d/d(set) of how far they land from the target.

  loss = ||theta_n - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 over the kept entries, with
  n = N (MTT) or, with auto_length (ATT), the step whose parameters are closest (L1) to the target,
  and the kept entries all of them or, with a depth mask (PAD), all but the first k of the flat
  vector (module order: the shallow layers).

Two ways to get the same gradient:
  unrolled      keep the graph of all N steps and call backward once (memory grows with N).
  checkpointed  run the N steps without a graph keeping only each step's flat parameters, then
                walk back from step n, recomputing one step's graph at a time and carrying the
                adjoint a = dL/dtheta_i (exact reverse mode; activation memory is that of one
                step, as in TESLA). The walk sums each step's exact contribution to dL/dpixels,
                dL/dlabels (soft labels) and dL/dalpha.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .augment import DSA, AugParams, apply
from .models import FlatModel
from .timing import NO_TIMER, NoTimer, PhaseTimer

Step = tuple[torch.Tensor, AugParams | None]  # (synthetic indices, augmentation draw) of one student step


@dataclass
class SyntheticSet:
    images: torch.Tensor  # float, in network-input space (normalised or ZCA), requires grad
    labels: torch.Tensor  # the class of each image
    lr: torch.Tensor  # learnable student step size alpha (scalar), requires grad
    label_logits: torch.Tensor | None = None  # learned soft labels (DATM), requires grad; None = hard labels

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """What the student's cross-entropy is taken against: softmax(logits) (soft labels) or the classes."""
        return self.labels[idx] if self.label_logits is None else self.label_logits[idx].softmax(1)

    def state(self) -> dict:
        state = {"images": self.images.detach().cpu(), "labels": self.labels.cpu(), "lr": self.lr.detach().cpu()}
        if self.label_logits is not None:
            state["label_logits"] = self.label_logits.detach().cpu()
        return state


def sample_plan(num_syn: int, steps: int, batch_syn: int, dsa: DSA, size: int, device) -> list[Step]:
    """Minibatches (chunks of random permutations) and augmentation draws for N steps. Chunks are
    taken from the end of the list, as the authors do: the remainder chunk comes first."""
    batch = batch_syn or num_syn
    plan, chunks = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(num_syn, device=device).split(batch))
        idx = chunks.pop()
        plan.append((idx, dsa.sample(len(idx), size, device)))
    return plan


@dataclass(frozen=True)
class Matching:
    """How the student's parameters are compared with the target."""
    masked: int = 0  # PAD: the first `masked` entries of the flat parameters are left out of both norms
    auto_length: bool = False  # ATT: match at the step closest (L1) to the target instead of step N

    def loss(self, params: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = self.masked
        return (params[k:] - target[k:]).pow(2).sum() / (start[k:] - target[k:]).pow(2).sum()

    def adjoint(self, params: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """dL/dparams of `loss`: zero on the masked entries."""
        k = self.masked
        adjoint = 2 * (params - target) / (start[k:] - target[k:]).pow(2).sum()
        adjoint[:k] = 0
        return adjoint

    def distance(self, params: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """ATT's L1 distance of one step's parameters to the target, without a graph (None when unused)."""
        return (params.detach() - target).abs().sum() if self.auto_length else None

    def steps(self, distances: list[torch.Tensor | None]) -> int:
        """How many steps the match covers: N, or the step of the smallest distance (ties: the later)."""
        if not self.auto_length:
            return len(distances)
        return len(distances) - int(torch.argmin(torch.stack(distances).flip(0)))


PLAIN = Matching()


class Match(NamedTuple):
    loss: torch.Tensor  # the matching loss (detached)
    steps: int  # the inner steps it covers (N unless auto_length)


def _student_loss(student: FlatModel, params: torch.Tensor, syn: "SyntheticSet", step: Step,
                  timer: PhaseTimer | NoTimer = NO_TIMER) -> torch.Tensor:
    idx, aug = step
    with timer("DSA application"):
        x = syn.images[idx]
        if aug is not None:
            x = apply(x, aug)
    with timer("student forward"):
        return F.cross_entropy(student(params, x), syn.targets(idx))


def matching_grad_unrolled(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                           plan: list[Step], timer: PhaseTimer | NoTimer = NO_TIMER,
                           matching: Matching = PLAIN) -> Match:
    """Backprop through the steps at once; accumulates .grad of images, lr (and label logits)."""
    params = start.clone().requires_grad_(True)
    trail, distances = [], []
    for step in plan:
        loss = _student_loss(student, params, syn, step, timer)
        with timer("inner gradients"):
            grad, = torch.autograd.grad(loss, params, create_graph=True)
            params = params - syn.lr * grad
        trail.append(params)
        distances.append(matching.distance(params, target))
    steps = matching.steps(distances)
    with timer("outer backward"):
        loss = matching.loss(trail[steps - 1], start, target)
        loss.backward()
    return Match(loss.detach(), steps)


def matching_grad_checkpointed(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                               plan: list[Step], timer: PhaseTimer | NoTimer = NO_TIMER,
                               matching: Matching = PLAIN) -> Match:
    """The same gradient with one step's graph alive at a time (memory flat in N)."""
    frozen = detached(syn)
    thetas, distances, params = [], [], start
    for step in plan:  # forward: keep only the flat parameters before each step
        thetas.append(params)
        p = params.detach().requires_grad_(True)
        loss = _student_loss(student, p, frozen, step, timer)
        with timer("inner gradients"):
            grad, = torch.autograd.grad(loss, p)
            params = params - frozen.lr * grad
        distances.append(matching.distance(params, target))
    steps = matching.steps(distances)
    matched = params if steps == len(plan) else thetas[steps]
    with timer("outer backward (recomputes each step)"):
        loss = _checkpointed_backward(student, syn, start, target, plan[:steps], thetas[:steps], matched, matching)
    return Match(loss, steps)


def detached(syn: SyntheticSet, requires_grad: bool = False) -> SyntheticSet:
    """A copy of the set cut from its graph: leaves of their own when `requires_grad` (lr never is)."""
    cut = [t.detach().requires_grad_(requires_grad) for t in (syn.images, syn.label_logits) if t is not None]
    return SyntheticSet(cut[0], syn.labels, syn.lr.detach(), cut[1] if len(cut) > 1 else None)


def set_leaves(syn: SyntheticSet) -> list[torch.Tensor]:
    """The set's own learned tensors, pixels then label logits (alpha aside: its gradient is a sum, not a VJP)."""
    return [t for t in (syn.images, syn.label_logits) if t is not None]


def _checkpointed_backward(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                           plan: list[Step], thetas: list[torch.Tensor], params: torch.Tensor,
                           matching: Matching) -> torch.Tensor:
    """Walk back from the matched step, one recomputed step at a time, carrying the adjoint."""
    lr = syn.lr.detach()
    loss = matching.loss(params, start, target)
    adjoint = matching.adjoint(params, start, target)  # dL/dtheta_n
    set_grads = [torch.zeros_like(t) for t in set_leaves(syn)]
    lr_grad = torch.zeros_like(lr)
    for theta, step in zip(reversed(thetas), reversed(plan)):
        # theta_{i+1} = theta_i - lr * g(theta_i, X_i, Y_i): pull the adjoint back through one step.
        p = theta.detach().requires_grad_(True)
        leaves = detached(syn, requires_grad=True)
        grad, = torch.autograd.grad(_student_loss(student, p, leaves, step), p, create_graph=True)
        lr_grad -= (grad.detach() * adjoint).sum()
        hvp, *set_vjps = torch.autograd.grad((grad * adjoint).sum(), [p, *set_leaves(leaves)])
        for total, vjp in zip(set_grads, set_vjps):
            total -= lr * vjp
        adjoint = adjoint - lr * hvp
    for tensor, grad in zip([*set_leaves(syn), syn.lr], [*set_grads, lr_grad]):
        tensor.grad = grad if tensor.grad is None else tensor.grad + grad
    return loss.detach()


MATCHING_GRAD = {"unrolled": matching_grad_unrolled, "checkpointed": matching_grad_checkpointed}
