import numpy as np
import pytest
import torch

from ray_mtt.core.config import DataConfig
from ray_mtt.core.data import Preprocess, fit_zca, load_dataset, split_validation
from ray_mtt.core.datasets import IMAGENET_SUBSETS
from ray_mtt.core.errors import UserError
from tests.helpers import write_cifar10, write_jpeg


def test_cifar10_python_batches_are_read_with_planes_in_order(tmp_path):
    batches = write_cifar10(tmp_path)
    data = load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path), val_per_class=1))
    assert data.classes[3] == "c3"
    assert len(data.x_train) == 100 - 10 and len(data.x_val) == 10
    images, labels = batches["test_batch"]
    assert torch.equal(data.x_test, torch.from_numpy(images))  # (N, C, H, W): R, G, B planes
    assert data.y_test.tolist() == labels


def test_truncated_cifar_batch_is_a_clear_error(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="data_batch_3.*damaged"):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_tiny_imagenet_reads_val_labels_from_annotations(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # class index = sorted order
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids))
    (root / "words.txt").write_text("n01\tgoldfish\nn02\tshark\nn03\tray\n")
    for i, w in enumerate(sorted(wnids)):
        for k in range(2):
            write_jpeg(root / "train" / w / "images" / f"{w}_{k}.JPEG", (80 * i, 0, 0))
    lines = []
    for k, w in enumerate(["n03", "n01", "n02", "n03"]):
        write_jpeg(root / "val" / "images" / f"val_{k}.JPEG", (0, 0, 0))
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    from ray_mtt.core import datasets as data_module
    spec = data_module.DATASETS["tiny_imagenet"]
    raw = spec.read(tmp_path, False, spec)
    assert raw.y_test.tolist() == [2, 0, 1, 2]  # not all one class
    assert raw.y_train.tolist() == [0, 0, 1, 1, 2, 2]
    assert raw.x_train.shape == (6, 64, 64, 3) and raw.classes == ["goldfish", "shark", "ray"]
    assert abs(int(raw.x_train[2][0, 0, 0]) - 80) <= 2  # class 1 images are the red ones (JPEG is lossy)


def test_imagenet_subset_picks_classes_by_imagenet_index(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    for split in ("train", "val"):
        for w in wnids:
            (tmp_path / split / w).mkdir(parents=True)
    chosen = IMAGENET_SUBSETS["imagenette"]
    for label, idx in enumerate(chosen[:2]):
        write_jpeg(tmp_path / "train" / wnids[idx] / "a.JPEG", (label * 100, 0, 0))
        write_jpeg(tmp_path / "val" / wnids[idx] / "b.JPEG", (label * 100, 0, 0))
    from ray_mtt.core import datasets as data_module
    spec = data_module.DATASETS["imagenette"]
    raw = spec.read(tmp_path, False, spec)
    assert raw.x_train.shape == (2, 128, 128, 3) and raw.y_train.tolist() == [0, 1]
    assert raw.classes[1] == wnids[217]


def test_wide_images_are_squashed_to_a_square_as_the_authors_do(tmp_path):
    """Their Resize((128, 128)) keeps the whole image (aspect ratio squashed); a short-side resize plus
    center crop would cut the 8 green columns at the left edge of this 80x64 image."""
    from PIL import Image

    from ray_mtt.core.datasets import ImageFiles
    image = Image.new("RGB", (80, 64), (255, 0, 0))
    image.paste((0, 255, 0), (0, 0, 8, 64))
    image.save(tmp_path / "wide.png")
    pixels = ImageFiles([tmp_path / "wide.png"], 128)[0]
    assert pixels.shape == (128, 128, 3)
    assert tuple(pixels[64, 4]) == (0, 255, 0) and tuple(pixels[64, 100]) == (255, 0, 0)


def test_image_folder_of_the_users_own(tmp_path):
    colours = {"cat": (200, 0, 0), "dog": (0, 200, 0), "eel": (0, 0, 200)}
    for name, colour in colours.items():
        for k in range(10):
            write_jpeg(tmp_path / "mine" / name / f"{k}.jpg", colour, size=(40 + k, 30))
    data = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path / "mine"), image_size=16,
                                   val_per_class=1, test_fraction=0.2))
    assert data.classes == ["cat", "dog", "eel"] and data.spec.size == 16 and data.num_classes == 3
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (21, 3, 6)  # 2 test, 1 val, 7 train per class
    assert data.x_test.shape[1:] == (3, 16, 16)
    for label in range(3):  # each image carries its class's colour (JPEG: within a few levels)
        channel = data.x_train[data.y_train == label].float().mean(dim=(0, 2, 3))
        assert int(channel.argmax()) == label
    # train/ and test/ given: used as they are.
    for split, n in (("train", 4), ("test", 2)):
        for name, colour in colours.items():
            for k in range(n):
                write_jpeg(tmp_path / "split" / split / name / f"{k}.png", colour)
    data = load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path / "split"), image_size=8, val_per_class=1))
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (9, 3, 6)
    (tmp_path / "split" / "train" / "fox").mkdir()
    with pytest.raises(UserError, match="fox holds no images"):
        load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path / "split")))


