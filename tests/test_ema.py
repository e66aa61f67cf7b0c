"""FTD's EMA of the images: the update, resume, and evaluation on networks never trained before."""
import torch

import ray_mtt.core.evaluate as evaluate
from ray_mtt.core.distill import Distiller, Reporter, distill, open_experts
from ray_mtt.core.experts import train_experts
from tests.helpers import tiny_config


def test_ema_follows_each_image_step_resumes_and_is_kept_as_its_own_best(tmp_path, digits):
    cfg = tiny_config(tmp_path, distill={"ema": 0.6, "iterations": 4, "eval_every": 2})
    train_experts(cfg, digits, progress=False)
    distiller = Distiller(cfg, digits, open_experts(cfg, digits), Reporter())
    before = distiller.ema.clone()
    assert torch.equal(before, distiller.syn.images.detach())  # it starts as the initial images
    distiller.step(0)
    assert torch.allclose(distiller.ema, 0.6 * before + 0.4 * distiller.syn.images.detach())

    straight = distill(cfg, digits, progress=False)
    cfg.distill.out_dir, cfg.distill.iterations = str(tmp_path / "resumed"), 2
    distill(cfg, digits, progress=False)
    cfg.distill.iterations = 4
    resumed = distill(cfg, digits, progress=False)
    for key in ("best", "best_ema"):
        a, b = (torch.load(r[key], weights_only=True) for r in (straight, resumed))
        assert torch.equal(a["images"], b["images"]) and a["images_kind"] == ("ema" if key == "best_ema" else "raw")
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert not torch.equal(ckpt["ema_images"], ckpt["images"])


def test_ema_set_is_scored_on_networks_that_were_never_trained(tmp_path, digits, monkeypatch):
    cfg = tiny_config(tmp_path, distill={"ema": 0.5, "iterations": 2, "eval_every": 1, "eval_runs": 2})
    train_experts(cfg, digits, progress=False)
    created, trained = [], []
    make, train = evaluate.model_for, evaluate.train_epoch

    def recording_model_for(*args, **kwargs):
        model = make(*args, **kwargs)
        created.append((model, [p.detach().clone() for p in model.parameters()]))
        return model

    def recording_train_epoch(model, *args, **kwargs):
        trained.append(model)
        return train(model, *args, **kwargs)
    monkeypatch.setattr(evaluate, "model_for", recording_model_for)
    monkeypatch.setattr(evaluate, "train_epoch", recording_train_epoch)
    distill(cfg, digits, progress=False)
    # 3 validations (iterations 0, 1, 2) x (raw, EMA) x 2 runs, each its own network object
    assert len(created) == 12 and len({id(m) for m, _ in created}) == 12
    first_epoch = {}
    for model in trained:
        first_epoch.setdefault(id(model), model)
    assert list(first_epoch) == [id(m) for m, _ in created]  # each trained only after it was made, in order
    # the raw and the EMA set of one validation start from the same untrained weights (paired streams)
    for (raw, raw_init), (ema, ema_init) in zip(created[0::4], created[2::4]):
        assert all(torch.equal(a, b) for a, b in zip(raw_init, ema_init))
