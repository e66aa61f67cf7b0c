"""MLflow tracking (orchestration layer): runs, metrics, image grids, distilled sets, accuracy tables.

Uses MlflowClient with explicit run ids rather than mlflow's global active run, so several Tune
trials can log from one process. The default store (scale/places.py) is the cluster's server
($RAY_MTT_TRACKING_URI) when set, else a local sqlite file with artifacts in a folder beside it, so
nothing needs a server; `--tracking-uri http://host:port` logs to a server.
"""
from __future__ import annotations

import logging
import math
import re
import socket
import tempfile
import time
from pathlib import Path

import mlflow
import mlflow.data
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient

from ..core.config import Config
from ..core.data import Dataset, Preprocess
from ..core.distill import Reporter
from ..core.evaluate import Score
from ..core.export import image_grid

EXPERIMENT = "ray_mtt"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"


def open_experiment(tracking_uri: str, run_dir: str | Path, name: str = EXPERIMENT) -> tuple[MlflowClient, str]:
    """The client and experiment id; a local store keeps artifacts under <run_dir>/mlartifacts."""
    for logger in ("alembic", "mlflow.store.db.utils", "mlflow.system_metrics"):  # chatter on every run
        logging.getLogger(logger).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    # Without an explicit location a sqlite store writes artifacts to ./mlruns of whatever the cwd is.
    location = None if tracking_uri.startswith("http") else (Path(run_dir).resolve() / "mlartifacts").as_uri()
    return client, client.create_experiment(name, artifact_location=location)


def flat_config(cfg: Config) -> dict[str, str]:
    """Every config value as a param, plus log10 of the learning rates: on a linear axis 1e-7 and
    1e-5 both read 0.00000, so compare views plot the exponents."""
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": ",".join(map(str, v)) if isinstance(v, list) else str(v)
                         for k, v in values.items()})
        else:
            flat[section] = str(values)
    for name in ("lr_img", "lr_lr", "lr_teacher", "lr_y"):
        value = getattr(cfg.distill, name)
        flat[f"distill.log10_{name}"] = f"{math.log10(value):.3f}" if value > 0 else "-inf"
    return flat


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open the runs: the command that serves the UI, and the URL of the experiment's runs
    table in "Model training" mode (MLflow 3.17 otherwise opens its GenAI traces view)."""
    serve = (f"mlflow ui --backend-store-uri {tracking_uri}" if not tracking_uri.startswith("http")
             else "(the server at that address)")
    base = tracking_uri if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    return f"MLflow UI: {serve}, then {base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def log_dataset(client: MlflowClient, run_id: str, images: np.ndarray, labels: np.ndarray, name: str,
                context: str) -> None:
    """Record a dataset as a run input, with its digest, so the UI shows lineage."""
    dataset = mlflow.data.from_numpy(images, targets=labels, name=name)
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context",
                                                                                        context)])])


def system_metrics(run_id: str, tracking_uri: str):
    """CPU/GPU utilisation and memory of this process's node, logged into the run until .finish()."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, node_id=socket.gethostname(),
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics stamped now, at `step` (log_batch splits them into batches of MLflow's size)."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def start_run(client: MlflowClient, experiment_id: str, name: str, params: dict[str, str],
              parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    all_tags = {**(tags or {}), **({PARENT_TAG: parent_run_id} if parent_run_id else {})}
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])  # it splits them
    return run.info.run_id


def synthetic_grid(images: torch.Tensor, preprocess: Preprocess, ipc: int) -> np.ndarray:
    """Synthetic images (network-input space) -> uint8 HxWxC grid, one column per class."""
    return image_grid(preprocess.inverse(images.detach().to(preprocess.mean.device).float()).cpu(), ipc)


class MlflowReporter(Reporter):
    """Logs a distillation run: metrics per iteration (learned lr also as log10), the set's image grid
    at every evaluation as a stepped image (the UI's slider shows it evolve), the best set as an
    artifact and as a dataset input beside the real training split."""

    def __init__(self, client: MlflowClient, run_id: str, data: Dataset, ipc: int):
        self.client, self.run_id, self.preprocess, self.ipc = client, run_id, data.preprocess, ipc
        log_dataset(client, run_id, data.x_train.cpu().numpy(), data.y_train.cpu().numpy(),
                    f"{data.spec.name} training split", "training")

    def step(self, iteration: int, metrics: dict[str, float]) -> None:
        lr = metrics.get("syn_lr", 0)
        log_metrics(self.client, self.run_id, {**metrics, **({"log10_syn_lr": math.log10(lr)} if lr > 0 else {})},
                    iteration)

    def evaluation(self, iteration: int, metrics: dict[str, float], synthetic: dict) -> None:
        log_metrics(self.client, self.run_id, metrics, iteration)
        grid = synthetic_grid(synthetic["images"], self.preprocess, self.ipc)
        self.client.log_image(self.run_id, grid, key="synthetic", step=iteration)
        self.client.log_image(self.run_id, grid, artifact_file=f"synthetic/iter_{iteration:06d}.png")
        if metrics["val_acc"] >= metrics["best_val_acc"]:
            log_dataset(self.client, self.run_id, synthetic["images"].numpy(), synthetic["labels"].numpy(),
                        f"distilled set, iteration {iteration}", "distilled")
            # Logged as soon as it is the best, so a trial that early stopping ends keeps its set.
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "best.pt"
                torch.save({**synthetic, "iteration": iteration, "val_acc": metrics["val_acc"]}, path)
                self.client.log_artifact(self.run_id, str(path), artifact_path="distilled")


