from pathlib import Path

import pytest
import torch

from ray_mtt.core.experts import open_store_for_training, train_expert, train_experts
from tests.helpers import needs_ffcv, tiny_config


class Killed(Exception):
    pass


def test_trajectory_snapshots_differ_and_accuracy_rises(tmp_path, digits):
    cfg = tiny_config(tmp_path)
    store = train_experts(cfg, digits, progress=False)
    traj = store.open(0)
    assert traj.num_snapshots == cfg.experts.epochs + 1
    assert not torch.equal(traj.snapshot(0), traj.snapshot(cfg.experts.epochs))
    assert traj.info["epochs"][-1]["test_acc"] > 0.3  # chance is 0.1


@pytest.mark.parametrize("loader", ["tensor", pytest.param("ffcv", marks=needs_ffcv)])
def test_killed_expert_resumes_without_redoing_epochs_and_matches_uninterrupted(tmp_path, digits, loader):
    cfg = tiny_config(tmp_path, data={"loader": loader})
    store = open_store_for_training(cfg, digits.spec)

    def die_after_epoch_2(index, epoch, metrics):
        if epoch == 2:
            raise Killed

    try:
        train_expert(cfg, digits, store, 0, on_epoch=die_after_epoch_2)
    except Killed:
        pass
    assert store.completed() == [] and len(store.saved_epochs(0)) == 3
    epochs_run = []
    train_expert(cfg, digits, store, 0, on_epoch=lambda k, e, m: epochs_run.append(e))
    assert epochs_run == [3]  # epochs 1 and 2 were not redone

    straight = tiny_config(tmp_path / "straight", data={"loader": loader})
    reference = train_experts(straight, digits, progress=False).open(0)
    resumed = store.open(0)
    for e in range(4):
        assert torch.equal(resumed.snapshot(e), reference.snapshot(e))


def test_each_experts_epoch_draws_its_batch_order_from_its_own_stream(tmp_path, digits):
    """(expert, epoch) -> derive_seed(seed, "expert_order", expert, epoch): never seed + epoch, under
    which expert 0's epoch 1 and expert 1's epoch 0 could share an order."""
    from ray_mtt.core.experts import epoch_batches
    from ray_mtt.core.seeds import derive_seed
    cfg = tiny_config(tmp_path)
    store, seeds = open_store_for_training(cfg, digits.spec), []
    shuffled = epoch_batches(cfg, digits)

    def recording(seed, indices=None):
        seeds.append(seed)
        return shuffled(seed, indices)
    for index in (0, 1):
        train_expert(cfg, digits, store, index, batches=recording)
    assert seeds == [derive_seed(cfg.seed, "expert_order", k, e) for k in (0, 1) for e in range(1, cfg.experts.epochs + 1)]
    first_batches = [next(iter(shuffled(s)))[1] for s in seeds]
    assert len({tuple(labels.tolist()) for labels in first_batches}) == len(seeds)


def test_finished_experts_are_skipped(tmp_path, digits):
    cfg = tiny_config(tmp_path)
    store = train_experts(cfg, digits, progress=False)
    before = (Path(store.root) / "expert_0000.npy").stat().st_mtime_ns
    cfg.experts.num_experts = 2
    train_experts(cfg, digits, progress=False)
    assert store.completed() == [0, 1]
    assert (Path(store.root) / "expert_0000.npy").stat().st_mtime_ns == before
