import pytest
import torch

from ray_mtt.core.errors import UserError
from ray_mtt.core.trajectories import TrajectoryStore

META = {"dataset": "digits", "model": "convnet", "width": 16, "depth": 1, "zca": False, "val_per_class": 10,
        "num_params": 5}


def make_expert(store, k, epochs=3):
    rows = [torch.full((5,), float(e)) + k for e in range(epochs + 1)]
    for e, row in enumerate(rows):
        store.save_epoch(k, e, row, {"epoch": e, "test_acc": 0.1 * e})
    store.finish(k, {"seed": k})
    return rows


@pytest.mark.parametrize("as_uri", [False, True], ids=["local_path", "file_uri"])
def test_round_trip_is_lazy_and_exact(tmp_path, as_uri):
    # file:// goes through pyarrow's filesystem layer, the code path of s3:// and gs:// stores.
    store = TrajectoryStore(tmp_path.as_uri() if as_uri else tmp_path)
    store.init(META)
    rows = make_expert(store, 2)
    assert store.completed() == [2]
    traj = store.open(2)
    assert traj.num_snapshots == 4
    for e, row in enumerate(rows):
        assert torch.equal(traj.snapshot(e), row)
    assert traj.info["epochs"][3]["test_acc"] == pytest.approx(0.3)
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob("*.partial"))


def test_partial_expert_is_not_listed_and_reports_saved_epochs(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.init(META)
    store.save_epoch(0, 0, torch.zeros(5), {"epoch": 0})
    store.save_epoch(0, 1, torch.ones(5), {"epoch": 1})
    assert store.completed() == []
    assert [m["epoch"] for m in store.saved_epochs(0)] == [0, 1]
    # A temp file left by a killed writer is never read as an epoch.
    (tmp_path / "expert_0000.partial" / ".epoch_002.npy.tmp123").write_bytes(b"junk")
    assert len(store.saved_epochs(0)) == 2


def test_corrupt_and_truncated_files_are_clear_errors(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.init(META)
    make_expert(store, 0)
    make_expert(store, 1)
    npy = tmp_path / "expert_0000.npy"
    data = bytearray(npy.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last snapshot
    npy.write_bytes(bytes(data))
    traj = store.open(0)
    traj.snapshot(0)
    with pytest.raises(UserError, match="epoch 3 fails its checksum"):
        traj.snapshot(3)
    npy1 = tmp_path / "expert_0001.npy"
    npy1.write_bytes(npy1.read_bytes()[:-20])
    with pytest.raises(UserError, match="expert_0001.npy is partial or corrupt"):
        store.open(1)
    (tmp_path / "expert_0001.json").write_text("{not json")
    with pytest.raises(UserError, match="expert_0001.json"):
        store.open(1)


def test_store_refuses_experts_of_another_kind(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.init(META)
    with pytest.raises(UserError, match="width=16 \\(wanted 32\\)"):
        store.init({**META, "width": 32})
    with pytest.raises(UserError, match="train them first"):
        TrajectoryStore(tmp_path / "empty").read_meta()


def test_uri_store_resumes_partial_experts(tmp_path):
    uri = (tmp_path / "bucket" / "experts").as_uri()
    store = TrajectoryStore(uri)
    store.init(META)
    store.save_epoch(1, 0, torch.zeros(5), {"epoch": 0})
    reopened = TrajectoryStore(uri)
    reopened.init(META)
    assert [m["epoch"] for m in reopened.saved_epochs(1)] == [0] and reopened.completed() == []
    assert torch.equal(reopened.load_epoch(1, 0), torch.zeros(5))
    with pytest.raises(UserError, match="width=16 \\(wanted 32\\)"):
        reopened.init({**META, "width": 32})
