"""What every command shares: one-line errors, config flags, MLflow tracking flags, engine choice."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import sys
import typing
from pathlib import Path
from typing import Callable

from ..core.config import (METHODS, SECTIONS, Config, apply_overrides, default_config_path, field_help, field_types,
                           load_yaml, parse_value, shipped_configs)
from ..core.data import Dataset, load_dataset
from ..core.distill import Reporter
from ..core.errors import Interrupted, UserError
from ..core.difficulty import score_locally
from ..core.experts import epoch_batches, load_expert_data, train_experts
from ..core.train import resolve_device
from ..core.trajectories import TrajectoryStore
from ..scale.options import JobResources
from ..scale.places import apply_storage_default, default_tracking_uri


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a CLI entry point; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main(argv)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_command(prog: str, doc: str | None, argv: list[str] | None,
                  *add_args: Callable[[argparse.ArgumentParser], None]) -> tuple[argparse.Namespace, Config]:
    """A command's flags (its own, added by `add_args`, then every config field) and its config."""
    parser = new_parser(prog, doc)
    for add in add_args:
        add(parser)
    add_config_args(parser)
    args = parser.parse_args(argv)
    return args, config_from_args(args)


# ---------------------------------------------------------------- the config
def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add --config, the short flags, and one `--section.field` flag per config field, whose help
    is the field's comment in core/config.py."""
    parser.add_argument("--config", help="YAML config; default: the shipped <dataset>_ipc<ipc>.yaml of --method "
                        "when it exists")
    parser.add_argument("--dataset", dest="data.dataset", default=argparse.SUPPRESS, help="short for --data.dataset")
    parser.add_argument("--ipc", dest="distill.ipc", default=argparse.SUPPRESS, help="short for --distill.ipc")
    parser.add_argument("--data-dir", dest="data.data_dir", default=argparse.SUPPRESS, help="short for --data.data_dir")
    defaults = Config()
    for section in [*SECTIONS, None]:
        obj = getattr(defaults, section) if section else defaults
        group = parser.add_argument_group(section or "run")
        helps = field_help(type(obj))
        for name, kind in field_types(type(obj)).items():
            if name in SECTIONS:
                continue
            default = getattr(obj, name)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            flag = f"{section}.{name}" if section else name
            group.add_argument(f"--{flag}", dest=flag, default=argparse.SUPPRESS,
                               metavar=getattr(kind, "__name__", "LIST").upper(),
                               help=f"{helps.get(name, '')} (default: {shown!r})".replace("%", "%%"))


def config_from_args(args: argparse.Namespace, announce: bool = True, base: Config | None = None) -> Config:
    """Defaults (or `base`, e.g. the config a distilled set was made with), then the YAML (explicit
    --config, or without a base the shipped one for dataset x IPC), then flags. `announce` prints
    where the config came from and every value in use."""
    cli = {k: v for k, v in vars(args).items() if "." in k or k in ("device", "seed", "run_dir", "method")}
    cfg = base or Config()
    config_path = getattr(args, "config", None)
    if config_path is None and base is None:
        config_path = shipped_config(cli.get("data.dataset", cfg.data.dataset),
                                     parse_value(cli.get("distill.ipc", cfg.distill.ipc), int, "distill.ipc"),
                                     cli.get("method", cfg.method))
    if config_path is not None:
        apply_overrides(cfg, load_yaml(config_path), str(config_path))
    apply_overrides(cfg, cli, "command line")
    apply_storage_default(cfg)  # the cluster's RAY_MTT_STORAGE, when no store was named
    cfg.validate()
    if announce:
        print(describe_config(cfg, config_path or ("the distilled set's own" if base else None), sorted(cli)),
              flush=True)
    return cfg


def shipped_config(dataset: str, ipc: int, method: str) -> Path | None:
    """The shipped config of dataset x IPC for a method: MTT falls back to the defaults where none ships;
    another method was asked for by name, so a missing one is an error naming those that exist."""
    if method not in METHODS:
        raise UserError(f"--method {method!r} is unknown; known: {', '.join(METHODS)}")
    path = default_config_path(dataset, ipc, method)
    if path.is_file():
        return path
    if method == "mtt":
        return None
    raise UserError(f"--method {method} ships no config for {dataset} IPC {ipc}; shipped: "
                    f"{', '.join(shipped_configs(method))}; or pass --config FILE")


def describe_config(cfg: Config, path, flags: list[str]) -> str:
    source = f"{path}" if path else "defaults (no shipped config for this dataset and IPC)"
    lines = [f"config: {source}" + (f" + flags {', '.join(flags)}" if flags else "")]
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            lines.append(f"  {section}: " + " ".join(f"{k}={v}" for k, v in values.items()))
    lines.append(f"  run: method={cfg.method} device={cfg.device} seed={cfg.seed} run_dir={cfg.run_dir}")
    return "\n".join(lines)


# ---------------------------------------------------------------- MLflow
def add_tracking_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow store: default $RAY_MTT_TRACKING_URI, else "
                        "sqlite:///<run_dir>/mlflow.db when mlflow is installed; http://host:port for a server; "
                        "'none' to turn tracking off")


