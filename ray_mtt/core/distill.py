"""Phase 2: distill the dataset by matching expert training trajectories (MTT, Algorithm 1).

Each iteration: pick an expert and a start epoch t < T+, start a student at theta*_t, take N SGD
steps with the learnable step size alpha on DSA-augmented minibatches of the synthetic set, and
minimise ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 w.r.t. the pixels and alpha
(matching.py: the gradient, unrolled or checkpointed).

The successors are options of this one loop: DATM's soft labels, init and start window (datm.py)
and loss threshold; PAD's depth mask and ATT's automatic length (matching.py); FTD's EMA of the
images, scored and kept beside the raw set (best_ema.pt).

Progress is checkpointed (resumable); the synthetic set with the best validation accuracy is kept
as best.pt. Run with `python -m ray_mtt.distill`.
"""
from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from .allocator import retain_freed_memory_on
from .augment import DSA
from .config import Config, DistillConfig
from .data import Dataset
from .datm import correctly_classified, initial_label_logits, label_entropy, start_window
from .errors import UserError
from .evaluate import score
from .experts import store_identity
from .matching import MATCHING_GRAD, Matching, SyntheticSet, sample_plan
from .models import FlatModel, model_for
from .seeds import derive_seed, generator, seed_everything
from .storage import LocalStorage
from .timing import NO_TIMER, NoTimer, PhaseTimer
from .trajectories import TrajectoryStore, Trajectory, check_compatible

CHECKPOINT_EVERY = 25  # iterations between resumable checkpoints (besides every evaluation)


def init_synthetic(cfg: Config, data: Dataset, generator: torch.Generator, student: FlatModel | None = None,
                   finals: Callable[[], Iterable[torch.Tensor]] | None = None) -> SyntheticSet:
    """The starting set: real, noise or correctly classified real images (`finals` gives a pass over the
    experts' final snapshots, which `init: correct` and soft labels need), alpha = lr_teacher."""
    d = cfg.distill
    if d.init == "correct":
        x, y = correctly_classified(data, d.ipc, student, finals(), generator)
    else:
        x, y = data.random_real(d.ipc, generator)  # also checks that every class has ipc images
    images = data.preprocess(x) if d.init != "noise" else torch.randn(x.shape, generator=generator).to(x.device)
    logits = initial_label_logits(images, y, student, finals()) if d.soft_labels else None
    lr = torch.tensor(d.lr_teacher, device=x.device)
    return SyntheticSet(images.detach().requires_grad_(True), y, lr.requires_grad_(True),
                        None if logits is None else logits.detach().requires_grad_(True))


def set_shaped_for(cfg: Config, data: Dataset) -> SyntheticSet:
    """A set of the config's shapes with zero content, for a checkpoint to fill."""
    d, spec, device = cfg.distill, data.spec, data.x_train.device
    n = d.ipc * data.num_classes
    logits = torch.zeros(n, data.num_classes, device=device).requires_grad_(True) if d.soft_labels else None
    return SyntheticSet(torch.zeros(n, spec.channels, spec.size, spec.size, device=device).requires_grad_(True),
                        torch.arange(data.num_classes, device=device).repeat_interleave(d.ipc),
                        torch.tensor(d.lr_teacher, device=device).requires_grad_(True), logits)


OPTIMIZER_KEYS = ("opt_img", "opt_lr", "opt_y")  # how a checkpoint names each optimizer's state


def synthetic_optimizers(syn: SyntheticSet, d: DistillConfig) -> list[torch.optim.Optimizer]:
    """SGD with momentum 0.5 on the pixels (lr_img) and on alpha (lr_lr), as the authors do; with soft
    labels, SGD on the logits (lr_y, momentum_y), as DATM does."""
    optimizers = [torch.optim.SGD([syn.images], lr=d.lr_img, momentum=0.5),
                  torch.optim.SGD([syn.lr], lr=d.lr_lr, momentum=0.5)]
    if syn.label_logits is not None:
        optimizers.append(torch.optim.SGD([syn.label_logits], lr=d.lr_y, momentum=d.momentum_y))
    return optimizers


@dataclass
class Iteration:
    loss: torch.Tensor  # the matching loss (no host sync unless a loss threshold is set)
    steps: int  # the inner steps the match covered (N, or ATT's choice)
    stepped: bool  # whether the optimizers stepped (False: the loss was above the threshold)


def matching_for(d: DistillConfig, student: FlatModel) -> Matching:
    """PAD's mask leaves out the first floor(mask_ratio * P) flat parameters; ATT picks the length."""
    return Matching(masked=int(d.mask_ratio * student.num_params), auto_length=d.auto_length)


