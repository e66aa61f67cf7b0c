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

import io
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .allocator import retain_freed_memory_on
from .augment import DSA, AugParams, apply
from .config import Config, DistillConfig
from .data import Dataset
from .errors import UserError
from .evaluate import score
from .experts import store_identity
from .models import FlatModel, model_for
from .seeds import derive_seed, generator, seed_everything
from .storage import LocalStorage
from .timing import NO_TIMER, NoTimer, PhaseTimer
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


def _student_loss(student: FlatModel, params: torch.Tensor, syn: SyntheticSet, step: Step,
                  timer: PhaseTimer | NoTimer = NO_TIMER) -> torch.Tensor:
    idx, aug = step
    with timer("DSA application"):
        x = syn.images[idx]
        if aug is not None:
            x = apply(x, aug)
    with timer("student forward"):
        return F.cross_entropy(student(params, x), syn.labels[idx])


def matching_grad_unrolled(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                           plan: list[Step], timer: PhaseTimer | NoTimer = NO_TIMER) -> torch.Tensor:
    """Backprop through all N steps at once; accumulates .grad of images and lr; returns the loss."""
    params = start.clone().requires_grad_(True)
    for step in plan:
        loss = _student_loss(student, params, syn, step, timer)
        with timer("inner gradients"):
            grad, = torch.autograd.grad(loss, params, create_graph=True)
            params = params - syn.lr * grad
    with timer("outer backward"):
        loss = (params - target).pow(2).sum() / (start - target).pow(2).sum()
        loss.backward()
    return loss.detach()


def matching_grad_checkpointed(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                               plan: list[Step], timer: PhaseTimer | NoTimer = NO_TIMER) -> torch.Tensor:
    """The same gradient with one step's graph alive at a time (memory flat in N)."""
    lr = syn.lr.detach()
    frozen = SyntheticSet(syn.images.detach(), syn.labels, lr)
    thetas, params = [], start
    for step in plan:  # forward: keep only the flat parameters before each step
        thetas.append(params)
        p = params.detach().requires_grad_(True)
        loss = _student_loss(student, p, frozen, step, timer)
        with timer("inner gradients"):
            grad, = torch.autograd.grad(loss, p)
            params = params - lr * grad
    with timer("outer backward (recomputes each step)"):
        return _checkpointed_backward(student, syn, start, target, plan, thetas, params)


def _checkpointed_backward(student: FlatModel, syn: SyntheticSet, start: torch.Tensor, target: torch.Tensor,
                           plan: list[Step], thetas: list[torch.Tensor], params: torch.Tensor) -> torch.Tensor:
    """Walk back from theta_N, one recomputed step at a time, carrying the adjoint."""
    lr = syn.lr.detach()
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


def synthetic_optimizers(syn: SyntheticSet, d: DistillConfig) -> list[torch.optim.Optimizer]:
    """SGD with momentum 0.5 on the pixels (lr_img) and on alpha (lr_lr), as the authors do."""
    return [torch.optim.SGD([syn.images], lr=d.lr_img, momentum=0.5), torch.optim.SGD([syn.lr], lr=d.lr_lr, momentum=0.5)]


def run_iteration(student: FlatModel, syn: SyntheticSet, trajectory: Trajectory, start_epoch: int,
                  d: DistillConfig, dsa: DSA, size: int, optimizers: list[torch.optim.Optimizer],
                  grad_mode: str | None = None, timer: PhaseTimer | NoTimer = NO_TIMER) -> torch.Tensor:
    """One distillation iteration from a drawn (trajectory, start epoch): read theta*_t and theta*_{t+M},
    draw the N steps' minibatches and DSA, take the matching gradient, step the optimizers. The
    distiller, the profiler and the benchmark all run this; returns the matching loss (no host sync)."""
    device = syn.images.device
    with timer("expert rows read"):
        start = trajectory.snapshot(start_epoch).to(device)
        target = trajectory.snapshot(start_epoch + d.expert_epochs).to(device)
    with timer("DSA parameter sampling"):
        plan = sample_plan(len(syn.images), d.syn_steps, d.batch_syn, dsa, size, device)
    loss = MATCHING_GRAD[grad_mode or d.grad_mode](student, syn, start, target, plan, timer)
    with timer("optimizer steps"):
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return loss


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
    check_compatible(store.read_meta(), store_identity(cfg, data.spec, model_for(cfg, data.spec)), store.root)
    d = cfg.distill
    return ExpertPool(store, d.max_start_epoch - 1 + d.expert_epochs + 1)


class Reporter:
    """Hooks the orchestration layer overrides (MLflow, Ray Tune); the algorithm imports neither."""

    def step(self, iteration: int, metrics: dict[str, float]) -> None:
        """After each iteration: loss, learned lr, seconds."""

    def evaluation(self, iteration: int, metrics: dict[str, float], synthetic: dict) -> None:
        """After each periodic validation: accuracies and the synthetic set (images, labels, lr) on CPU."""


def synthetic_file(synthetic: dict, data: Dataset, cfg: Config) -> dict:
    """What a distilled-set file holds: the set (network-input space) and everything needed to use
    it without this run: the preprocessing to undo, dataset, class names, image size, config."""
    pre = data.preprocess
    zca = None if pre.zca is None else dict(zip(("mean", "transform", "inverse"), (t.cpu() for t in pre.zca)))
    return {**synthetic, "dataset": data.spec.name, "classes": list(data.classes),
            "channels": data.spec.channels, "size": data.spec.size,
            "preprocess": {"mean": pre.mean.flatten().cpu(), "std": pre.std.flatten().cpu(), "zca": zca},
            "config": cfg.to_dict()}