def test_imagenet_subset_needs_the_full_class_list(tmp_path):
    (tmp_path / "train" / "n1").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="1000 ImageNet-1k classes"):
        load_dataset(DataConfig(dataset="imagewoof", data_dir=str(tmp_path)))


def test_npz_format_and_shape_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    y = np.arange(40) % 10
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    data = load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path), val_per_class=1))
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_train.dtype == torch.uint8
    np.savez(tmp_path / "mnist.npz", x_train=x[..., 0], y_train=y, x_test=x[:10], y_test=y[:10])
    with pytest.raises(UserError, match=r"x_train is uint8 \(40, 28, 28\), expected uint8 \(N, 28, 28, 1\)"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))


def test_truncated_npz_is_a_one_line_error_naming_the_file(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "cifar10.npz", x_train=x, y_train=np.arange(200) % 10, x_test=x,
                        y_test=np.arange(200) % 10, classes=np.array([str(i) for i in range(10)]))
    whole = (tmp_path / "cifar10.npz").read_bytes()
    (tmp_path / "cifar10.npz").write_bytes(whole[:5000])  # as a broken download leaves it
    with pytest.raises(UserError, match=r"cannot read .*cifar10.npz .*truncated or damaged, replace it"):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_missing_and_unknown(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'cifar11'; known: cifar10, cifar100"):
        load_dataset(DataConfig(dataset="cifar11"))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="cifar10 not found in .*cifar-10-batches-py.*--data.download true"):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


def test_validation_split_is_stratified_disjoint_and_fixed():
    y = np.repeat(np.arange(5), 20)
    train, val = split_validation(y, 3, 5)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 100
    assert np.bincount(y[val]).tolist() == [3] * 5
    assert np.array_equal(val, split_validation(y, 3, 5)[1])
    small_train, same_val = split_validation(y, 3, 5, train_per_class=4)
    assert np.array_equal(same_val, val) and np.bincount(y[small_train]).tolist() == [4] * 5
    assert set(small_train) <= set(train)


def test_ipc_larger_than_a_class_is_an_error(digits):
    with pytest.raises(UserError, match="fewer than ipc=500"):
        digits.random_real(500, torch.Generator().manual_seed(0))


def test_zca_whitens_and_inverts(digits):
    zca = fit_zca(digits.x_train)
    pre = Preprocess((0.0,), (1.0,), zca)
    x = digits.x_train  # the fit set: sample noise in the correlations stays small
    white = pre(x)
    assert torch.allclose(pre.inverse(white), x.float() / 255, atol=1e-3)
    plain = Preprocess((0.0,), (1.0,))(x)

    def mean_abs_correlation(t):  # over pixels that vary (digits have constant border pixels)
        t = t.flatten(1)
        t = t[:, t.std(0) > 1e-3]
        c = torch.corrcoef(t.T)
        return (c - torch.eye(len(c))).abs().sum() / (len(c) * (len(c) - 1))
    # eps=0.1 (the paper's) regularises, so it only partly decorrelates; a tiny eps whitens fully.
    assert mean_abs_correlation(white) < 0.75 * mean_abs_correlation(plain)
    full = Preprocess((0.0,), (1.0,), fit_zca(digits.x_train, eps=1e-5))(x)
    assert mean_abs_correlation(full) < 0.2 * mean_abs_correlation(plain)


def test_given_zca_matrices_are_used_instead_of_refitting():
    """A sweep fits ZCA once and hands the matrices to every trial."""
    cfg = DataConfig(dataset="digits", zca=True)
    fitted = load_dataset(cfg)
    mean, transform, inverse = fitted.preprocess.zca
    assert torch.equal(load_dataset(cfg, zca=(mean, transform, inverse)).preprocess.zca[1], transform)
    identity = (torch.zeros_like(mean), torch.eye(len(mean)), torch.eye(len(mean)))
    data = load_dataset(cfg, zca=identity)
    assert torch.allclose(data.preprocess(data.x_test), data.x_test.float() / 255)  # used as given, not refitted
    assert load_dataset(DataConfig(dataset="digits"), zca=identity).preprocess.zca is None  # zca off wins
