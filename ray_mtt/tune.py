"""Hyperparameter sweeps of distillation on Ray Tune, tracked in MLflow.

    python -m ray_mtt.tune --dataset tiny_imagenet --data-dir DATA --num-samples 16

The search space covers N (syn_steps), M (expert_epochs), T+ (max_start_epoch), lr_img, lr_lr and
the initial alpha (lr_teacher) around the values of configs/<dataset>_ipc<k>.yaml; change any
dimension with --space (e.g. --space distill.lr_img=loguniform:100:10000 --space
distill.syn_steps=choice:10,20,40). ASHA stops weak trials early on the periodic validation
accuracy; --search optuna uses Optuna's TPE instead of random sampling. A killed or interrupted
sweep continues with --resume. MLflow gets one parent run per sweep, one child run per trial, and
for the best trial a test-accuracy table over architectures.

The experts' own lr is not swept: each value needs its own expert trajectories (train them with
`python -m ray_mtt.experts --experts.lr X --experts.dir D`, then sweep with --experts D).
"""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from .config import Config, add_config_args, apply_overrides, config_from_args, config_from_dict
from .data import load_dataset
from .distill import Reporter, distill
from .errors import UserError, run_cli
from .evaluate import Score, format_table, load_synthetic, random_real_set, score
from .experts_job import connect, run_job
from .models import build_model
from .train import resolve_device
from .trajectories import TrajectoryStore
from .tracking import (MlflowReporter, default_tracking_uri, flat_config, log_result, open_experiment, start_run)

CROSS_ARCH = ["convnet", "resnet18", "vgg11", "alexnet"]
SWEPT = ("distill.syn_steps", "distill.expert_epochs", "distill.max_start_epoch", "distill.lr_img",
         "distill.lr_lr", "distill.lr_teacher")


