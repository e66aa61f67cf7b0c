"""Phase 2: distill the dataset by matching expert training trajectories (MTT, Algorithm 1).

Each iteration: pick an expert and a start epoch t < T+, start a student at theta*_t, take N SGD
steps with the learnable step size alpha on DSA-augmented minibatches of the synthetic set, and
minimise ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 w.r.t. the pixels and alpha.

Two ways to get the same gradient:
  unrolled      keep the graph of all N steps and call backward once (memory grows with N).
  checkpointed  run the N steps without a graph keeping only each step's flat parameters, then
                walk back step by step, recomputing one step's graph at a time and carrying the
                adjoint a = dL/dtheta_i (exact reverse mode; activation memory is that of one
                step, as in TESLA).

Progress is checkpointed (resumable); the synthetic set with the best validation accuracy is kept
as best.pt. Run with `python -m ray_mtt.distill`.
"""
from __future__ import annotations

import argparse
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import DSA, AugParams, apply
from .config import Config, add_config_args, config_from_args
from .data import Dataset, load_dataset
from .errors import UserError, run_cli
from .evaluate import score
from .experts import build_expert_model, store_identity
from .models import FlatModel
from .storage import LocalStorage
from .train import resolve_device
from .trajectories import TrajectoryStore, Trajectory, check_compatible

CHECKPOINT_EVERY = 25  # iterations between resumable checkpoints (besides every evaluation)
Step = tuple[torch.Tensor, AugParams | None]  # (synthetic indices, augmentation draw) of one student step


@dataclass
class SyntheticSet:
    images: torch.Tensor  # float, in network-input space (normalised or ZCA), requires grad
    labels: torch.Tensor
    lr: torch.Tensor  # learnable student step size alpha (scalar), requires grad

    def state(self) -> dict:
        return {"images": self.images.detach().cpu(), "labels": self.labels.cpu(), "lr": self.lr.detach().cpu()}


def init_synthetic(cfg: Config, data: Dataset, generator: torch.Generator) -> SyntheticSet:
    d = cfg.distill
    x, y = data.random_real(d.ipc, generator)  # also checks that every class has ipc images
    images = data.preprocess(x) if d.init == "real" else torch.randn(x.shape, generator=generator).to(x.device)
    lr = torch.tensor(d.lr_teacher, device=x.device)
    return SyntheticSet(images.detach().requires_grad_(True), y, lr.requires_grad_(True))


def sample_plan(num_syn: int, steps: int, batch_syn: int, dsa: DSA, size: int, device) -> list[Step]:
    """Minibatches (successive chunks of random permutations) and augmentation draws for N steps."""
    batch = batch_syn or num_syn
    plan, chunks = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(num_syn, device=device).split(batch))
        idx = chunks.pop(0)
        plan.append((idx, dsa.sample(len(idx), size, device)))
    return plan


def _student_loss(student: FlatModel, params: torch.Tensor, syn: SyntheticSet, step: Step) -> torch.Tensor:
    idx, aug = step
    x = syn.images[idx]
    if aug is not None:
        x = apply(x, aug)
    return F.cross_entropy(student(params, x), syn.labels[idx])


def matching_grad_unrolled(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                           plan: list[Step]) -> torch.Tensor:
    """Backprop through all N steps at once; accumulates .grad of images and lr; returns the loss."""
    params = start.clone().requires_grad_(True)
    for step in plan:
        grad, = torch.autograd.grad(_student_loss(student, params, syn, step), params, create_graph=True)
        params = params - syn.lr * grad
    loss = (params - target).pow(2).sum() / (start - target).pow(2).sum()
    loss.backward()
    return loss.detach()