class TrackedRun:
    """The MLflow run of one command: opened with system metrics on, closed FINISHED on success,
    FAILED or KILLED when the work inside raised, so no run is left RUNNING in the UI."""

    def __init__(self, tracking_uri: str, cfg: Config, name: str, kind: str = "distill"):
        self.client, experiment_id = open_experiment(tracking_uri, cfg.run_dir)
        self.run_id = start_run(self.client, experiment_id, name, flat_config(cfg), tags={"ray_mtt.kind": kind})
        self.monitor = system_metrics(self.run_id, tracking_uri)
        print(f"MLflow run {self.run_id} in {tracking_uri}\n{ui_hint(tracking_uri, experiment_id)}", flush=True)

    def reporter(self, data: Dataset, ipc: int) -> "MlflowReporter":
        return MlflowReporter(self.client, self.run_id, data, ipc)

    def finish(self, scores: dict, summary: dict) -> None:
        log_result(self.client, self.run_id, scores, summary)
        self.close("FINISHED")

    def close(self, status: str) -> None:
        self.monitor.finish()
        self.client.set_terminated(self.run_id, status)


def log_result(client: MlflowClient, run_id: str, scores: dict[str, dict[str, Score]],
               summary: dict[str, float]) -> None:
    """Final scores of a run: a per-architecture table, metrics, a description."""
    rows = [(set_name, s) for set_name, by_model in scores.items() for s in by_model.values()]
    if rows:
        _log_scores(client, run_id, rows)
    log_metrics(client, run_id, summary)


def metric_part(name: str) -> str:
    """A row name as MLflow accepts it in a metric key: "distilled, hard labels" -> distilled_hard_labels."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_")


def _log_scores(client: MlflowClient, run_id: str, rows: list[tuple[str, Score]]) -> None:
    client.log_table(run_id, {
        "set": [name for name, _ in rows], "model": [s.model for _, s in rows],
        "mean_acc": [s.mean for _, s in rows], "std_acc": [s.std for _, s in rows],
        "runs": [len(s.accs) for _, s in rows]}, artifact_file="accuracy_by_architecture.json")
    metrics = {}
    for set_name, s in rows:
        metrics[f"test_acc/{metric_part(set_name)}/{s.model}"] = s.mean
        metrics[f"test_acc_std/{metric_part(set_name)}/{s.model}"] = s.std
    log_metrics(client, run_id, metrics)
    lines = ["| set | model | test accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {s.model} | {s} over {len(s.accs)} runs |" for name, s in rows]
    client.set_tag(run_id, NOTE_TAG, "\n".join(lines))


def log_bench(tracking_uri: str, run_dir: str | Path, raw: dict, settings: dict[str, str]) -> str:
    """One MLflow run per benchmark: s/iter per config and variant, speed-ups, TFLOP/s and peak
    memory when measured, peak memory vs N."""
    client, experiment_id = open_experiment(tracking_uri, run_dir)
    run_id = start_run(client, experiment_id, f"bench {raw['device']}",
                       {**settings, "device": raw["device"], "torch": raw["torch"]}, tags={"ray_mtt.kind": "bench"})
    metrics = {}
    for config, times in raw["timing"].items():
        medians = {variant: float(np.median(t)) for variant, t in times.items()}
        baseline = next(iter(medians.values()))
        for variant, median in medians.items():
            metrics[f"s_per_iter/{config}/{variant}"] = median
            metrics[f"speedup/{config}/{variant}"] = baseline / median
    for key, flops in raw.get("flops", {}).items():  # key: <config>/<variant>
        config, variant = key.rsplit("/", 1)
        metrics[f"tflops/{key}"] = flops / metrics[f"s_per_iter/{config}/{variant}"] / 1e12
    metrics.update({f"iteration_peak_mib/{key}": mib for key, mib in raw.get("peak_mib", {}).items()})
    log_metrics(client, run_id, metrics)
    for key, by_steps in raw["memory"].items():  # key: <config>/<variant>; one point per N
        for n, mib in by_steps.items():
            log_metrics(client, run_id, {f"peak_mib/{key}": mib}, int(n))
    client.log_dict(run_id, raw, "bench.json")
    client.set_terminated(run_id)
    return run_id
