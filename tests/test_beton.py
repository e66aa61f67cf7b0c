"""The ffcv extra: .beton files of the training split, streamed in expert training."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from ray_mtt.core.config import Config
from ray_mtt.core.data import load_dataset
from ray_mtt.core.errors import UserError
from tests.helpers import REPO, needs_ffcv, run_cli, tiny_config, write_jpeg

pytestmark = needs_ffcv


def streamer(cfg: Config, data):
    from ray_mtt.core.beton import BetonBatches, ensure_beton
    spec = data.spec
    return BetonBatches(ensure_beton(cfg), 64, torch.device("cpu"), len(data.y_train),
                        (spec.size, spec.size, spec.channels), workers=2)


def stream(batches, seed):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in batches.epoch(seed)])
    return torch.cat(xs), torch.cat(ys)


def test_raw_beton_streams_the_training_split_exactly_in_seeded_order(tmp_path):
    cfg = tiny_config(tmp_path, data={"loader": "ffcv", "train_per_class": 30})
    data = load_dataset(cfg.data)
    batches = streamer(cfg, data)
    x, y = stream(batches, seed=7)
    assert x.dtype == torch.uint8 and x.shape == data.x_train.shape and y.dtype == torch.int64
    order = torch.from_numpy(np.random.default_rng(7).permutation(len(y)))  # what the docstring promises
    assert torch.equal(x, data.x_train[order]) and torch.equal(y, data.y_train[order])
    x_again, _ = stream(batches, seed=7)
    x_next, _ = stream(batches, seed=8)
    assert torch.equal(x, x_again) and not torch.equal(x, x_next)
    # Validation images are held out of the file as they are out of the tensor split.
    assert len(y) == 10 * 30 and not load_dataset(cfg.data, keep_train=False).x_train.numel()


def tiny_imagenet(root, per_class=3):
    """A Tiny-ImageNet folder of flat-colour JPEGs (JPEG keeps flat colours nearly exact)."""
    root = root / "tiny-imagenet-200"
    wnids = [f"n{i:02d}" for i in range(200)]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids))
    colour = {w: (i % 7 * 36, i % 5 * 50, i % 3 * 100) for i, w in enumerate(wnids)}
    for w in wnids[:2]:
        for k in range(per_class):
            write_jpeg(root / "train" / w / "images" / f"{w}_{k}.JPEG", colour[w])
    write_jpeg(root / "val" / "images" / "val_0.JPEG", colour[wnids[0]])
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[0]}\t0\t0\t1\t1")
    return root


def test_jpg_beton_from_an_image_folder_matches_the_decoded_images(tmp_path):
    tiny_imagenet(tmp_path)
    cfg = tiny_config(tmp_path, data={"dataset": "tiny_imagenet", "data_dir": str(tmp_path), "val_per_class": 0,
                                      "loader": "ffcv", "beton_format": "jpg"})
    data = load_dataset(cfg.data)
    x, y = stream(streamer(cfg, data), seed=0)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    assert torch.equal(y, data.y_train[order])
    assert (x.int() - data.x_train[order].int()).abs().max() <= 3  # lossy, but flat colours survive


def test_unreadable_image_fails_the_write_and_leaves_no_file(tmp_path):
    root = tiny_imagenet(tmp_path)
    (root / "train" / "n01" / "images" / "n01_1.JPEG").write_bytes(b"not a jpeg")
    cfg = tiny_config(tmp_path, data={"dataset": "tiny_imagenet", "data_dir": str(tmp_path), "val_per_class": 0,
                                      "loader": "ffcv"})
    from ray_mtt.core.beton import beton_file, write_beton
    with pytest.raises(UserError, match="n01_1.JPEG"):
        write_beton(cfg)
    assert not beton_file(cfg).parent.exists() or not list(beton_file(cfg).parent.iterdir())


def test_jpg_needs_rgb(tmp_path):
    from ray_mtt.core.beton import write_beton
    with pytest.raises(UserError, match="jpg needs RGB"):
        write_beton(tiny_config(tmp_path, data={"loader": "ffcv", "beton_format": "jpg"}))


def test_damaged_or_foreign_beton_is_a_one_line_error(tmp_path):
    cfg = tiny_config(tmp_path, data={"loader": "ffcv", "train_per_class": 30})
    data_args = ["--dataset", "digits", "--run_dir", str(tmp_path / "runs"), "--data.loader", "ffcv",
                 "--data.train_per_class", "30"]
    args = ["ray_mtt.experts", "--engine", "local", *data_args, "--model.width", "16", "--num-experts", "1",
            "--epochs", "1"]
    assert run_cli("ray_mtt.beton", *data_args).returncode == 0
    from ray_mtt.core.beton import beton_file
    path = beton_file(cfg)
    path.write_bytes(path.read_bytes()[:100])
    out = run_cli(*args)
    assert out.returncode == 2 and "not a readable .beton" in out.stderr and "Traceback" not in out.stderr
    # A file written for other data: 20 images per class where 30 are asked for.
    small = tiny_config(tmp_path, data={"loader": "ffcv", "train_per_class": 20})
    from ray_mtt.core.beton import write_beton
    write_beton(small).replace(path)
    out = run_cli(*args)
    assert out.returncode == 2 and "holds 200 images" in out.stderr and "expected 300" in out.stderr


def test_missing_ffcv_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['ffcv'] = None\n"  # what an environment without the extra sees
            "from ray_mtt.cli.common import run_cli; from ray_mtt.cli.experts import main\n"
            f"run_cli(main, ['--engine', 'local', '--run_dir', {str(tmp_path)!r}, '--data.loader', 'ffcv'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "pip install 'ray_mtt[ffcv]'" in out.stderr and "Traceback" not in out.stderr


def test_ffcv_import_keeps_torchs_thread_count():
    """ffcv sets torch to 1 thread when imported: on a CPU that would halve expert training."""
    code = ("import torch; torch.set_num_threads(2)\n"
            "from ray_mtt.core.beton import require_ffcv; require_ffcv(); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2"], out.stderr
