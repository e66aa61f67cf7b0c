"""Typed configs for every stage, loaded from configs/<dataset>_ipc<k>.yaml and the command line.

Precedence: dataclass defaults < YAML file < command-line flags. Every field is a flag named
`--section.field` (e.g. `--distill.syn_steps 30`); `--dataset`, `--ipc` and `--data-dir` are
short forms of the most used ones.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .storage import is_uri



def _config_dir() -> Path:
    """The shipped configs: the repository's top-level configs/, installed as the package data ray_mtt.configs."""
    try:
        return Path(str(importlib.resources.files("ray_mtt.configs")))
    except ModuleNotFoundError:  # a checkout run without installing it (e.g. copied to a bare GPU box)
        return Path(__file__).resolve().parents[2] / "configs"


CONFIG_DIR = _config_dir()


@dataclass
class DataConfig:
    dataset: str = "digits"  # a registered name (cifar10, tiny_imagenet, folder, ...); see data.py
    data_dir: str = ""  # folder with <dataset>.npz or the official files; "" = built-in/default location
    download: bool = False  # fetch the official files into data_dir when missing (needs internet)
    zca: bool = False  # ZCA whitening instead of mean/std normalization (kornia, eps 0.1)
    val_per_class: int = 10  # real images per class held out from training, for checkpoint selection
    train_per_class: int = 0  # keep only the first k training images per class (quick runs); 0 = all
    image_size: int = 32  # --dataset folder: images are resized to image_size x image_size
    test_fraction: float = 0.2  # --dataset folder without train/ and test/: share of each class kept for testing
    # How expert training reads the training split: "tensor" keeps it as uint8 on the device (fast,
    # needs the memory); "ffcv" streams a .beton written once (beton.py; pip install 'ray_mtt[ffcv]').
    loader: str = "tensor"
    beton_dir: str = ""  # where .beton files are written; "" = <run_dir>/<dataset>; shared on a cluster
    beton_format: str = "raw"  # raw pixels (exact) | jpg (JPEG quality 90: smaller, lossy, RGB only)
    beton_workers: int = 0  # FFCV decoding threads (FFCV gives torch as many); 0 = torch's thread count


@dataclass
class ModelConfig:
    name: str = "convnet"  # a registered architecture (models.py): convnet, resnet18, vgg11, alexnet, ...
    width: int = 0  # conv channels of a ConvNet; 0 = the model's default (128); others take none
    depth: int = 0  # ConvNet depth; 0 = by resolution (3 at 32 px, 4 at 64 px, 5 at 128 px); others take none


@dataclass
class AugmentConfig:
    strategy: str = "color_crop_cutout_flip_scale_rotate"  # DSA op groups, one drawn per batch; "none" disables
    siamese: bool = False  # share one parameter draw across the batch (DSA) instead of one per image (MTT)


@dataclass
class ExpertConfig:
    num_experts: int = 4  # expert trajectories to train (the paper: 100)
    epochs: int = 10  # epochs per expert; only max_start_epoch + expert_epochs are ever used
    lr: float = 0.01  # expert SGD step size (each value needs its own store)
    batch_size: int = 256  # real images per expert SGD step
    momentum: float = 0.0  # expert SGD momentum (the paper: 0; not part of a trajectory)
    weight_decay: float = 0.0  # expert SGD weight decay (the paper: 0)
    # sgd (MTT) | gsam: FTD's flat experts, two forward/backward passes per step on the same batch
    optimizer: str = "sgd"
    gsam_rho: float = 0.01  # GSAM's perturbation radius rho (ASAM-style adaptive perturbation; FTD: 0.01)
    gsam_alpha: float = 0.3  # GSAM's weight of the orthogonal gradient component (FTD: 0.3 for CIFAR-10)
    # none | pad: PAD's schedule over EL2N difficulty (difficulty.py): up to epoch AEE an expert sees the
    # easiest share p = min(1, IR + (1 - IR) * e / AEE) of each class, then all of it, then all but the
    # easiest removal_ratios[i] of each class after removal_epochs[i]
    data_schedule: str = "none"
    schedule_ir: float = 0.75  # IR: the easiest share of each class an expert starts on
    schedule_aee: int = 20  # AEE: the epoch from which an expert sees every image
    removal_epochs: list[int] = field(default_factory=lambda: [40, 60])  # after these epochs the easiest ...
    removal_ratios: list[float] = field(default_factory=lambda: [0.1, 0.2])  # ... share of each class is dropped
    difficulty_networks: int = 4  # EL2N: networks trained briefly, their scores averaged
    difficulty_epochs: int = 10  # EL2N: epochs each scoring network trains (as an expert does)
    # trajectory store, a path or URI (s3://...); "" = <run_dir>/<dataset>/experts_<model>[_zca], or the same
    # name under $RAY_MTT_STORAGE when set
    dir: str = ""