def open_tracking(tracking_uri: str | None, cfg: Config, run_name: str):
    """A TrackedRun (scale/tracking.py), or None when tracking is off or mlflow is absent.
    mlflow is imported only here, so the algorithm keeps running on a box with only torch."""
    if tracking_uri == "none":
        return None
    try:
        from ..scale import tracking
    except ImportError:
        if tracking_uri:
            raise UserError("--tracking-uri needs mlflow (pip install mlflow); or pass --tracking-uri none") from None
        print("mlflow is not installed: not tracking this run")
        return None
    return tracking.TrackedRun(tracking_uri or default_tracking_uri(cfg.run_dir), cfg, run_name)


@contextlib.contextmanager
def tracked_run(tracking_uri: str | None, cfg: Config, run_name: str):
    """open_tracking's run, closed as FAILED (KILLED on Ctrl-C) when the work inside raises; the
    caller closes it with finish_tracking on success."""
    tracked = open_tracking(tracking_uri, cfg, run_name)
    try:
        yield tracked
    except BaseException as e:
        if tracked is not None:
            tracked.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def reporter_for(tracked, data: Dataset, cfg: Config) -> Reporter | None:
    return None if tracked is None else tracked.reporter(data, cfg.distill.ipc)


def finish_tracking(tracked, scores: dict, summary: dict) -> None:
    if tracked is not None:
        tracked.finish(scores, summary)


# ---------------------------------------------------------------- options dataclasses
def add_options(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One flag per field of an options dataclass (scale/options.py): `--field-name` with the field's
    type, choices (a Literal) and default, and its comment as help; a bool that defaults to True is
    `--no-field-name`, a list is comma-separated (or one item per flag with action "append"). Field
    metadata passes extra argparse settings."""
    group = parser.add_argument_group(title)
    helps, kinds = field_help(cls), field_types(cls)
    for f in dataclasses.fields(cls):
        kind = kinds[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = (",".join(default) or "none") if isinstance(default, list) else repr(default)
        settings = {"dest": f.name, "default": default, "help": f"{helps.get(f.name, '')} (default: {shown})"}
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            settings["action"] = "store_false" if default else "store_true"
            if default:  # the flag turns it off
                flag, settings["help"] = flag.replace("--", "--no-"), f"turn off: {helps.get(f.name, '')}"
        elif typing.get_origin(kind) is typing.Literal:
            settings["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is list and f.metadata.get("action") == "append":
            settings["type"] = str  # one item per repeated flag (items may hold commas)
        elif typing.get_origin(kind) is list:
            settings["type"] = lambda text: [item for item in text.split(",") if item]
        else:
            settings["type"] = kind
        group.add_argument(flag, **{**settings, **f.metadata})


def options_from_args(cls, args: argparse.Namespace):
    """The options dataclass `add_options` made flags for, filled from the parsed flags."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------- where experts train
def add_job_args(parser: argparse.ArgumentParser) -> None:
    """Flags that choose where experts train: Ray Train workers (scale/experts_job.py) or this process."""
    job = parser.add_argument_group("expert job")
    has_ray = importlib.util.find_spec("ray") is not None
    job.add_argument("--engine", choices=("ray", "local"), default="ray" if has_ray else "local",
                     help="ray: Ray Train workers (default when ray is installed); local: this process, torch only")
    job.add_argument("--address", help="Ray cluster address (default: the one running here, else a new local one)")
    add_options(parser, JobResources, "expert job on Ray")


def make_experts(cfg: Config, args: argparse.Namespace, data: Dataset | None = None,
                 progress: bool = True) -> TrajectoryStore:
    """Train the experts the store lacks with the engine that `add_job_args` flags chose (first the
    EL2N scores their data schedule needs, when they have one)."""
    if cfg.experts.data_schedule == "pad":
        data = score_difficulty(cfg, args, data)  # checks for ray itself, before any scoring
    if args.engine == "ray":
        require_ray()
        from ..scale.experts_job import run_job
        return run_job(cfg.absolute_paths(), args.address, options_from_args(JobResources, args))
    return train_experts(cfg, data or load_expert_data(cfg, resolve_device(cfg.device)), progress=progress)


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise UserError("--engine ray needs ray (pip install 'ray[train]'); or pass --engine local")


def score_difficulty(cfg: Config, args: argparse.Namespace, data: Dataset | None = None) -> Dataset | None:
    """PAD's EL2N scores for the store (kept when there): Ray tasks or this process; returns the data
    it loaded (None on Ray, where the workers get it from the object store)."""
    if args.engine == "ray":
        require_ray()
        from ..scale.difficulty_job import run_scoring
        run_scoring(cfg.absolute_paths(), args.address, options_from_args(JobResources, args))
        return data
    data = data or load_data(cfg)
    score_locally(cfg, data, epoch_batches(cfg, data))
    return data


def load_data(cfg: Config) -> Dataset:
    return load_dataset(cfg.data, resolve_device(cfg.device))