def matching_grad_checkpointed(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                               plan: list[Step]) -> torch.Tensor:
    """The same gradient with one step's graph alive at a time (memory flat in N)."""
    lr = syn.lr.detach()
    frozen = SyntheticSet(syn.images.detach(), syn.labels, lr)
    thetas, params = [], start
    for step in plan:  # forward: keep only the flat parameters before each step
        thetas.append(params)
        p = params.detach().requires_grad_(True)
        grad, = torch.autograd.grad(_student_loss(student, p, frozen, step), p)
        params = params - lr * grad
    denom = (start - target).pow(2).sum()
    loss = (params - target).pow(2).sum() / denom
    adjoint = 2 * (params - target) / denom  # dL/dtheta_N
    image_grad = torch.zeros_like(syn.images)
    lr_grad = torch.zeros_like(lr)
    for theta, step in zip(reversed(thetas), reversed(plan)):
        # theta_{i+1} = theta_i - lr * g(theta_i, X_i): pull the adjoint back through one step.
        p = theta.detach().requires_grad_(True)
        images = syn.images.detach().requires_grad_(True)
        grad, = torch.autograd.grad(_student_loss(student, p, SyntheticSet(images, syn.labels, lr), step), p,
                                    create_graph=True)
        lr_grad -= (grad.detach() * adjoint).sum()
        hvp, image_vjp = torch.autograd.grad((grad * adjoint).sum(), (p, images))
        image_grad -= lr * image_vjp
        adjoint = adjoint - lr * hvp
    syn.images.grad = image_grad if syn.images.grad is None else syn.images.grad + image_grad
    syn.lr.grad = lr_grad if syn.lr.grad is None else syn.lr.grad + lr_grad
    return loss.detach()


MATCHING_GRAD = {"unrolled": matching_grad_unrolled, "checkpointed": matching_grad_checkpointed}


class ExpertPool:
    """Finished experts of a store, opened lazily (one row read per draw) the first time they are drawn."""

    def __init__(self, store: TrajectoryStore, needed_snapshots: int):
        self.store, self.indices = store, store.completed()
        if not self.indices:
            raise UserError(f"{store.root} holds no finished experts; run `python -m ray_mtt.experts` first")
        for k in self.indices:  # check lengths up front, from the small .json files
            snapshots = self.store.read_info(k)["shape"][0]
            if snapshots < needed_snapshots:
                raise UserError(f"expert {k} in {store.root} has {snapshots - 1} epochs but max_start_epoch + "
                                f"expert_epochs = {needed_snapshots - 1} are needed; train experts longer "
                                f"(--experts.epochs) or lower --distill.max_start_epoch")
        self._open: dict[int, Trajectory] = {}

    def get(self, k: int) -> Trajectory:
        if k not in self._open:
            self._open[k] = self.store.open(k)
        return self._open[k]


def open_experts(cfg: Config, data: Dataset) -> ExpertPool:
    store = TrajectoryStore(cfg.expert_dir)
    num_params = FlatModel(build_expert_model(cfg, data.spec)).num_params
    check_compatible(store.read_meta(), store_identity(cfg, data.spec, num_params), store.root)
    d = cfg.distill
    return ExpertPool(store, d.max_start_epoch - 1 + d.expert_epochs + 1)


class Reporter:
    """Hooks the orchestration layer overrides (MLflow, Ray Tune); the algorithm imports neither."""

    def step(self, iteration: int, metrics: dict[str, float]) -> None:
        """After each iteration: loss, learned lr, seconds."""

    def evaluation(self, iteration: int, metrics: dict[str, float], synthetic: dict) -> None:
        """After each periodic validation: accuracies and the synthetic set (images, labels, lr) on CPU."""