def run_iteration(student: FlatModel, syn: SyntheticSet, trajectory: Trajectory, start_epoch: int,
                  d: DistillConfig, dsa: DSA, size: int, optimizers: list[torch.optim.Optimizer],
                  grad_mode: str | None = None, timer: PhaseTimer | NoTimer = NO_TIMER) -> Iteration:
    """One distillation iteration from a drawn (trajectory, start epoch): read theta*_t and theta*_{t+M},
    draw the N steps' minibatches and DSA, take the matching gradient, step the optimizers. The
    distiller, the profiler and the benchmark all run this."""
    device = syn.images.device
    with timer("expert rows read"):
        start = trajectory.snapshot(start_epoch).to(device)
        target = trajectory.snapshot(start_epoch + d.expert_epochs).to(device)
    with timer("DSA parameter sampling"):
        plan = sample_plan(len(syn.images), d.syn_steps, d.batch_syn, dsa, size, device)
    loss, steps = MATCHING_GRAD[grad_mode or d.grad_mode](student, syn, start, target, plan, timer,
                                                          matching_for(d, student))
    # DATM: a match too far off (loss above the threshold) moves nothing, momentum included.
    stepped = not d.loss_threshold or float(loss) <= d.loss_threshold
    with timer("optimizer steps"):
        for opt in optimizers:
            if stepped:
                opt.step()
            opt.zero_grad(set_to_none=True)
    return Iteration(loss, steps, stepped)


# What a run keeps besides the set and its optimizers (resumable): threshold skips count since iteration 0.
FRESH_STATE = {"iteration": 0, "best_val": -1.0, "best_iteration": -1, "seconds": 0.0, "threshold_skips": 0,
               "skips_at_last_eval": 0, "best_val_ema": -1.0, "best_iteration_ema": -1}


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

    def final_snapshots(self, device) -> Iterable[torch.Tensor]:
        """Each expert's last snapshot, in store order, read one at a time (DATM's label and init models)."""
        for k in self.indices:
            trajectory = self.get(k)
            yield trajectory.snapshot(trajectory.num_snapshots - 1).to(device)


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


SET_FILES = {"raw": "best.pt", "ema": "best_ema.pt"}  # the best set of each kind, as its file says