def default_space(cfg: Config, expert_epochs_available: int) -> dict:
    """Around the config's values; T+ - 1 + M never exceeds the epochs the experts have."""
    d = cfg.distill
    ms = [m for m in (1, 2, 3) if m < expert_epochs_available] or [1]
    t_max = max(1, expert_epochs_available - max(ms) + 1)
    starts = sorted({min(t_max, max(1, d.max_start_epoch // 2)), min(t_max, d.max_start_epoch)})
    return {
        "distill.syn_steps": tune.choice(sorted({max(1, d.syn_steps // 2), d.syn_steps, 2 * d.syn_steps})),
        "distill.expert_epochs": tune.choice(ms),
        "distill.max_start_epoch": tune.choice(starts),
        "distill.lr_img": tune.loguniform(d.lr_img / 10, d.lr_img * 10),
        "distill.lr_lr": tune.loguniform(d.lr_lr / 10, d.lr_lr * 10),
        "distill.lr_teacher": tune.loguniform(d.lr_teacher / 3, d.lr_teacher * 3),
    }


def parse_space(specs: list[str], cfg: Config) -> dict:
    """`key=loguniform:a:b`, `key=uniform:a:b`, `key=choice:v1,v2`, or `key=value` (fixed)."""
    space = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep:
            raise UserError(f"--space {spec!r}: expected key=kind:args, e.g. distill.lr_img=loguniform:10:1000")
        apply_overrides(Config(), {key: _first_value(value)}, f"--space {key}")  # validates the key and type
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
    """Reports validation accuracy to Tune (for ASHA) and everything to the trial's MLflow run."""

    def __init__(self, mlflow_reporter: MlflowReporter, losses: list[float]):
        self.mlflow, self.losses = mlflow_reporter, losses

    def step(self, iteration, metrics):
        self.losses.append(metrics["loss"])
        self.mlflow.step(iteration, metrics)

    def evaluation(self, iteration, metrics, synthetic):
        self.mlflow.evaluation(iteration, metrics, synthetic)
        recent = self.losses[-10:]
        tune.report({"iteration": iteration, "val_acc": metrics["val_acc"], "best_val_acc": metrics["best_val_acc"],
                     "loss": sum(recent) / len(recent) if recent else float("nan")})


def zca_for(trial_config: dict, zca: tuple | None) -> tuple | None:
    """The driver's ZCA matrices, unless the trial varies the data they were fitted on."""
    return None if any(key.startswith("data.") for key in trial_config) else zca


def run_trial(config: dict, base: dict, tracking_uri: str, parent_run_id: str, sweep_dir: str,
              zca: tuple | None = None) -> None:
    """One Tune trial: distill with the sampled hyperparameters; resumes its own checkpoint on restore.
    `zca`: the driver's ZCA matrices (a CIFAR-10 load takes 28.5 s with the fit, 1.4 s without, on the 2-core CPU)."""
    cfg = apply_overrides(config_from_dict(base), config, "search space").validate()
    trial_id = tune.get_context().get_trial_id()
    cfg.distill.out_dir = str(Path(sweep_dir) / "trials" / trial_id)
    out = Path(cfg.distill.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data, resolve_device(cfg.device), zca=zca_for(config, zca))
    client, experiment_id = open_experiment(tracking_uri, cfg.run_dir)
    run_file = out / "mlflow_run_id"  # a restored trial keeps logging into the same child run
    if run_file.is_file():
        run_id = run_file.read_text().strip()
    else:
        run_id = start_run(client, experiment_id, f"trial {trial_id}", {**flat_config(cfg), "trial_id": trial_id},
                           parent_run_id=parent_run_id)
        run_file.write_text(run_id)
    reporter = TuneReporter(MlflowReporter(client, run_id, data.preprocess, cfg.distill.ipc), [])
    distill(cfg, data, reporter=reporter, progress=False)
    client.set_tag(run_id, "ray_mtt.early_stopped", "false")
    client.set_terminated(run_id)


def expert_epochs_available(cfg: Config) -> int:
    store = TrajectoryStore(cfg.expert_dir)
    store.read_meta()  # a clear error when there is no store
    done = store.completed()
    if not done:
        raise UserError(f"{store.root} holds no finished experts; run `python -m ray_mtt.experts` or add --make-experts")
    return min(store.read_info(k)["shape"][0] for k in done) - 1


def cross_architecture(cfg: Config, best_path: Path, models: list[str],
                       zca: tuple | None = None) -> dict[str, dict[str, Score]]:
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, device, zca=zca)
    saved = load_synthetic(best_path, device)
    spec = data.spec
    usable = []
    for name in models:
        try:
            build_model(name, spec.channels, spec.num_classes, spec.size, cfg.model.width, cfg.model.depth)
            usable.append(name)
        except UserError as e:
            print(f"skipping {name} in the cross-architecture table: {e}")
    distilled = score(saved["images"], saved["labels"], float(saved["lr"]), cfg, data, models=usable, progress=True)
    x, y = random_real_set(cfg, data, seed=cfg.seed)
    real = score(x, y, cfg.eval.lr_real, cfg, data, models=usable, progress=True)
    return {"distilled": distilled, "random real": real}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_mtt.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--num-samples", type=int, default=8, help="trials to sample (default 8)")
    sweep.add_argument("--experts", help="trajectory store (path); default <run_dir>/<dataset>/experts_<model>[_zca]")
    sweep.add_argument("--make-experts", action="store_true", help="train the experts first when they are missing")
    sweep.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                       help="override one search dimension: loguniform:A:B, uniform:A:B, choice:X,Y or a fixed value")
    sweep.add_argument("--search", choices=("random", "optuna"), default="random")
    sweep.add_argument("--no-asha", action="store_true", help="run every trial to the end (no early stopping)")
    sweep.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1)
    sweep.add_argument("--gpus-per-trial", type=float, default=-1, help="default: 1 when the cluster has GPUs, else 0")
    sweep.add_argument("--name", help="sweep name (default <dataset>_ipc<k>); its folder is <run_dir>/tune/<name>")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep of the same name")
    sweep.add_argument("--tracking-uri", help="MLflow store (default sqlite:///<run_dir>/mlflow.db; http://... for a server)")
    sweep.add_argument("--eval-models", default=",".join(CROSS_ARCH), help="architectures scored for the best trial")
    sweep.add_argument("--address", help="Ray cluster address (default: connect to a running one, else start locally)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.experts:
        cfg.experts.dir = args.experts
    cfg = cfg.absolute_paths()
    if args.num_samples < 1:
        raise UserError("--num-samples must be >= 1")
    tracking_uri = args.tracking_uri or default_tracking_uri(cfg.run_dir)
    name = args.name or f"{cfg.data.dataset}_ipc{cfg.distill.ipc}"
    sweep_dir = Path(cfg.run_dir) / "tune" / name

    user_space = parse_space(args.space, cfg)  # fail fast on bad input, before data, experts and Ray
    zca = load_dataset(cfg.data, "cpu").preprocess.zca  # checks the data first; fits ZCA once for all trials
    if args.make_experts and not TrajectoryStore(cfg.expert_dir).completed():
        run_job(cfg, args.address)
    available = expert_epochs_available(cfg)
    space = {**default_space(cfg, available), **user_space}
    needed = max(_upper(space["distill.max_start_epoch"])) - 1 + max(_upper(space["distill.expert_epochs"]))
    if needed > available:
        raise UserError(f"the search space reaches max_start_epoch - 1 + expert_epochs = {needed} but the experts "
                        f"have {available} epochs; narrow --space or train longer experts")

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    connect(args.address)
    gpus = args.gpus_per_trial if args.gpus_per_trial >= 0 else (1 if ray.cluster_resources().get("GPU") else 0)
    if gpus == 0 and cfg.device == "auto":
        cfg.device = "cpu"  # a CPU-only trial must not pick up a GPU Ray did not assign to it

    client, experiment_id = open_experiment(tracking_uri, cfg.run_dir)
    parent_file = sweep_dir / "mlflow_parent_run_id"
    if args.resume and parent_file.is_file():
        parent_run_id = parent_file.read_text().strip()
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent_run_id = start_run(client, experiment_id, f"sweep {name}",
                                  {**flat_config(cfg), "num_samples": str(args.num_samples),
                                   "search": args.search, "space": repr(space)}, tags={"ray_mtt.kind": "sweep"})
        parent_file.write_text(parent_run_id)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                             sweep_dir=str(sweep_dir), zca=zca),
        {"cpu": args.cpus_per_trial, "gpu": gpus})
    storage = str(Path(cfg.run_dir) / "tune" / "ray")
    path = os.path.join(storage, name)
    if args.resume:
        if not tune.Tuner.can_restore(path):
            raise UserError(f"no sweep named {name!r} to resume in {storage}; drop --resume to start it")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        if tune.Tuner.can_restore(path):
            raise UserError(f"a sweep named {name!r} already exists in {storage}; add --resume to continue it "
                            f"or pass another --name")
        d = cfg.distill
        scheduler = None if args.no_asha else ASHAScheduler(
            time_attr="iteration", max_t=max(d.iterations, 1), grace_period=max(d.eval_every, 1), reduction_factor=2)
        search_alg = None
        if args.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch
            search_alg = OptunaSearch()
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=args.num_samples,
                                        scheduler=scheduler, search_alg=search_alg,
                                        max_concurrent_trials=args.max_concurrent or None),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1))
    grid = tuner.fit()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Tune leaves its handler: let Ctrl-C stop the scoring
    unfinished = args.num_samples - grid.num_terminated - grid.num_errors
    if unfinished > 0:  # Tune returns normally after Ctrl-C, having saved the experiment state
        raise UserError(f"sweep {name!r} stopped with {unfinished} of {args.num_samples} trials unfinished; "
                        f"continue it with the same command plus --resume")
    close_trial_runs(grid, client, sweep_dir, cfg.distill.iterations)
    finish(grid, cfg, args, client, parent_run_id, tracking_uri, zca)


def close_trial_runs(grid, client, sweep_dir: Path, iterations: int) -> None:
    """Tune ends a trial at the report where ASHA stops it or it reaches max_t, so the trial's own
    code never gets to close its MLflow run: close every run of the finished sweep here."""
    for result in grid:
        run_file = sweep_dir / "trials" / str(result.metrics.get("trial_id")) / "mlflow_run_id"
        if not run_file.is_file():
            continue
        run_id = run_file.read_text().strip()
        if client.get_run(run_id).info.status == "RUNNING":
            stopped_early = result.metrics.get("iteration", 0) < iterations
            client.set_tag(run_id, "ray_mtt.early_stopped", str(stopped_early).lower())
            client.set_terminated(run_id, "FAILED" if result.error else "FINISHED")


def _upper(domain) -> list:
    if hasattr(domain, "categories"):
        return list(domain.categories)
    if hasattr(domain, "upper"):
        return [domain.upper]
    return [domain]


def finish(grid, cfg: Config, args, client, parent_run_id: str, tracking_uri: str, zca: tuple | None) -> None:
    """Print the trials, score the best one across architectures, log it all to MLflow."""
    ok = [r for r in grid if r.error is None and r.metrics and "best_val_acc" in r.metrics]
    if not ok:
        errors = [str(r.error).splitlines()[0] for r in grid if r.error is not None][:3]
        raise UserError(f"no trial finished; first errors: {errors}")
    ok.sort(key=lambda r: -r.metrics["best_val_acc"])
    print("\ntrials (best validation accuracy over the run):")
    print("| trial | " + " | ".join(k.split(".")[1] for k in SWEPT) + " | iterations | best val acc |")
    print("|---|" + "---|" * (len(SWEPT) + 2))
    for r in ok:
        values = [r.config.get(k) for k in SWEPT]
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in values]
        print(f"| {Path(r.path).name[:24]} | " + " | ".join(cells) + f" | {r.metrics['iteration']} | "
              f"{100 * r.metrics['best_val_acc']:.1f} % |")
    best = ok[0]
    best_cfg = apply_overrides(config_from_dict(cfg.to_dict()), {k: best.config[k] for k in best.config}, "best")
    trial_dir = Path(cfg.run_dir) / "tune" / (args.name or f"{cfg.data.dataset}_ipc{cfg.distill.ipc}") / "trials" \
        / best.metrics["trial_id"]
    scores = cross_architecture(best_cfg, trial_dir / "best.pt", [m for m in args.eval_models.split(",") if m],
                                zca_for(best.config, zca))
    print(f"\nbest trial {best.metrics['trial_id']}: val acc {100 * best.metrics['best_val_acc']:.1f} %, "
          f"worst {100 * ok[-1].metrics['best_val_acc']:.1f} %; test accuracy over {cfg.eval.num_runs} networks:")
    print(format_table(scores))
    child_run_id = (trial_dir / "mlflow_run_id").read_text().strip()
    summary = {"best_val_acc": best.metrics["best_val_acc"], "worst_val_acc": ok[-1].metrics["best_val_acc"],
               "trials": len(ok)}
    for run_id in (child_run_id, parent_run_id):
        log_result(client, run_id, scores, summary)
    client.log_artifact(parent_run_id, str(trial_dir / "best.pt"), artifact_path="distilled")
    client.set_tag(parent_run_id, "ray_mtt.best_trial_run_id", child_run_id)
    client.set_terminated(parent_run_id)
    print(f"MLflow: {tracking_uri} (parent run {parent_run_id}); open it with "
          f"`mlflow ui --backend-store-uri {tracking_uri}`")


if __name__ == "__main__":
    run_cli(main)