class Distiller:
    """One distillation run: the synthetic set, its two optimizers, and the resumable state."""

    def __init__(self, cfg: Config, data: Dataset, experts: ExpertPool, reporter: Reporter):
        self.cfg, self.data, self.experts, self.reporter = cfg, data, experts, reporter
        self.out = cfg.distill_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = data.x_train.device
        retain_freed_memory_on(self.device)
        self.student = FlatModel(model_for(cfg, data.spec).to(self.device))
        self.dsa = DSA(cfg.augment.strategy, cfg.augment.siamese)
        self.syn = init_synthetic(cfg, data, generator(cfg.seed, "distill_init"))
        self.optimizers = synthetic_optimizers(self.syn, cfg.distill)
        self.state = {"iteration": 0, "best_val": -1.0, "best_iteration": -1, "seconds": 0.0}
        self.checkpoint = self.out / "checkpoint.pt"
        if self.checkpoint.is_file():
            self.state = _resume(self.checkpoint, self.syn, self.optimizers, self.device)

    def score_on_val(self, it: int) -> str:
        """Score the current set on the validation split; keep it as best.pt when it is the best so far."""
        d, syn = self.cfg.distill, self.syn
        val = score(syn.images, syn.labels, float(syn.lr.detach()), self.cfg, self.data, models=[self.cfg.model.name],
                    num_runs=d.eval_runs, split="val", epochs=d.eval_epochs or None, iteration=it)[self.cfg.model.name]
        if val.mean > self.state["best_val"]:
            self.state.update(best_val=val.mean, best_iteration=it)
            _save(self.out / "best.pt", {**synthetic_file(syn.state(), self.data, self.cfg), "iteration": it,
                                         "val_acc": val.mean})
        self.reporter.evaluation(it, {"val_acc": val.mean, "val_std": val.std, "best_val_acc": self.state["best_val"]},
                                 syn.state())
        return f"iteration {it}: val acc {val}, lr {float(syn.lr.detach()):.4g}"

    def step(self, it: int) -> float:
        """One outer iteration (Algorithm 1); returns the matching loss."""
        d, syn = self.cfg.distill, self.syn
        t0 = time.perf_counter()  # s/iter covers the whole iteration, the expert rows' read included
        # Every draw comes from (seed, iteration), so a resumed run draws what the uninterrupted one would have.
        seed_everything(self.cfg.seed, "distill_iteration", it)
        rng = random.Random(derive_seed(self.cfg.seed, "distill_iteration", it))
        start_epoch = rng.randrange(d.max_start_epoch)
        trajectory = self.experts.get(rng.choice(self.experts.indices))
        loss = run_iteration(self.student, syn, trajectory, start_epoch, d, self.dsa, self.data.spec.size,
                             self.optimizers)
        loss = float(loss)  # syncs, so the time below is the real step time
        seconds = time.perf_counter() - t0
        self.state["seconds"] += seconds
        lr = float(syn.lr.detach())
        if not torch.isfinite(torch.tensor(loss)) or lr <= 0:
            raise UserError(f"distillation diverged at iteration {it} (loss {loss}, lr {lr:.3g}); "
                            f"lower --distill.lr_img or --distill.lr_lr")
        self.reporter.step(it, {"loss": loss, "syn_lr": lr, "s_per_iter": seconds})
        return loss

    def save_checkpoint(self) -> None:
        opt_img, opt_lr = self.optimizers
        _save(self.checkpoint, {**self.syn.state(), **self.state, "opt_img": opt_img.state_dict(),
                                "opt_lr": opt_lr.state_dict()})

    def run(self, progress: bool) -> dict:
        d = self.cfg.distill
        first = self.state["iteration"]
        bar = tqdm(range(first, d.iterations + 1), initial=first, total=d.iterations + 1, desc="distill",
                   disable=not progress)
        for it in bar:
            if it == d.iterations or (d.eval_every and it % d.eval_every == 0):
                bar.write(self.score_on_val(it))
            if it == d.iterations:
                break
            loss = self.step(it)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(self.syn.lr.detach()):.4g}")
            self.state["iteration"] = it + 1
            if (it + 1) % CHECKPOINT_EVERY == 0 or (d.eval_every and (it + 1) % d.eval_every == 0):
                self.save_checkpoint()
        self.save_checkpoint()
        return {"best": self.out / "best.pt", "val_acc": self.state["best_val"],
                "best_iteration": self.state["best_iteration"],
                "s_per_iter": self.state["seconds"] / max(d.iterations, 1), "final_lr": float(self.syn.lr.detach())}


def distill(cfg: Config, data: Dataset, experts: ExpertPool | None = None, reporter: Reporter | None = None,
            progress: bool = True) -> dict:
    """Run (or resume) distillation; returns {"best": path, "val_acc": ..., "s_per_iter": ...}."""
    return Distiller(cfg, data, experts or open_experts(cfg, data), reporter or Reporter()).run(progress)


def _save(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    LocalStorage(path.parent).write(path.name, buffer.getvalue())


def _resume(path: Path, syn: SyntheticSet, optimizers: list[torch.optim.Optimizer], device) -> dict:
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
    for opt, key in zip(optimizers, ("opt_img", "opt_lr")):
        opt.load_state_dict(saved[key])
    return {k: saved[k] for k in ("iteration", "best_val", "best_iteration", "seconds")}
