import torch

from ray_mtt.core import evaluate
from ray_mtt.core.config import DataConfig
from ray_mtt.core.data import read_raw, split_validation
from ray_mtt.core.evaluate import format_table, random_real_set, score
from ray_mtt.core.experts import train_experts
from ray_mtt.core.models import FlatModel
from tests.helpers import tiny_config


def test_networks_trained_on_real_images_beat_chance(tmp_path, digits):
    cfg = tiny_config(tmp_path, distill={"ipc": 5}, eval={"epochs": 60, "num_runs": 2})
    x, y = random_real_set(cfg, digits)
    assert x.shape == (50, 1, 8, 8) and sorted(y.tolist()) == sorted(list(range(10)) * 5)
    results = score(x, y, cfg.eval.lr_real, cfg, digits, models=["convnet"])
    assert len(results["convnet"].accs) == 2
    assert results["convnet"].mean > 0.5  # chance is 0.1
    table = format_table({"random real": results})
    assert "convnet" in table and "+-" in table


def test_validation_and_test_splits_are_disjoint_and_each_scored_where_asked(tmp_path, digits, monkeypatch):
    raw, spec, _ = read_raw(DataConfig(dataset="digits"))
    train_idx, val_idx = split_validation(raw.y_train, 10, spec.num_classes)  # what the digits fixture holds out
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(raw.y_train)
    assert len(digits.x_val) == len(val_idx) == 100
    scored = []
    real_accuracy = evaluate.accuracy
    monkeypatch.setattr(evaluate, "accuracy", lambda model, x, y, *a, **k: scored.append(x) or real_accuracy(
        model, x, y, *a, **k))
    cfg = tiny_config(tmp_path)
    x, y = random_real_set(cfg, digits)
    score(x, y, 0.01, cfg, digits, split="val", epochs=2)
    score(x, y, 0.01, cfg, digits, split="test", epochs=2)
    assert scored[0] is digits.x_val and scored[1] is digits.x_test
    # No validation image is also a training or test image.
    flat = {tuple(img.flatten().tolist()) for img in digits.x_val}
    assert not flat & {tuple(img.flatten().tolist()) for img in digits.x_train}
    assert not flat & {tuple(img.flatten().tolist()) for img in digits.x_test}


def test_no_evaluation_network_starts_at_an_expert_initialisation(tmp_path, digits, monkeypatch):
    """Evaluation networks once shared the experts' seeds, so they began at theta*_0 of experts 0-4:
    the very points the synthetic set was trained to move (inflated scores)."""
    cfg = tiny_config(tmp_path, experts={"num_experts": 3, "epochs": 1}, eval={"num_runs": 3, "epochs": 1})
    store = train_experts(cfg, digits, progress=False)
    expert_inits = [store.open(k).snapshot(0) for k in store.completed()]
    inits, build = [], evaluate.model_for

    def recording(*args, **kwargs):
        model = build(*args, **kwargs)
        inits.append(FlatModel(model).flatten())
        return model

    monkeypatch.setattr(evaluate, "model_for", recording)
    x, y = random_real_set(cfg, digits)
    score(x, y, 0.01, cfg, digits)  # the final evaluation
    for iteration in (0, 1):  # validations during distillation
        score(x, y, 0.01, cfg, digits, split="val", iteration=iteration)
    assert len(inits) == 9 and len(expert_inits) == 3
    assert not any(torch.equal(a, b) for a in inits for b in expert_inits)
    assert len({tuple(a[:8].tolist()) for a in inits}) == 9  # and every evaluation network differs from the others
