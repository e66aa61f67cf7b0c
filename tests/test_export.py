"""A distilled set is a thing a user can take away: the file holds what is needed to use it,
it exports to images and to the project's .npz layout, and it scores with nothing else."""
import numpy as np
import pytest
import torch
from PIL import Image

from ray_mtt.core.config import DataConfig
from ray_mtt.core.data import load_dataset
from ray_mtt.core.distill import distill, synthetic_file
from ray_mtt.core.experts import train_experts
from ray_mtt.core.export import write_npz, write_png
from ray_mtt.core.seeds import generator
from tests.helpers import assert_one_line_error, run_cli, tiny_config


@pytest.mark.parametrize("zca", [False, True])
def test_export_undoes_the_preprocessing_exactly(tmp_path, zca):
    data = load_dataset(DataConfig(dataset="digits", zca=zca))
    cfg = tiny_config(tmp_path, data={"zca": zca})
    x, y = data.random_real(2, generator(0, "random_real"))
    saved = synthetic_file({"images": data.preprocess(x), "labels": y, "lr": torch.tensor(0.01)}, data, cfg)
    out = write_npz(saved, tmp_path / "set.npz")
    with np.load(out) as z:
        assert np.abs(z["x_train"].astype(int) - x.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
        assert z["y_train"].tolist() == y.tolist() and z["x_test"].shape == (0, 8, 8, 1)
        assert z["classes"].tolist() == data.classes
    files = write_png(saved, tmp_path / "png")
    assert len(files) == 21 and (tmp_path / "png" / "003_3" / "0001.png").is_file()
    grid = np.asarray(Image.open(tmp_path / "png" / "grid.png"))
    assert grid.shape == (2 * 9 + 1, 10 * 9 + 1, 3)  # 2 rows of images, 10 class columns, 1 px padding


def test_a_set_file_scores_and_exports_with_nothing_else(tmp_path, digits):
    cfg = tiny_config(tmp_path, data={"zca": True}, distill={"iterations": 2})
    data = load_dataset(DataConfig(dataset="digits", zca=True))
    train_experts(cfg, data, progress=False)
    best = distill(cfg, data, progress=False)["best"]
    saved = torch.load(best, weights_only=True)
    assert saved["dataset"] == "digits" and saved["classes"] == data.classes and saved["size"] == 8
    assert torch.equal(saved["preprocess"]["zca"]["transform"], data.preprocess.zca[1])
    assert saved["config"]["model"]["width"] == 16
    moved = tmp_path / "elsewhere" / "set.pt"
    moved.parent.mkdir()
    moved.write_bytes(best.read_bytes())  # no run folder, no config file beside it
    result = run_cli("ray_mtt.evaluate", "--synthetic", str(moved), "--eval.epochs", "5", "--device", "cpu",
                     cwd=moved.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the distilled set's own" in result.stdout and "learned lr" in result.stdout
    assert "zca=True" in result.stdout and "width=16" in result.stdout
    result = run_cli("ray_mtt.export", str(moved), "--format", "png", "--out", str(tmp_path / "png"))
    assert result.returncode == 0 and (tmp_path / "png" / "grid.png").is_file()


def test_a_set_file_from_other_data_is_a_one_line_error(tmp_path, digits):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "set.pt"
    x, y = digits.random_real(1, generator(0, "random_real"))
    torch.save(synthetic_file({"images": digits.preprocess(x), "labels": y, "lr": torch.tensor(0.01)}, digits, cfg),
               path)
    result = run_cli("ray_mtt.evaluate", "--synthetic", str(path), "--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert_one_line_error(result, "holds digits images of shape (1, 8, 8), but cifar10 images", "--dataset")
