"""FTD's flat experts: a GSAM step by hand, experts that train with it, stores that do not mix."""
import math

import pytest
import torch

from ray_mtt.core.distill import open_experts
from ray_mtt.core.errors import UserError
from ray_mtt.core.experts import train_experts
from ray_mtt.core.gsam import GSAM
from tests.helpers import tiny_config


def loss_and_grad(w1, w2):
    """L(w) = w1^4 + w1 w2^2 + w2, whose gradient turns as w moves (so GSAM's decomposition matters)."""
    return w1 ** 4 + w1 * w2 ** 2 + w2, (4 * w1 ** 3 + w2 ** 2, 2 * w1 * w2 + 1)


def test_gsam_step_equals_the_formula_by_hand():
    w, rho, alpha, lr = (0.7, -1.3), 0.1, 0.5, 0.1
    _, g = loss_and_grad(*w)
    norm = math.hypot(abs(w[0]) * g[0], abs(w[1]) * g[1])
    e = [rho * w[i] ** 2 * g[i] / (norm + 1e-12) for i in range(2)]
    _, gp = loss_and_grad(w[0] + e[0], w[1] + e[1])
    g_norm, gp_norm = math.hypot(*g), math.hypot(*gp)
    cosine = (g[0] * gp[0] + g[1] * gp[1]) / (g_norm * gp_norm + 1e-12)
    vertical = [g[i] - cosine * g_norm * gp[i] / (gp_norm + 1e-12) for i in range(2)]
    expected = [w[i] - lr * (gp[i] - alpha * vertical[i]) for i in range(2)]
    assert abs(vertical[0]) > 1e-3  # not the degenerate case where GSAM is SAM

    params = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
    optimizer = GSAM(torch.optim.SGD([params], lr=lr), rho, alpha)
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = params[0] ** 4 + params[0] * params[1] ** 2 + params[1]
        loss.backward()
        calls.append(params.detach().clone())
        return loss
    loss = optimizer.step(closure)
    assert len(calls) == 2 and torch.allclose(calls[1], torch.tensor(w, dtype=torch.float64) + torch.tensor(e, dtype=torch.float64))
    assert float(loss.detach()) == pytest.approx(loss_and_grad(*w)[0])
    assert params.detach().tolist() == pytest.approx(expected, rel=1e-12)


def test_gsam_experts_train_resume_and_refuse_to_mix_with_sgd(tmp_path, digits):
    cfg = tiny_config(tmp_path, experts={"optimizer": "gsam", "gsam_rho": 0.05, "gsam_alpha": 0.3})
    store = train_experts(cfg, digits, progress=False)
    meta = store.read_meta()
    assert meta["optimizer"] == "gsam(rho=0.05, alpha=0.3)"
    accs = [e["test_acc"] for e in store.read_info(0)["epochs"][1:]]
    assert accs[-1] > 0.3  # ten classes: it learns
    cfg.experts.optimizer = "sgd"
    with pytest.raises(UserError, match=r"optimizer='gsam\(rho=0.05, alpha=0.3\)' \(wanted 'sgd'\)"):
        open_experts(cfg, digits)
    with pytest.raises(UserError, match="optimizer="):
        train_experts(cfg, digits, progress=False)