def distill(cfg: Config, data: Dataset, experts: ExpertPool | None = None, reporter: Reporter | None = None,
            progress: bool = True) -> dict:
    """Run (or resume) distillation; returns {"best": path, "val_acc": ..., "s_per_iter": ...}."""
    d = cfg.distill
    experts = experts or open_experts(cfg, data)
    reporter = reporter or Reporter()
    out = cfg.distill_dir
    out.mkdir(parents=True, exist_ok=True)
    device = data.x_train.device
    student = FlatModel(build_expert_model(cfg, data.spec).to(device))
    dsa = DSA(cfg.augment.strategy, cfg.augment.siamese)
    syn = init_synthetic(cfg, data, torch.Generator().manual_seed(cfg.seed))
    opt_img = torch.optim.SGD([syn.images], lr=d.lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([syn.lr], lr=d.lr_lr, momentum=0.5)
    state = {"iteration": 0, "best_val": -1.0, "best_iteration": -1, "seconds": 0.0}
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file():
        state = _resume(ckpt_path, syn, opt_img, opt_lr, device)
    matching_grad = MATCHING_GRAD[d.grad_mode]
    bar = tqdm(range(state["iteration"], d.iterations + 1), initial=state["iteration"], total=d.iterations + 1,
               desc="distill", disable=not progress)
    for it in bar:
        if it == d.iterations or (d.eval_every and it % d.eval_every == 0):
            val = score(syn.images, syn.labels, float(syn.lr.detach()), cfg, data, models=[cfg.model.name],
                        num_runs=d.eval_runs, split="val", epochs=d.eval_epochs or None, seed=it)[cfg.model.name]
            if val.mean > state["best_val"]:
                state.update(best_val=val.mean, best_iteration=it)
                _save(out / "best.pt", {**syn.state(), "iteration": it, "val_acc": val.mean})
            reporter.evaluation(it, {"val_acc": val.mean, "val_std": val.std, "best_val_acc": state["best_val"]},
                                syn.state())
            bar.write(f"iteration {it}: val acc {val}, lr {float(syn.lr.detach()):.4g}")
        if it == d.iterations:
            break
        # Seed from (seed, iteration) so a resumed run draws what the uninterrupted one would have.
        torch.manual_seed(cfg.seed * 1_000_003 + it)
        rng = random.Random(cfg.seed * 1_000_003 + it)
        start_epoch = rng.randrange(d.max_start_epoch)
        traj = experts.get(rng.choice(experts.indices))
        start = traj.snapshot(start_epoch).to(device)
        target = traj.snapshot(start_epoch + d.expert_epochs).to(device)
        t0 = time.perf_counter()
        plan = sample_plan(len(syn.images), d.syn_steps, d.batch_syn, dsa, data.spec.size, device)
        loss = matching_grad(student, syn, start, target, plan)
        opt_img.step()
        opt_lr.step()
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss = float(loss)  # syncs, so the time below is the real step time
        seconds = time.perf_counter() - t0
        state["seconds"] += seconds
        if not torch.isfinite(torch.tensor(loss)) or float(syn.lr.detach()) <= 0:
            raise UserError(f"distillation diverged at iteration {it} (loss {loss}, lr {float(syn.lr.detach()):.3g}); "
                            f"lower --distill.lr_img or --distill.lr_lr")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(syn.lr.detach()):.4g}")
        reporter.step(it, {"loss": loss, "syn_lr": float(syn.lr.detach()), "s_per_iter": seconds})
        state["iteration"] = it + 1
        if (it + 1) % CHECKPOINT_EVERY == 0 or (d.eval_every and (it + 1) % d.eval_every == 0):
            _save(ckpt_path, {**syn.state(), **state, "opt_img": opt_img.state_dict(), "opt_lr": opt_lr.state_dict()})
    _save(ckpt_path, {**syn.state(), **state, "opt_img": opt_img.state_dict(), "opt_lr": opt_lr.state_dict()})
    iters = max(d.iterations, 1)
    return {"best": out / "best.pt", "val_acc": state["best_val"], "best_iteration": state["best_iteration"],
            "s_per_iter": state["seconds"] / iters, "final_lr": float(syn.lr.detach())}


def _save(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    LocalStorage(path.parent).write(path.name, buffer.getvalue())


def _resume(path: Path, syn: SyntheticSet, opt_img, opt_lr, device) -> dict:
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({e}); delete it to restart distillation") from None
    if saved["images"].shape != syn.images.shape:
        raise UserError(f"checkpoint {path} holds {tuple(saved['images'].shape)} images but this config needs "
                        f"{tuple(syn.images.shape)}; use another --distill.out_dir or delete the checkpoint")
    with torch.no_grad():
        syn.images.copy_(saved["images"])
        syn.lr.copy_(saved["lr"])
    syn.labels.copy_(saved["labels"])
    opt_img.load_state_dict(saved["opt_img"])
    opt_lr.load_state_dict(saved["opt_lr"])
    return {k: saved[k] for k in ("iteration", "best_val", "best_iteration", "seconds")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_mtt.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .pipeline import add_tracking_arg, finish_tracking, open_tracking, reporter_for  # the CLI layer
    add_tracking_arg(parser)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    data = load_dataset(cfg.data, resolve_device(cfg.device))
    experts = open_experts(cfg, data)  # bad input fails here, before a tracking run is opened
    data.random_real(cfg.distill.ipc, torch.Generator())
    tracked = open_tracking(args.tracking_uri, cfg, f"distill {cfg.data.dataset} ipc{cfg.distill.ipc}")
    result = distill(cfg, data, experts, reporter=reporter_for(tracked, data, cfg))
    finish_tracking(tracked, {}, {"s_per_iter": result["s_per_iter"], "best_val_acc": result["val_acc"]})
    print(f"best synthetic set: {result['best']} (iteration {result['best_iteration']}, val acc "
          f"{100 * result['val_acc']:.1f} %, {result['s_per_iter']:.3f} s/iter, learned lr {result['final_lr']:.4g})")


if __name__ == "__main__":
    run_cli(main)
