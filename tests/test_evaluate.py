from ray_mtt.evaluate import format_table, random_real_set, score
from tests.conftest import tiny_config


def test_networks_trained_on_real_images_beat_chance(tmp_path, digits):
    cfg = tiny_config(tmp_path, distill={"ipc": 5}, eval={"epochs": 60, "num_runs": 2})
    x, y = random_real_set(cfg, digits)
    assert x.shape == (50, 1, 8, 8) and sorted(y.tolist()) == sorted(list(range(10)) * 5)
    results = score(x, y, cfg.eval.lr_real, cfg, digits, models=["convnet"])
    assert len(results["convnet"].accs) == 2
    assert results["convnet"].mean > 0.5  # chance is 0.1
    table = format_table({"random real": results})
    assert "convnet" in table and "+-" in table


def test_validation_split_is_scored_separately(tmp_path, digits):
    cfg = tiny_config(tmp_path)
    x, y = random_real_set(cfg, digits)
    val = score(x, y, 0.01, cfg, digits, split="val", epochs=5)
    test = score(x, y, 0.01, cfg, digits, split="test", epochs=5)
    # 100 val images vs 300 test images: accuracies are multiples of 1/100 and 1/300.
    assert round(val["convnet"].mean * 100, 6) == round(val["convnet"].mean * 100)
    assert 0 <= test["convnet"].mean <= 1
