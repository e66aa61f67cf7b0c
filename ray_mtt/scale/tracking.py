"""MLflow tracking (orchestration layer): runs, metrics, image grids, distilled sets, accuracy tables.

Uses MlflowClient with explicit run ids rather than mlflow's global active run, so several Tune
trials can log from one process. The default store is a local sqlite file with artifacts in a
folder beside it, so nothing needs a server; `--tracking-uri http://host:port` logs to a server.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ..core.config import Config
from ..core.data import Preprocess
from ..core.distill import Reporter
from ..core.evaluate import Score
from ..core.export import image_grid as grid_of_pixels

EXPERIMENT = "ray_mtt"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"


def default_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def open_experiment(tracking_uri: str, run_dir: str | Path, name: str = EXPERIMENT) -> tuple[MlflowClient, str]:
    """The client and experiment id; a local store keeps artifacts under <run_dir>/mlartifacts."""
    for logger in ("alembic", "mlflow.store.db.utils"):  # schema-migration chatter on a new sqlite store
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
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": ",".join(v) if isinstance(v, list) else str(v) for k, v in values.items()})
        else:
            flat[section] = str(values)
    return flat


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """One batch of metrics stamped now (MLflow caps a batch at 1000 metrics)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start:start + 1000])


def start_run(client: MlflowClient, experiment_id: str, name: str, params: dict[str, str],
              parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    all_tags = {**(tags or {}), **({PARENT_TAG: parent_run_id} if parent_run_id else {})}
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id


def image_grid(images: torch.Tensor, preprocess: Preprocess, ipc: int) -> np.ndarray:
    """Synthetic images (network-input space) -> uint8 HxWxC grid, one column per class."""
    return grid_of_pixels(preprocess.inverse(images.detach().to(preprocess.mean.device).float()).cpu(), ipc)


class MlflowReporter(Reporter):
    """Logs a distillation run: metrics per iteration, an image grid at every evaluation."""

    def __init__(self, client: MlflowClient, run_id: str, preprocess: Preprocess, ipc: int):
        self.client, self.run_id, self.preprocess, self.ipc = client, run_id, preprocess, ipc

    def step(self, iteration: int, metrics: dict[str, float]) -> None:
        log_metrics(self.client, self.run_id, metrics, iteration)

    def evaluation(self, iteration: int, metrics: dict[str, float], synthetic: dict) -> None:
        log_metrics(self.client, self.run_id, metrics, iteration)
        grid = image_grid(synthetic["images"], self.preprocess, self.ipc)
        self.client.log_image(self.run_id, grid, artifact_file=f"synthetic/iter_{iteration:06d}.png")
        if metrics["val_acc"] >= metrics["best_val_acc"]:
            # Logged as soon as it is the best, so a trial that early stopping ends keeps its set.
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "best.pt"
                torch.save({**synthetic, "iteration": iteration, "val_acc": metrics["val_acc"]}, path)
                self.client.log_artifact(self.run_id, str(path), artifact_path="distilled")


def log_result(client: MlflowClient, run_id: str, scores: dict[str, dict[str, Score]],
               summary: dict[str, float]) -> None:
    """Final scores of a run: a per-architecture table, metrics, a description."""
    rows = [(set_name, s) for set_name, by_model in scores.items() for s in by_model.values()]
    if rows:
        _log_scores(client, run_id, rows)
    log_metrics(client, run_id, summary)


def _log_scores(client: MlflowClient, run_id: str, rows: list[tuple[str, Score]]) -> None:
    client.log_table(run_id, {
        "set": [name for name, _ in rows], "model": [s.model for _, s in rows],
        "mean_acc": [s.mean for _, s in rows], "std_acc": [s.std for _, s in rows],
        "runs": [len(s.accs) for _, s in rows]}, artifact_file="accuracy_by_architecture.json")
    metrics = {}
    for set_name, s in rows:
        metrics[f"test_acc/{set_name}/{s.model}".replace(" ", "_")] = s.mean
        metrics[f"test_acc_std/{set_name}/{s.model}".replace(" ", "_")] = s.std
    log_metrics(client, run_id, metrics)
    lines = ["| set | model | test accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {s.model} | {s} over {len(s.accs)} runs |" for name, s in rows]
    client.set_tag(run_id, NOTE_TAG, "\n".join(lines))


def log_bench(tracking_uri: str, run_dir: str | Path, raw: dict, settings: dict[str, str]) -> str:
    """One MLflow run per benchmark: s/iter per config and variant, speed-ups, peak memory vs N."""
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
    log_metrics(client, run_id, metrics)
    for key, by_steps in raw["memory"].items():  # key: <config>/<variant>; one point per N
        for n, mib in by_steps.items():
            log_metrics(client, run_id, {f"peak_mib/{key}": mib}, int(n))
    client.log_dict(run_id, raw, "bench.json")
    client.set_terminated(run_id)
    return run_id