class Distiller:
    """One distillation run: the synthetic set, its optimizers, the EMA of its images (FTD) when asked
    for, and the resumable state."""

    def __init__(self, cfg: Config, data: Dataset, experts: ExpertPool, reporter: Reporter):
        self.cfg, self.data, self.experts, self.reporter = cfg, data, experts, reporter
        self.out = cfg.distill_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = data.x_train.device
        retain_freed_memory_on(self.device)
        self.student = FlatModel(model_for(cfg, data.spec).to(self.device))
        self.dsa = DSA(cfg.augment.strategy, cfg.augment.siamese)
        self.checkpoint = self.out / "checkpoint.pt"
        resuming = self.checkpoint.is_file()
        # A resumed run overwrites the whole set, so it skips the init's scans of the experts' final snapshots.
        self.syn = set_shaped_for(cfg, data) if resuming else init_synthetic(
            cfg, data, generator(cfg.seed, "distill_init"), self.student, lambda: experts.final_snapshots(self.device))
        self.optimizers = synthetic_optimizers(self.syn, cfg.distill)
        # FTD: the EMA starts as the initial images and follows every image step (no warm-up, no bias correction).
        self.ema = self.syn.images.detach().clone() if cfg.distill.ema else None
        self.state = dict(FRESH_STATE)
        if resuming:
            self.state = _resume(self.checkpoint, self.syn, self.optimizers, self.ema, self.device)

    def candidates(self) -> dict[str, torch.Tensor]:
        """The image sets each validation scores: the raw set, and its EMA when kept."""
        return {"raw": self.syn.images.detach(), **({} if self.ema is None else {"ema": self.ema})}

    def score_on_val(self, it: int) -> str:
        """Score the current set (and its EMA), each on fresh networks, on the validation split; keep
        each as its best file when it is the best of its kind so far."""
        d, syn = self.cfg.distill, self.syn
        metrics, said = {}, []
        for kind, images in self.candidates().items():
            val = score(images, syn.targets(slice(None)), float(syn.lr.detach()), self.cfg, self.data,
                        models=[self.cfg.model.name], num_runs=d.eval_runs, split="val",
                        epochs=d.eval_epochs or None, iteration=it)[self.cfg.model.name]
            suffix = "" if kind == "raw" else "_ema"
            if val.mean > self.state["best_val" + suffix]:
                self.state.update({"best_val" + suffix: val.mean, "best_iteration" + suffix: it})
                _save(self.out / SET_FILES[kind], {**synthetic_file({**syn.state(), "images": images.cpu()},
                                                                    self.data, self.cfg),
                                                   "images_kind": kind, "iteration": it, "val_acc": val.mean})
            metrics.update({"val_acc" + suffix: val.mean, "val_std" + suffix: val.std,
                            "best_val_acc" + suffix: self.state["best_val" + suffix]})
            said.append(f"{'EMA ' if suffix else ''}val acc {val}")
        metrics["threshold_skips"] = self.state["threshold_skips"] - self.state["skips_at_last_eval"]
        self.state["skips_at_last_eval"] = self.state["threshold_skips"]
        if syn.label_logits is not None:
            metrics["label_entropy"] = label_entropy(syn.label_logits.detach())
        self.reporter.evaluation(it, metrics, syn.state())
        return f"iteration {it}: {', '.join(said)}, lr {float(syn.lr.detach()):.4g}"

    def step(self, it: int) -> float:
        """One outer iteration (Algorithm 1); returns the matching loss."""
        d, syn = self.cfg.distill, self.syn
        t0 = time.perf_counter()  # s/iter covers the whole iteration, the expert rows' read included
        # Every draw comes from (seed, iteration), so a resumed run draws what the uninterrupted one would have.
        seed_everything(self.cfg.seed, "distill_iteration", it)
        rng = random.Random(derive_seed(self.cfg.seed, "distill_iteration", it))
        start_epoch = rng.randrange(*start_window(d, it))
        trajectory = self.experts.get(rng.choice(self.experts.indices))
        result = run_iteration(self.student, syn, trajectory, start_epoch, d, self.dsa, self.data.spec.size,
                               self.optimizers)
        loss = float(result.loss)  # syncs, so the time below is the real step time
        if result.stepped and self.ema is not None:
            self.ema.lerp_(syn.images.detach(), 1 - d.ema)  # beta * ema + (1 - beta) * images
        self.state["threshold_skips"] += not result.stepped
        seconds = time.perf_counter() - t0
        self.state["seconds"] += seconds
        lr = float(syn.lr.detach())
        if not torch.isfinite(torch.tensor(loss)) or lr <= 0:
            raise UserError(f"distillation diverged at iteration {it} (loss {loss}, lr {lr:.3g}); "
                            f"lower --distill.lr_img or --distill.lr_lr")
        self.reporter.step(it, {"loss": loss, "syn_lr": lr, "s_per_iter": seconds, "start_epoch": start_epoch,
                                "skipped": float(not result.stepped), "matched_steps": result.steps})
        return loss

    def save_checkpoint(self) -> None:
        optimizers = {key: opt.state_dict() for key, opt in zip(OPTIMIZER_KEYS, self.optimizers)}
        ema = {} if self.ema is None else {"ema_images": self.ema.cpu()}
        _save(self.checkpoint, {**self.syn.state(), **self.state, **optimizers, **ema})

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
        ema = {} if self.ema is None else {"best_ema": self.out / SET_FILES["ema"], "val_acc_ema": self.state["best_val_ema"],
                                           "best_iteration_ema": self.state["best_iteration_ema"]}
        return {"best": self.out / "best.pt", "val_acc": self.state["best_val"],
                "best_iteration": self.state["best_iteration"], **ema,
                "s_per_iter": self.state["seconds"] / max(d.iterations, 1), "final_lr": float(self.syn.lr.detach())}


def distill(cfg: Config, data: Dataset, experts: ExpertPool | None = None, reporter: Reporter | None = None,
            progress: bool = True) -> dict:
    """Run (or resume) distillation; returns {"best": path, "val_acc": ..., "s_per_iter": ...}."""
    return Distiller(cfg, data, experts or open_experts(cfg, data), reporter or Reporter()).run(progress)


def _save(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    LocalStorage(path.parent).write(path.name, buffer.getvalue())


def _resume(path: Path, syn: SyntheticSet, optimizers: list[torch.optim.Optimizer], ema: torch.Tensor | None,
            device) -> dict:
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({e}); delete it to restart distillation") from None
    def holds(soft: bool, ema_kept: bool) -> str:
        return f"{'with' if soft else 'without'} soft labels, {'with' if ema_kept else 'without'} an EMA"
    found, wanted = holds("label_logits" in saved, "ema_images" in saved), holds(syn.label_logits is not None,
                                                                                  ema is not None)
    if saved["images"].shape != syn.images.shape or found != wanted:
        raise UserError(f"checkpoint {path} holds {tuple(saved['images'].shape)} images {found} but this config "
                        f"needs {tuple(syn.images.shape)} {wanted}; use another --distill.out_dir or delete the "
                        f"checkpoint")
    with torch.no_grad():
        syn.images.copy_(saved["images"])
        syn.lr.copy_(saved["lr"])
        if syn.label_logits is not None:
            syn.label_logits.copy_(saved["label_logits"])
        if ema is not None:
            ema.copy_(saved["ema_images"])
    syn.labels.copy_(saved["labels"])
    for opt, key in zip(optimizers, OPTIMIZER_KEYS):
        opt.load_state_dict(saved[key])
    return {k: saved.get(k, default) for k, default in FRESH_STATE.items()}
