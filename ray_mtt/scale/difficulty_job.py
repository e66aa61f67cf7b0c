"""PAD's EL2N scoring on Ray: one task per scoring network, anywhere in the cluster.

The driver reads the data once and passes it through Ray's object store; each task trains its
network, scores every training image and writes its file into the trajectory store (a bucket on a
cluster), so a task that dies is retried (Ray's task retries) and a rerun skips finished networks.
The driver then writes the mean, once.
"""
from __future__ import annotations

import ray

from ..core.config import Config, config_from_dict
from ..core.data import Splits, read_splits, to_device
from ..core.difficulty import SCORES, finish_scores, missing_networks, network_file, network_scores, npy, read_npy
from ..core.experts import epoch_batches
from ..core.storage import open_storage
from .cluster import connect, ray_failure, want_gpus
from .options import JobResources


def score_network(cfg_dict: dict, k: int, splits: Splits, threads: int) -> str:
    """A Ray task: train scoring network k, write its scores into the store; returns the file name."""
    import torch
    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned the task; none assigned: the CPU.
    gpu = cfg.device != "cpu" and torch.cuda.is_available() and ray.get_gpu_ids()
    data = to_device(splits, "cuda" if gpu else "cpu")
    open_storage(cfg.expert_dir).write(network_file(k), npy(network_scores(cfg, data, k, epoch_batches(cfg, data))))
    return network_file(k)


def run_scoring(cfg: Config, address: str | None = None, resources: JobResources | None = None,
                splits: Splits | None = None):
    """EL2N scores of every training image for the store at cfg.expert_dir, computed on the cluster."""
    resources = resources or JobResources()
    storage = open_storage(cfg.expert_dir)
    if storage.exists(SCORES):
        return read_npy(storage, SCORES)
    splits = splits or read_splits(cfg.data)
    connect(address)
    todo = missing_networks(storage, cfg.experts)
    gpus = resources.gpus_per_worker if want_gpus(resources.use_gpu) else 0
    task = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=gpus, max_retries=resources.max_failures)(
        score_network)
    splits_ref = ray.put(splits)
    threads = max(1, int(resources.cpus_per_worker))
    print(f"EL2N scoring: {len(todo)} of {cfg.experts.difficulty_networks} networks to train "
          f"({cfg.experts.difficulty_epochs} epochs each) into {cfg.expert_dir}/difficulty/", flush=True)
    try:
        ray.get([task.remote(cfg.to_dict(), k, splits_ref, threads) for k in todo])
    except ray.exceptions.RayError as e:
        raise ray_failure(e, "EL2N scoring") from None
    return finish_scores(storage, cfg.experts)
