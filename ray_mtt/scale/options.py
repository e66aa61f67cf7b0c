"""What the experts job and a sweep take besides the config, each option declared once.

Each field is one command-line flag (`--field-name`; a True-by-default bool is `--no-field-name`)
whose help is the field's comment and whose type, choices and default are its declaration
(cli/common.py `add_options`); `metadata` adds argparse settings where a flag needs more. The module
imports no ray, so a torch-only box can still parse the flags of a local run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CROSS_ARCH = ["convnet", "resnet18", "vgg11", "alexnet"]


@dataclass
class JobResources:
    workers: int = 0  # most Ray Train workers; 0 = one per unfinished expert (an autoscaler adds nodes for them)
    min_workers: int = 1  # the job starts once this many workers fit, then grows as nodes arrive
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # auto: when the cluster or its autoscaler config has GPUs
    gpus_per_worker: float = 1.0  # GPUs per worker, fractional allowed (0.25: four ConvNet experts share a GPU)
    cpus_per_worker: float = 1.0  # CPUs per worker; also its torch thread count
    max_failures: int = 3  # worker-group restarts (a dead worker or node) before the job gives up
    resize_check_s: float = 60.0  # how often Ray Train considers adding workers as nodes arrive


@dataclass
class SweepOptions:
    name: str = ""  # sweep name; its folder is <run_dir>/tune/<name>; "" = <dataset>_ipc<k>
    num_samples: int = 8  # trials to sample
    make_experts: bool = False  # train the experts first when they are missing
    # Override one search dimension: loguniform:A:B, uniform:A:B, choice:X,Y or a fixed value (repeatable).
    space: list[str] = field(default_factory=list, metadata={"action": "append", "metavar": "KEY=SPEC"})
    search: Literal["random", "optuna"] = "random"  # random sampling, or Optuna's TPE
    asha: bool = True  # ASHA stops weak trials early on the periodic validation accuracy
    max_concurrent: int = 0  # trials at once; 0 = as resources allow
    cpus_per_trial: float = 1.0  # CPUs per trial
    gpus_per_trial: float = -1.0  # GPUs per trial; -1 = 1 when the cluster has GPUs, else 0
    resume: bool = False  # continue the sweep of the same name
    # MLflow store; "" = $RAY_MTT_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db; http://... for a server
    tracking_uri: str = ""
    eval_models: list[str] = field(default_factory=lambda: list(CROSS_ARCH))  # architectures scored for the best trial
    address: str = ""  # Ray cluster address; "" = connect to a running one, else start locally
    # Tune's state and trial checkpoints; on a cluster a URI every node can write (s3://BUCKET/sweeps);
    # "" = $RAY_MTT_STORAGE/sweeps, else <run_dir>/tune/ray.
    storage: str = ""
    max_trial_failures: int = 2  # restarts of a trial (e.g. its node was lost) from its last checkpoint
