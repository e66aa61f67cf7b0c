"""Hyperparameter sweeps of distillation on Ray Tune, tracked in MLflow (the command line is cli/tune.py).

The search space covers N (syn_steps), M (expert_epochs), T+ (max_start_epoch), lr_img, lr_lr and
the initial alpha (lr_teacher) around the config's values, lr_y with soft labels; `--space` adds any
config field (DATM's window T-, T, E and loss threshold, PAD's mask ratio, FTD's EMA beta). A space
with experts.* dimensions (FTD's rho and alpha, PAD's IR and AEE) makes each trial train, or reuse,
the store of its own expert settings before it distills. ASHA stops weak trials early on the
periodic validation accuracy. MLflow gets one parent run per sweep, one child run per trial, and
for the best trial a test-accuracy table over architectures.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from ..core.config import Config, DistillConfig, apply_overrides, config_from_dict
from ..core.data import Splits, check_data_place, read_splits, to_device
from ..core.difficulty import score_locally
from ..core.distill import Reporter, distill
from ..core.experts import epoch_batches, train_experts
from ..core.errors import UserError
from ..core.evaluate import Score, evaluation_stream, load_synthetic, report_sets, train_and_score
from ..core.models import model_for
from ..core.train import resolve_device
from ..core.trajectories import TrajectoryStore
from .cluster import connect, ray_failure, want_gpus
from .experts_job import run_job
from .options import SweepOptions
from .places import check_shared, cluster_can_span_nodes, default_sweep_storage, default_tracking_uri
from .tracking import MlflowReporter, flat_config, log_result, open_experiment, start_run, system_metrics, ui_hint

def default_space(cfg: Config, expert_epochs_available: int) -> dict:
    """Around the config's values; T+ - 1 + M never exceeds the epochs the experts have, and T+ stays
    above the window's lower edge T- and at least its first upper bound T. With soft labels, lr_y too."""
    d = cfg.distill
    ms = [m for m in (1, 2, 3) if m < expert_epochs_available] or [1]
    t_max = max(1, expert_epochs_available - max(ms) + 1)
    lowest = max(d.min_start_epoch + 1, d.first_max_start_epoch)
    starts = sorted({min(t_max, max(lowest, d.max_start_epoch // 2)), min(t_max, d.max_start_epoch)})
    space = {
        "distill.syn_steps": tune.choice(sorted({max(1, d.syn_steps // 2), d.syn_steps, 2 * d.syn_steps})),
        "distill.expert_epochs": tune.choice(ms),
        "distill.max_start_epoch": tune.choice(starts),
        "distill.lr_img": tune.loguniform(d.lr_img / 10, d.lr_img * 10),
        "distill.lr_lr": tune.loguniform(d.lr_lr / 10, d.lr_lr * 10),
        "distill.lr_teacher": tune.loguniform(d.lr_teacher / 3, d.lr_teacher * 3),
    }
    if d.soft_labels:
        space["distill.lr_y"] = tune.loguniform(d.lr_y / 3, d.lr_y * 3)
    return space


def parse_space(specs: list[str], cfg: Config) -> dict:
    """`key=loguniform:a:b`, `key=uniform:a:b`, `key=choice:v1,v2`, or `key=value` (fixed)."""
    space = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep:
            raise UserError(f"--space {spec!r}: expected key=kind:args, e.g. distill.lr_img=loguniform:10:1000")
        apply_overrides(Config(), {key: _first_value(value)}, f"--space {key}")  # validates the key and type
        if key.startswith("data."):  # the driver reads the data once for every trial
            raise UserError(f"--space {key}: the data is not swept (the driver reads it once for all trials); "
                            f"run one sweep per data setting with --name")
        kind, _, args = value.partition(":")
        try:
            if kind in ("loguniform", "uniform"):
                low, high = (float(x) for x in args.split(":"))
                if not 0 < low < high if kind == "loguniform" else not low < high:
                    raise ValueError
                space[key] = getattr(tune, kind)(low, high)
            elif kind == "choice":
                space[key] = tune.choice([_number(v) for v in args.split(",") if v])
            else:
                space[key] = _number(value)
        except ValueError:
            raise UserError(f"--space {spec!r}: bad range; use loguniform:LOW:HIGH with 0 < LOW < HIGH, "
                            f"uniform:LOW:HIGH or choice:A,B,C") from None
    return space


def _first_value(value: str) -> str:
    kind, _, args = value.partition(":")
    if kind in ("loguniform", "uniform"):
        return args.split(":")[0]
    if kind == "choice":
        return args.split(",")[0]
    return value


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class TuneReporter(Reporter):
    """Reports validation accuracy to Tune (for ASHA) with the trial's state as a Tune checkpoint
    (to the sweep's storage, so a trial restored on any node resumes), and everything to MLflow."""

    def __init__(self, mlflow_reporter: MlflowReporter, out: Path, run_id: str):
        self.mlflow, self.out, self.run_id, self.losses = mlflow_reporter, out, run_id, []

    def step(self, iteration, metrics):
        self.losses.append(metrics["loss"])
        self.mlflow.step(iteration, metrics)

    def evaluation(self, iteration, metrics, synthetic):
        self.mlflow.evaluation(iteration, metrics, synthetic)
        recent = self.losses[-10:]
        # The trial folder holds best.pt (already updated for this evaluation), checkpoint.pt and the run id.
        tune.report({"iteration": iteration, "val_acc": metrics["val_acc"], "best_val_acc": metrics["best_val_acc"],
                     "loss": sum(recent) / len(recent) if recent else float("nan"), "mlflow_run_id": self.run_id},
                    checkpoint=tune.Checkpoint.from_directory(str(self.out)))


def trial_folder(trial_id: str) -> Path:
    """The trial's local working folder, on whatever node runs it; restored from its last Tune
    checkpoint when Tune restarts the trial (on this node or another)."""
    out = Path(tempfile.gettempdir()) / "ray_mtt_trials" / trial_id
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as saved:
            shutil.copytree(saved, out, dirs_exist_ok=True)
    return out


def swept_experts(space: dict) -> list[str]:
    """The space's experts.* dimensions (FTD's rho and alpha, PAD's IR and AEE, ...)."""
    return sorted(k for k in space if k.startswith("experts."))


def trial_store(cfg: Config, swept: list[str]) -> str:
    """The store of one combination of swept expert settings, beside the sweep's store: the trials
    that draw the same combination share it (its experts are deterministic, so they write the same bytes)."""
    def text(value):
        return ":".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else str(value)
    settings = ",".join(f"{k.split('.', 1)[1]}={text(getattr(cfg.experts, k.split('.', 1)[1]))}" for k in swept)
    return f"{cfg.expert_dir.rstrip('/')}__{settings}"


def train_trial_experts(cfg: Config, data, swept: list[str]) -> None:
    """A trial that sweeps expert settings trains the experts of its own (or reuses them: each epoch
    resumes), on its own resources, EL2N scores first when its schedule needs them."""
    cfg.experts.dir = trial_store(cfg, swept)
    if cfg.experts.data_schedule == "pad":
        score_locally(cfg, data, epoch_batches(cfg, data))
    train_experts(cfg, data, progress=False)


def run_trial(config: dict, base: dict, tracking_uri: str, parent_run_id: str, splits: Splits,
              swept: list[str]) -> None:
    """One Tune trial: distill with the sampled hyperparameters (training its own experts first when
    `swept` names expert settings). `splits` come from the driver through Ray's object store (read
    and ZCA-fitted once; nothing is read from this node's disk)."""
    cfg = apply_overrides(config_from_dict(base), config, "search space").validate()
    trial_id = tune.get_context().get_trial_id()
    out = trial_folder(trial_id)
    cfg.distill.out_dir = str(out)
    data = to_device(splits, resolve_device(cfg.device))
    if swept:
        train_trial_experts(cfg, data, swept)
    client, experiment_id = open_experiment(tracking_uri, cfg.run_dir)
    run_file = out / "mlflow_run_id"  # a restored trial keeps logging into the same child run
    if run_file.is_file():
        run_id = run_file.read_text().strip()
    else:
        run_id = start_run(client, experiment_id, f"trial {trial_id}", {**flat_config(cfg), "trial_id": trial_id},
                           parent_run_id=parent_run_id)
        run_file.write_text(run_id)
    reporter = TuneReporter(MlflowReporter(client, run_id, data, cfg.distill.ipc), out, run_id)
    monitor = system_metrics(run_id, tracking_uri)
    try:
        distill(cfg, data, reporter=reporter, progress=False)
    finally:
        monitor.finish()
    client.set_tag(run_id, "ray_mtt.early_stopped", "false")
    client.set_terminated(run_id)


def expert_epochs_available(cfg: Config) -> int:
    store = TrajectoryStore(cfg.expert_dir)
    store.read_meta()  # a clear error when there is no store
    done = store.completed()
    if not done:
        raise UserError(f"{store.root} holds no finished experts; run `python -m ray_mtt.experts` or add --make-experts")
    return min(store.read_info(k)["shape"][0] for k in done) - 1


def extremes(domain) -> tuple:
    """The smallest and largest value a search dimension (choice, range or fixed value) can take."""
    if hasattr(domain, "categories"):
        return min(domain.categories), max(domain.categories)
    if hasattr(domain, "upper"):
        return domain.lower, domain.upper
    return domain, domain


def full_space(cfg: Config, user_space: dict) -> dict:
    """The default space with the user's dimensions on top, checked against the experts' length (the
    store's, or the length trials train when they sweep expert settings)."""
    available = cfg.experts.epochs if swept_experts(user_space) else expert_epochs_available(cfg)
    space = {**default_space(cfg, available), **user_space}
    check_space(space, cfg.distill, available)
    return space


def check_space(space: dict, d: DistillConfig, available: int) -> None:
    """Every draw must fit the experts (T+ - 1 + M <= their epochs) and the start window (T- < T <= T+),
    so no trial fails on a combination it drew."""
    def bounds(name):
        return extremes(space.get(f"distill.{name}", getattr(d, name)))
    needed = bounds("max_start_epoch")[1] - 1 + bounds("expert_epochs")[1]
    if needed > available:
        raise UserError(f"the search space reaches max_start_epoch - 1 + expert_epochs = {needed} but the experts "
                        f"have {available} epochs; narrow --space or train longer experts")
    if bounds("max_start_epoch")[0] < max(bounds("min_start_epoch")[1] + 1, bounds("first_max_start_epoch")[1]):
        raise UserError("the search space can draw max_start_epoch (T+) at or below min_start_epoch (T-) or below "
                        "first_max_start_epoch (T); narrow --space so that T- < T <= T+ for every draw")


def describe_space(space: dict) -> str:
    """The space as readable text (Tune's domains print as `<...Float object at 0x...>`)."""
    def one(domain):
        if hasattr(domain, "categories"):
            return "choice(" + ", ".join(map(str, domain.categories)) + ")"
        if hasattr(domain, "lower"):
            kind = "loguniform" if "LogUniform" in type(domain.get_sampler()).__name__ else "uniform"
            return f"{kind}({domain.lower:.3g}, {domain.upper:.3g})"
        return str(domain)
    return "; ".join(f"{k}={one(v)}" for k, v in space.items())


@dataclass
class SweepOutcome:
    ranked: list  # Tune results of the finished trials, best validation accuracy first
    scores: dict[str, dict[str, Score]]  # the best trial's set and random real, per architecture
    parent_run_id: str
    best_run_id: str
    tracking_uri: str
    ui_hint: str  # how to open the runs in the MLflow UI


class Sweep:
    """One named sweep: its MLflow parent run (the id kept in the driver's <run_dir>/tune/<name>) and
    its Tune experiment, whose state and trial checkpoints live in `storage` (a URI on a cluster)."""

    def __init__(self, cfg: Config, opts: SweepOptions):
        self.cfg, self.opts = cfg, opts
        self.dir = Path(cfg.run_dir) / "tune" / opts.name
        self.storage = opts.storage or default_sweep_storage(cfg.run_dir)

    @functools.cached_property
    def _tracking(self) -> tuple:
        """(client, experiment id), opened on first use: after the checks that the cluster can reach it."""
        return open_experiment(self.opts.tracking_uri, self.cfg.run_dir)

    @property
    def client(self):
        return self._tracking[0]

    @property
    def experiment_id(self) -> str:
        return self._tracking[1]

    def parent_run(self, space: dict) -> str:
        """The sweep's MLflow run: the one recorded in its folder on --resume, else a new one."""
        parent_file = self.dir / "mlflow_parent_run_id"
        if self.opts.resume and parent_file.is_file():
            return parent_file.read_text().strip()
        self.dir.mkdir(parents=True, exist_ok=True)
        run_id = start_run(self.client, self.experiment_id, f"sweep {self.opts.name}",
                           {**flat_config(self.cfg), "num_samples": str(self.opts.num_samples),
                            "search": self.opts.search, "space": describe_space(space)}, tags={"ray_mtt.kind": "sweep"})
        parent_file.write_text(run_id)
        return run_id

    def tuner(self, trainable, space: dict) -> tune.Tuner:
        """A new Tune experiment, or the stored one on --resume; a name clash is a one-line error."""
        path, name = f"{self.storage.rstrip('/')}/{self.opts.name}", self.opts.name
        if self.opts.resume:
            if not tune.Tuner.can_restore(path):
                raise UserError(f"no sweep named {name!r} to resume in {self.storage}; drop --resume to start it")
            return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        if tune.Tuner.can_restore(path):
            raise UserError(f"a sweep named {name!r} already exists in {self.storage}; add --resume to continue it "
                            f"or pass another --name")
        d = self.cfg.distill
        scheduler = None if not self.opts.asha else ASHAScheduler(
            time_attr="iteration", max_t=max(d.iterations, 1), grace_period=max(d.eval_every, 1), reduction_factor=2)
        search_alg = None
        if self.opts.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch
            search_alg = OptunaSearch()
        return tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=self.opts.num_samples,
                                        scheduler=scheduler, search_alg=search_alg,
                                        max_concurrent_trials=self.opts.max_concurrent or None),
            run_config=tune.RunConfig(name=name, storage_path=self.storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=self.opts.max_trial_failures)))


def trial_resources(opts: SweepOptions) -> dict:
    """CPUs and GPUs per trial (gpus_per_trial -1: one when the cluster has GPUs)."""
    gpus = opts.gpus_per_trial if opts.gpus_per_trial >= 0 else (1 if want_gpus("auto") else 0)
    return {"cpu": opts.cpus_per_trial, "gpu": gpus}


def pin_cpu_trials(cfg: Config, resources: dict) -> Config:
    """A trial given no GPU runs on the CPU, so `device: auto` never takes a GPU that Ray did not assign."""
    if resources["gpu"] == 0 and cfg.device == "auto":
        cfg.device = "cpu"
    return cfg


def check_places(cfg: Config, opts: SweepOptions, storage: str) -> None:
    """On a cluster that spans nodes (now, or once its autoscaler adds some), what trials read and
    write must be where every node reaches it."""
    if cluster_can_span_nodes():
        check_shared({"sweep storage": storage, "trajectory store": cfg.expert_dir}, opts.tracking_uri)


def run_sweep(cfg: Config, opts: SweepOptions) -> SweepOutcome:
    """Read the data once, make experts if asked, run (or resume) the sweep, score the best trial."""
    user_space = parse_space(opts.space, cfg)  # bad input fails here, before data, experts and Ray
    opts = dataclasses.replace(opts, name=opts.name or f"{cfg.data.dataset}_ipc{cfg.distill.ipc}",
                               tracking_uri=opts.tracking_uri or default_tracking_uri(cfg.run_dir))
    check_data_place(cfg.data)
    swept = swept_experts(user_space)
    if not opts.make_experts and not swept:
        expert_epochs_available(cfg)  # a missing store is known in a second, before the data is decoded
    splits = read_splits(cfg.data)  # checks the data first; fits ZCA once for all trials
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    connect(opts.address)
    sweep = Sweep(cfg, opts)
    check_places(cfg, opts, sweep.storage)  # before anything runs
    if opts.make_experts and not swept and not TrajectoryStore(cfg.expert_dir).completed():
        run_job(cfg, opts.address, splits=splits)
    space = full_space(cfg, user_space)
    resources = trial_resources(opts)
    cfg = pin_cpu_trials(cfg, resources)
    parent_run_id = sweep.parent_run(space)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), tracking_uri=opts.tracking_uri,
                             parent_run_id=parent_run_id, splits=splits, swept=swept), resources)
    monitor = system_metrics(parent_run_id, opts.tracking_uri)
    try:
        grid = sweep.tuner(trainable, space).fit()
    except ray.exceptions.RayError as e:
        raise ray_failure(e, f"sweep {opts.name!r}") from None
    finally:
        monitor.finish()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Tune leaves its handler: let Ctrl-C stop the scoring
    unfinished = opts.num_samples - grid.num_terminated - grid.num_errors
    if unfinished > 0:  # Tune returns normally after Ctrl-C, having saved the experiment state
        raise UserError(f"sweep {opts.name!r} stopped with {unfinished} of {opts.num_samples} trials unfinished; "
                        f"continue it with the same command plus --resume")
    close_trial_runs(grid, sweep)
    return score_best(grid, sweep, parent_run_id, splits, resources)


def close_trial_runs(grid, sweep: Sweep) -> None:
    """Tune ends a trial at the report where ASHA stops it or it reaches max_t, so the trial's own
    code never gets to close its MLflow run: close every run of the finished sweep here."""
    for result in grid:
        run_id = (result.metrics or {}).get("mlflow_run_id")
        if run_id and sweep.client.get_run(run_id).info.status == "RUNNING":
            stopped_early = result.metrics.get("iteration", 0) < sweep.cfg.distill.iterations
            sweep.client.set_tag(run_id, "ray_mtt.early_stopped", str(stopped_early).lower())
            sweep.client.set_terminated(run_id, "FAILED" if result.error else "FINISHED")


def rank_trials(grid) -> list:
    """Finished trials, best validation accuracy first; none finished is a one-line error."""
    ok = [r for r in grid if r.error is None and r.metrics and "best_val_acc" in r.metrics]
    if not ok:
        errors = [str(r.error).splitlines()[0] for r in grid if r.error is not None][:3]
        raise UserError(f"no trial finished; first errors: {errors}")
    return sorted(ok, key=lambda r: -r.metrics["best_val_acc"])


def best_set(result, into: Path) -> Path:
    """The best trial's best.pt, from its last Tune checkpoint (in the sweep's storage, not a worker's disk)."""
    if result.checkpoint is None:
        raise UserError(f"trial {result.metrics.get('trial_id')} left no checkpoint in the sweep's storage")
    into.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as saved:
        shutil.copy(Path(saved) / "best.pt", into / "best.pt")
    return into / "best.pt"


def score_best(grid, sweep: Sweep, parent_run_id: str, splits: Splits, resources: dict) -> SweepOutcome:
    """Score the best trial's set across architectures (as Ray tasks) and log it to its run and the sweep's."""
    ranked = rank_trials(grid)
    best = ranked[0]
    best_cfg = apply_overrides(config_from_dict(sweep.cfg.to_dict()), dict(best.config), "best trial")
    best_path = best_set(best, sweep.dir / "best")
    scores = cross_architecture(best_cfg, best_path, sweep.opts.eval_models, splits, resources)
    best_run_id = best.metrics["mlflow_run_id"]
    summary = {"best_val_acc": best.metrics["best_val_acc"], "worst_val_acc": ranked[-1].metrics["best_val_acc"],
               "trials": len(ranked)}
    client = sweep.client
    for run_id in (best_run_id, parent_run_id):
        log_result(client, run_id, scores, summary)
    client.log_artifact(parent_run_id, str(best_path), artifact_path="distilled")
    client.set_tag(parent_run_id, "ray_mtt.best_trial_run_id", best_run_id)
    client.set_terminated(parent_run_id)
    return SweepOutcome(ranked, scores, parent_run_id, best_run_id, sweep.opts.tracking_uri,
                        ui_hint(sweep.opts.tracking_uri, sweep.experiment_id))


def score_one(cfg_dict: dict, synthetic: dict, lr: float, model: str, run: int, splits: Splits) -> float:
    """One evaluation network (a Ray task: any node, the data from the object store)."""
    cfg = config_from_dict(cfg_dict)
    data = to_device(splits, resolve_device(cfg.device))
    images, labels = synthetic["images"].to(data.x_test.device), synthetic["labels"].to(data.x_test.device)
    return train_and_score(model, images, labels, lr, cfg, data, data.x_test, data.y_test,
                           evaluation_stream("test", 0, run))


def cross_architecture(cfg: Config, best_path: Path, models: list[str], splits: Splits,
                       resources: dict) -> dict[str, dict[str, Score]]:
    """The best set (also with hard labels when it learned soft ones) and random real on every
    architecture that fits the images (others are said and skipped), every network a Ray task, so
    the scoring spreads over the cluster's GPUs."""
    usable = []
    for name in models:
        try:
            model_for(cfg, splits.spec, name)
            usable.append(name)
        except UserError as e:
            print(f"skipping {name} in the cross-architecture table: {e}")
    sets = {name: ({"images": images, "labels": labels}, lr) for name, (images, labels, lr)
            in report_sets(load_synthetic(best_path, "cpu"), cfg, to_device(splits, "cpu")).items()}
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"])(score_one)
    splits_ref, cfg_dict = ray.put(splits), cfg.to_dict()
    futures = {(name, model): [task.remote(cfg_dict, synthetic, lr, model, run, splits_ref)
                               for run in range(cfg.eval.num_runs)]
               for name, (synthetic, lr) in sets.items() for model in usable}
    try:
        return {name: {model: Score(model, ray.get(futures[name, model])) for model in usable} for name in sets}
    except ray.exceptions.RayError as e:
        raise ray_failure(e, "cross-architecture scoring") from None