@dataclass
class DistillConfig:
    ipc: int = 1  # synthetic images per class
    syn_steps: int = 20  # N: student steps on the synthetic set per iteration
    expert_epochs: int = 2  # M: target is M expert epochs after the start
    max_start_epoch: int = 5  # T+: start epoch drawn from {T-, ..., T+ - 1}
    # DATM's difficulty-aligned window: the draw's upper bound UB starts at T and grows to T+ over E
    # iterations, UB = min(T + (T+ - T) * iteration // E, T+); the start epoch is drawn from {T-, ..., UB - 1}.
    min_start_epoch: int = 0  # T-: the smallest start epoch drawn
    first_max_start_epoch: int = 0  # T: the upper bound at iteration 0 (exclusive); 0 = T+ from the start (MTT)
    expansion_iterations: int = 0  # E: iterations over which the upper bound grows from T to T+
    iterations: int = 300  # outer iterations (the paper: 5000)
    lr_img: float = 100.0  # SGD step size (momentum 0.5) of the synthetic pixels
    lr_lr: float = 1e-5  # SGD step size (momentum 0.5) of the learnable alpha
    lr_teacher: float = 0.01  # initial learnable student step size alpha
    batch_syn: int = 0  # synthetic minibatch per student step; 0 = the whole set
    # real: random real images; noise; correct: per class the first ipc real images (seeded order) that an
    # expert's final snapshot classifies correctly (DATM)
    init: str = "real"
    # learn a logit vector per image (DATM): initialised to the mean final-snapshot logits of the experts
    # that classify the image correctly; student steps and evaluation train on softmax(logits)
    soft_labels: bool = False
    lr_y: float = 2.0  # SGD step size of the soft labels' logits
    momentum_y: float = 0.9  # SGD momentum of the soft labels' logits
    loss_threshold: float = 0.0  # an iteration whose matching loss exceeds this takes no optimizer step; 0 = off
    # PAD's depth mask: the first floor(mask_ratio * P) entries of the flat parameters (module order: the
    # shallow layers) are left out of both norms of the matching loss
    mask_ratio: float = 0.0
    auto_length: bool = False  # ATT: match at the inner step closest (L1) to the target, not at step N
    # FTD: beta of an EMA of the images after every image step (0 = off); validation and the report score
    # the EMA set too, on fresh networks, and keep its best as best_ema.pt
    ema: float = 0.0
    grad_mode: str = "unrolled"  # unrolled (keep the whole graph) | checkpointed (memory flat in N)
    eval_every: int = 100  # evaluate on the validation split every k iterations (0 = only at the end)
    eval_runs: int = 2  # networks trained per periodic validation
    eval_epochs: int = 0  # training epochs of each periodic validation; 0 = eval.epochs (a shorter proxy saves time)
    out_dir: str = ""  # "" = <run_dir>/<dataset>/ipc<ipc>


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["convnet"])  # architectures trained on the final set
    num_runs: int = 5  # fresh networks per architecture; the report is their mean +- std
    epochs: int = 1000  # training epochs of each network (+1 pass, as the authors); lr x0.1 after the half
    batch_size: int = 256  # images per SGD step of an evaluation network
    momentum: float = 0.9  # SGD momentum of an evaluation network
    weight_decay: float = 5e-4  # SGD weight decay of an evaluation network
    lr_real: float = 0.01  # step size for the random-real baseline (it has no learned lr)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the family of shipped configs: mtt (configs/<dataset>_ipc<k>.yaml), datm, ftd or pad (configs/<method>/...);
    # the options themselves decide what runs, this names where the defaults came from
    method: str = "mtt"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # root of every random stream (seeds.py): experts, distillation, evaluation, DSA
    run_dir: str = "runs"  # where outputs go: <run_dir>/<dataset>/..., the local MLflow store

    @property
    def expert_dir(self) -> str:
        """The trajectory store: a local path or a URI (s3://..., file://...; see storage.py)."""
        return self.experts.dir or str(Path(self.run_dir) / self.store_name)

    @property
    def store_name(self) -> str:
        """<dataset>/experts_<model>[_zca]: the default store's place under run_dir or a storage root."""
        return f"{self.data.dataset}/experts_{self.model.name}{'_zca' if self.data.zca else ''}"

    @property
    def distill_dir(self) -> Path:
        if self.distill.out_dir:
            return Path(self.distill.out_dir)
        return Path(self.run_dir) / self.data.dataset / f"ipc{self.distill.ipc}"

    def absolute_paths(self) -> "Config":
        """Ray runs workers and trials in folders of their own: make every local path absolute."""
        self.run_dir = str(Path(self.run_dir).resolve())
        if not is_uri(self.expert_dir):
            self.experts.dir = str(Path(self.expert_dir).resolve())
        for field_name in ("data_dir", "beton_dir"):
            if getattr(self.data, field_name):
                setattr(self.data, field_name, str(Path(getattr(self.data, field_name)).resolve()))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        d, e, v = self.distill, self.experts, self.eval
        checks = [
            (d.ipc >= 1, f"distill.ipc must be >= 1, got {d.ipc}"),
            (d.syn_steps >= 1, f"distill.syn_steps must be >= 1, got {d.syn_steps}"),
            (d.expert_epochs >= 1, f"distill.expert_epochs must be >= 1, got {d.expert_epochs}"),
            (d.max_start_epoch >= 1, f"distill.max_start_epoch must be >= 1, got {d.max_start_epoch}"),
            (d.iterations >= 0, f"distill.iterations must be >= 0, got {d.iterations}"),
            (d.lr_img > 0 and d.lr_lr >= 0 and d.lr_teacher > 0, "distill learning rates must be positive"),
            (d.batch_syn >= 0, f"distill.batch_syn must be >= 0 (0 = all), got {d.batch_syn}"),
            (d.init in ("real", "noise", "correct"), f"distill.init must be 'real', 'noise' or 'correct', got {d.init!r}"),
            (0 <= d.min_start_epoch < d.max_start_epoch,
             f"distill.min_start_epoch must lie in [0, max_start_epoch), got {d.min_start_epoch}"),
            (not d.first_max_start_epoch or (d.min_start_epoch < d.first_max_start_epoch <= d.max_start_epoch
                                             and d.expansion_iterations >= 1),
             "distill.first_max_start_epoch must lie in (min_start_epoch, max_start_epoch] with "
             "distill.expansion_iterations >= 1 (or be 0 for a fixed window)"),
            (d.lr_y > 0 and 0 <= d.momentum_y < 1, "distill.lr_y must be > 0 and distill.momentum_y in [0, 1)"),
            (d.loss_threshold >= 0, f"distill.loss_threshold must be >= 0 (0 = off), got {d.loss_threshold}"),
            (0 <= d.mask_ratio < 1, f"distill.mask_ratio must lie in [0, 1), got {d.mask_ratio}"),
            (0 <= d.ema < 1, f"distill.ema must lie in [0, 1) (0 = off), got {d.ema}"),
            (d.grad_mode in ("unrolled", "checkpointed"),
             f"distill.grad_mode must be 'unrolled' or 'checkpointed', got {d.grad_mode!r}"),
            (d.eval_every >= 0 and d.eval_runs >= 1 and d.eval_epochs >= 0,
             "distill.eval_every and distill.eval_epochs must be >= 0, distill.eval_runs >= 1"),
            (e.num_experts >= 1 and e.epochs >= 1, "experts.num_experts and experts.epochs must be >= 1"),
            (e.lr > 0 and e.batch_size >= 1, "experts.lr must be > 0 and experts.batch_size >= 1"),
            (e.optimizer in ("sgd", "gsam"), f"experts.optimizer must be 'sgd' or 'gsam', got {e.optimizer!r}"),
            (e.gsam_rho > 0 and e.gsam_alpha >= 0, "experts.gsam_rho must be > 0 and experts.gsam_alpha >= 0"),
            (e.data_schedule in ("none", "pad"), f"experts.data_schedule must be 'none' or 'pad', got {e.data_schedule!r}"),
            (0 < e.schedule_ir <= 1 and e.schedule_aee >= 1, "experts.schedule_ir must lie in (0, 1], schedule_aee >= 1"),
            (len(e.removal_epochs) == len(e.removal_ratios) and all(0 <= r < 1 for r in e.removal_ratios)
             and e.removal_epochs == sorted(e.removal_epochs),
             "experts.removal_epochs (ascending) and experts.removal_ratios (each in [0, 1)) need one ratio per epoch"),
            (e.difficulty_networks >= 1 and e.difficulty_epochs >= 1,
             "experts.difficulty_networks and experts.difficulty_epochs must be >= 1"),
            (e.data_schedule == "none" or self.data.loader == "tensor",
             "experts.data_schedule pad needs data.loader tensor (the .beton loader streams every image)"),
            (v.num_runs >= 1 and v.epochs >= 1 and v.batch_size >= 1, "eval.num_runs, eval.epochs, eval.batch_size must be >= 1"),
            (len(v.models) >= 1, "eval.models must name at least one model"),
            (self.data.val_per_class >= 0 and self.data.train_per_class >= 0,
             "data.val_per_class and data.train_per_class must be >= 0"),
            (self.data.loader in ("tensor", "ffcv"), f"data.loader must be 'tensor' or 'ffcv', got {self.data.loader!r}"),
            (self.data.beton_format in ("raw", "jpg"),
             f"data.beton_format must be 'raw' or 'jpg', got {self.data.beton_format!r}"),
            (self.data.beton_workers >= 0, "data.beton_workers must be >= 0 (0 = torch's thread count)"),
            (not is_uri(self.data.beton_dir), "data.beton_dir must be a local or shared-filesystem path: FFCV "
             "memory-maps the file, it cannot read a URI"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.data.image_size >= 8, f"data.image_size must be >= 8, got {self.data.image_size}"),
            (0 < self.data.test_fraction < 1, f"data.test_fraction must lie in (0, 1), got {self.data.test_fraction}"),
            (self.model.width >= 0 and self.model.depth >= 0, "model.width and model.depth must be >= 0 (0 = the model's default)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


SECTIONS = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]


def field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def field_help(cls) -> dict[str, str]:
    """Each field's help text: its trailing comment, else the comment lines just above it.
    The source is the single place a field is explained, so --help can never drift from it."""
    helps, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        name = re.match(r"(\w+)\s*:", stripped)
        if name and name.group(1) in cls.__dataclass_fields__:
            _, hash_, trailing = stripped.partition("  # ")
            helps[name.group(1)] = trailing.strip() if hash_ else " ".join(above)
        above = []
    return helps


def parse_value(text: str, kind, key: str):
    try:
        if kind is bool:
            lowered = str(text).lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(kind) is list:
            items = text if isinstance(text, list) else [s for s in str(text).split(",") if s]
            item_kind = typing.get_args(kind)[0]
            return [item_kind(s) for s in items]
        if kind is float and isinstance(text, str):
            return float(text)
        return kind(text)
    except (TypeError, ValueError):
        raise UserError(f"{key}: cannot read {text!r} as {getattr(kind, '__name__', kind)}; fix the value") from None


def apply_overrides(cfg: Config, values: dict, source: str) -> Config:
    """Set `section.field` (or top-level field) values, rejecting unknown keys by name."""
    top_types = field_types(Config)
    for key, value in values.items():
        section, _, name = key.partition(".")
        if name:
            if section not in SECTIONS:
                raise UserError(f"{source}: unknown config section {section!r}; known: {', '.join(SECTIONS)}")
            target = getattr(cfg, section)
            types = field_types(type(target))
            if name not in types:
                raise UserError(f"{source}: unknown key {key!r}; known in {section}: {', '.join(types)}")
            setattr(target, name, parse_value(value, types[name], key))
        elif key in top_types and key not in SECTIONS:
            setattr(cfg, key, parse_value(value, top_types[key], key))
        else:
            raise UserError(f"{source}: unknown config key {key!r}")
    return cfg


def flatten_sections(tree: dict, source: str) -> dict:
    """{section: {field: v}} -> {'section.field': v}, rejecting unknown sections."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise UserError(f"{source}: unknown config section {key!r}; known: {', '.join(SECTIONS)}")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_from_dict(tree: dict) -> Config:
    """The inverse of Config.to_dict (how configs travel to Ray workers and trials)."""
    return apply_overrides(Config(), flatten_sections(tree, "passed config"), "passed config")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing --config or omit it")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return flatten_sections(tree, str(path))


METHODS = ("mtt", "datm", "ftd", "pad")  # mtt's configs sit at the top of the config folder, each other method's in its own


def default_config_path(dataset: str, ipc: int, method: str = "mtt") -> Path:
    return (CONFIG_DIR if method == "mtt" else CONFIG_DIR / method) / f"{dataset}_ipc{ipc}.yaml"


def shipped_configs(method: str) -> list[str]:
    """The <dataset>_ipc<k> names a method ships configs for."""
    folder = CONFIG_DIR if method == "mtt" else CONFIG_DIR / method
    return sorted(p.stem for p in folder.glob("*_ipc*.yaml"))
