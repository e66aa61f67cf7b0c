"""DATM's options on the one distiller: soft labels exact in both grad modes, the window, the init, the threshold."""
import math
import re
import shutil

import pytest
import torch

from ray_mtt.core.config import Config, DistillConfig, apply_overrides, default_config_path, load_yaml, shipped_configs
from ray_mtt.core.datm import correctly_classified, initial_label_logits, label_entropy, start_window
from ray_mtt.core.distill import Reporter, distill, run_iteration, synthetic_optimizers
from ray_mtt.core.matching import SyntheticSet, matching_grad_checkpointed, matching_grad_unrolled
from ray_mtt.core.errors import UserError
from ray_mtt.core.experts import train_experts
from ray_mtt.core.models import FlatModel, create_model
from tests.helpers import assert_one_line_error, run_in_process, tiny_config
from tests.test_distill import tiny_problem

GRADS = {"unrolled": matching_grad_unrolled, "checkpointed": matching_grad_checkpointed}


def soft_run(fn, student, start, target, images, labels, plan, logits, lr=0.05):
    """(loss, d/dimages, d/dlr, d/dlogits) of one matching gradient with learned soft labels."""
    syn = SyntheticSet(images.clone().requires_grad_(True), labels,
                       torch.tensor(lr, dtype=torch.float64).requires_grad_(True),
                       logits.clone().requires_grad_(True))
    loss, _ = fn(student, syn, start, target, plan)
    return float(loss), syn.images.grad, syn.lr.grad, syn.label_logits.grad


def soft_problem(steps=4, batch=4):
    problem = tiny_problem(steps, batch)
    logits = torch.randn(len(problem[3]), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return problem, logits


@pytest.mark.parametrize("mode", GRADS)
def test_label_gradient_matches_finite_differences(mode):
    problem, logits = soft_problem()
    _, _, _, grad_logits = soft_run(GRADS[mode], *problem, logits)
    assert grad_logits.abs().max() > 0  # the labels do move the match
    h = 1e-6
    for flat_index in torch.randperm(logits.numel(), generator=torch.Generator().manual_seed(0))[:8]:
        bump = torch.zeros(logits.numel(), dtype=torch.float64)
        bump[flat_index] = h
        bump = bump.view_as(logits)
        up = soft_run(GRADS[mode], *problem, logits + bump)[0]
        down = soft_run(GRADS[mode], *problem, logits - bump)[0]
        assert (up - down) / (2 * h) == pytest.approx(float(grad_logits.flatten()[flat_index]), rel=1e-4, abs=1e-10)


@pytest.mark.parametrize("steps, batch", [(1, 8), (5, 3), (12, 4)])
def test_checkpointed_equals_unrolled_with_soft_labels(steps, batch):
    problem, logits = soft_problem(steps, batch)
    loss_u, *grads_u = soft_run(matching_grad_unrolled, *problem, logits)
    loss_c, *grads_c = soft_run(matching_grad_checkpointed, *problem, logits)
    assert loss_c == pytest.approx(loss_u, rel=1e-12)
    for g_c, g_u in zip(grads_c, grads_u):  # images, alpha, label logits
        assert torch.allclose(g_c, g_u, rtol=1e-9, atol=1e-14)
        assert (g_c - g_u).abs().max() <= 1e-6 * g_u.abs().max()


def test_soft_labels_equal_to_one_hot_limit_match_hard_labels():
    # softmax of very peaked logits is the one-hot class: the soft path then computes the hard one.
    problem = tiny_problem()
    labels = problem[4]
    peaked = 60.0 * torch.nn.functional.one_hot(labels, 4).double()
    hard = SyntheticSet(problem[3].clone().requires_grad_(True), labels, torch.tensor(0.05, dtype=torch.float64,
                                                                                       requires_grad=True))
    loss_hard = float(matching_grad_unrolled(problem[0], hard, problem[1], problem[2], problem[5]).loss)
    loss_soft, grad_images, _, _ = soft_run(matching_grad_unrolled, *problem, peaked)
    assert loss_soft == pytest.approx(loss_hard, rel=1e-9)
    assert torch.allclose(grad_images, hard.images.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("iteration, bound", [(0, 10), (99, 10), (100, 11), (550, 15), (1000, 20), (5000, 20)])
def test_window_upper_bound_follows_datm_formula(iteration, bound):
    # UB = min(T + floor((T+ - T) * it / E), T+) with T=10, T+=20, E=1000 (DATM's C10 IPC 10 config)
    d = DistillConfig(min_start_epoch=2, first_max_start_epoch=10, max_start_epoch=20, expansion_iterations=1000)
    assert start_window(d, iteration) == (2, bound)


def test_window_without_expansion_is_mtts_draw():
    import random
    d = DistillConfig(max_start_epoch=7)
    assert start_window(d, 123) == (0, 7)
    # range(0, T+) draws exactly what MTT's randrange(T+) did, so old runs resume to the same sets
    assert [random.Random(5).randrange(*start_window(d, 0)) for _ in range(3)] == [random.Random(5).randrange(7)] * 3


class Threshold(torch.nn.Module):
    """Two logits of a 1-pixel image, [w0 x + b0, w1 x + b1]: the flat parameters (w0, w1, b0, b1) set
    where it switches from class 0 to class 1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 1))
        self.b = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x.flatten(1) @ self.w.t() + self.b


def switch_at(x0: float) -> torch.Tensor:
    """Flat parameters of a Threshold that says class 1 exactly for x > x0."""
    return torch.tensor([-1.0, 1.0, x0, -x0])


class Toy:
    """A dataset of 1-pixel images, in the Dataset fields correctly_classified reads."""

    def __init__(self, pixels, labels):
        self.x_train = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 1, 1)
        self.y_train = torch.tensor(labels)
        self.num_classes = 2

    def preprocess(self, x):
        return x.float()


def seeded_orders(data, seed=0):
    """Each class's training indices in the order correctly_classified scans them."""
    g = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(data.y_train == c).flatten() for c in range(2)]
    return [i[torch.randperm(len(i), generator=g)] for i in idx]


def test_init_correct_picks_the_first_correctly_classified_images_of_a_seeded_order():
    data = Toy([-3, -2, 5, -4, 3, -1, 4, 6, 2, 1], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    x, y = correctly_classified(data, 2, FlatModel(Threshold()), iter([switch_at(0.0)]),
                                torch.Generator().manual_seed(0))
    expected = []
    for c, order in enumerate(seeded_orders(data)):
        values = data.x_train[order].flatten().tolist()
        expected += [v for v in values if (v > 0) == bool(c)][:2]  # only the images the expert gets right
    assert y.tolist() == [0, 0, 1, 1] and x.flatten().tolist() == expected
    with pytest.raises(Exception, match="only 3 of class 0"):  # three class-0 images are negative; ipc 4
        correctly_classified(data, 4, FlatModel(Threshold()), iter([switch_at(0.0)]), torch.Generator().manual_seed(0))


def test_init_correct_moves_to_the_next_expert_for_what_is_left():
    data = Toy([-1, -2, -3, 1, 2, 3, 4], [0, 0, 0, 1, 1, 1, 1])
    # the first expert is right on class 1 only for 3 and 4; the second fills the third slot from 1 and 2
    x, y = correctly_classified(data, 3, FlatModel(Threshold()), iter([switch_at(2.5), switch_at(0.0)]),
                                torch.Generator().manual_seed(0))
    order = data.x_train[seeded_orders(data)[1]].flatten().tolist()
    picked = x[3:].flatten().tolist()
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and len(set(picked)) == 3
    assert picked == [v for v in order if v > 2.5] + [v for v in order if v < 2.5][:1]


def test_label_init_averages_only_the_experts_that_are_right():
    student = FlatModel(Threshold())
    a, b, c = (torch.tensor([w0, w1, 0.0, 0.0]) for w0, w1 in ((-1.0, 1.0), (-2.0, 2.0), (1.0, -1.0)))
    images = torch.tensor([[2.0], [-1.0]]).view(2, 1, 1, 1)
    labels = torch.tensor([1, 1])  # image 0 (x=2): a, b right (class 1); image 1 (x=-1): only c right
    logits = initial_label_logits(images, labels, student, iter([a, b, c]))
    assert logits[0].tolist() == pytest.approx([(-2 - 4) / 2, (2 + 4) / 2])  # mean of a's and b's logits
    assert logits[1].tolist() == pytest.approx([-1.0, 1.0])  # c's logits only
    nobody = initial_label_logits(images[1:], torch.tensor([0]), student, iter([a, b]))  # both wrong: mean of all
    assert nobody[0].tolist() == pytest.approx([(1 + 2) / 2, (-1 - 2) / 2])


def test_label_entropy_bounds():
    assert label_entropy(torch.zeros(3, 10)) == pytest.approx(float(torch.log(torch.tensor(10.0))))
    assert label_entropy(100 * torch.eye(10)) == pytest.approx(0.0, abs=1e-6)


def test_threshold_skips_every_optimizer_step(tmp_path):
    from ray_mtt.core.augment import DSA
    from ray_mtt.measure.problem import write_trajectory
    torch.manual_seed(0)
    student = FlatModel(create_model("convnet", 3, 4, 8, width=4, depth=1))
    start = student.flatten()
    trajectory = write_trajectory(str(tmp_path), start, 3)
    syn = SyntheticSet(torch.randn(8, 3, 8, 8).requires_grad_(True), torch.arange(4).repeat(2),
                       torch.tensor(0.01).requires_grad_(True), torch.randn(8, 4).requires_grad_(True))
    before = [t.detach().clone() for t in (syn.images, syn.lr, syn.label_logits)]
    d = DistillConfig(syn_steps=3, soft_labels=True, loss_threshold=1e-9)
    optimizers = synthetic_optimizers(syn, d)
    assert len(optimizers) == 3 and optimizers[2].defaults["momentum"] == 0.9
    result = run_iteration(student, syn, trajectory, 0, d, DSA(), 8, optimizers)
    assert float(result.loss) > 1e-9 and not result.stepped and result.steps == 3
    assert all(torch.equal(b, t.detach()) for b, t in zip(before, (syn.images, syn.lr, syn.label_logits)))
    assert all(t.grad is None for t in (syn.images, syn.lr, syn.label_logits))
    d.loss_threshold = 0.0
    assert run_iteration(student, syn, trajectory, 0, d, DSA(), 8, optimizers).stepped and not torch.equal(before[2], syn.label_logits.detach())


class Recorder(Reporter):
    def __init__(self):
        self.steps, self.evaluations = [], []

    def step(self, iteration, metrics):
        self.steps.append(metrics)

    def evaluation(self, iteration, metrics, synthetic):
        self.evaluations.append((iteration, metrics, synthetic))


def datm_config(tmp_path, **distill):
    """The tiny digits setting with every DATM option on: soft labels, init correct, a growing window.
    Its experts train at lr 0.05 for 10 epochs (a second): the labels are the experts' logits, so
    experts that are still unsure (3 epochs at 0.01) give near-uniform labels that teach nothing."""
    return tiny_config(tmp_path, experts={"epochs": 10, "lr": 0.05}, distill={"soft_labels": True, "init": "correct", "min_start_epoch": 0,
                                          "first_max_start_epoch": 1, "max_start_epoch": 2,
                                          "expansion_iterations": 2, "lr_y": 5.0, **distill})


def test_every_skipped_iteration_moves_nothing_and_each_evaluation_counts_its_skips(tmp_path, digits):
    cfg = datm_config(tmp_path, loss_threshold=1e-9, iterations=4, eval_every=2)  # every match is above it
    train_experts(cfg, digits, progress=False)
    recorder = Recorder()
    distill(cfg, digits, reporter=recorder, progress=False)
    assert [m["skipped"] for m in recorder.steps] == [1.0] * 4
    assert [(it, m["threshold_skips"]) for it, m, _ in recorder.evaluations] == [(0, 0), (2, 2), (4, 2)]
    first, last = recorder.evaluations[0][2], recorder.evaluations[-1][2]
    assert torch.equal(first["images"], last["images"]) and torch.equal(first["label_logits"], last["label_logits"])
    entropies = [m["label_entropy"] for _, m, _ in recorder.evaluations]
    assert 0 < entropies[0] < math.log(10) and entropies[0] == entropies[-1]
    # the window: iteration 0 and 1 draw from [0, 1), iterations 2 and 3 from [0, 2)
    assert [m["start_epoch"] for m in recorder.steps[:2]] == [0, 0]


def test_soft_label_set_scores_through_evaluate_from_another_folder(tmp_path, digits, monkeypatch):
    cfg = datm_config(tmp_path, iterations=4, eval_every=2)
    train_experts(cfg, digits, progress=False)
    result = distill(cfg, digits, progress=False)
    saved = torch.load(result["best"], weights_only=True)
    assert saved["label_logits"].shape == (10, 10)
    assert (saved["label_logits"].argmax(1) == saved["labels"]).all()  # init correct: the experts' logits agree
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = elsewhere / "set.pt"
    shutil.copy(result["best"], copy)
    shutil.rmtree(cfg.run_dir)  # nothing of the run is left but the file
    monkeypatch.chdir(elsewhere)
    out = run_in_process("evaluate", "--synthetic", "set.pt", "--eval.num_runs", "2", "--eval.epochs", "10",
                         "--baseline")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "its learned soft labels" in out.stdout
    rows = {line.split("  ")[0]: line for line in out.stdout.splitlines()
            if line.startswith(("distilled", "random real"))}
    assert set(rows) == {"distilled", "distilled, hard labels", "random real"}
    accs = [float(re.search(r"([\d.]+) \+- ", rows[name]).group(1)) for name in rows]
    assert all(a > 20 for a in accs), rows  # ten classes: chance is 10 %


def test_datm_configs_ship_datm_published_values():
    names = shipped_configs("datm")
    assert names == sorted(f"{d}_ipc{k}" for d in ("cifar10", "cifar100", "tiny_imagenet") for k in (1, 10, 50))
    for name in names:
        dataset, _, ipc = name.rpartition("_ipc")
        cfg = apply_overrides(Config(), load_yaml(default_config_path(dataset, int(ipc), "datm")), name).validate()
        d = cfg.distill
        assert cfg.method == "datm" and d.soft_labels and cfg.eval.batch_size == 128 and d.iterations == 10000
        assert d.max_start_epoch - 1 + d.expert_epochs <= cfg.experts.epochs == 100
    c10 = apply_overrides(Config(), load_yaml(default_config_path("cifar10", 10, "datm")), "c10").distill
    assert (c10.syn_steps, c10.expert_epochs, c10.min_start_epoch, c10.first_max_start_epoch, c10.max_start_epoch,
            c10.expansion_iterations, c10.lr_img, c10.lr_lr, c10.lr_y, c10.batch_syn, c10.loss_threshold,
            c10.init) == (80, 2, 0, 10, 20, 1000, 100, 1e-5, 2, 100, 1.0, "correct")


def test_method_datm_picks_its_config_and_names_those_that_exist(tmp_path):
    out = run_in_process("distill", "--method", "datm", "--dataset", "cifar10", "--ipc", "7",
                         "--run_dir", str(tmp_path))
    assert_one_line_error(out, "--method datm ships no config for cifar10 IPC 7", "cifar10_ipc10", "--config")
    out = run_in_process("distill", "--method", "datm", "--dataset", "cifar10", "--ipc", "10",
                         "--data-dir", str(tmp_path / "no_data"), "--run_dir", str(tmp_path))
    assert "config: " + str(default_config_path("cifar10", 10, "datm")) in out.stdout
    assert "soft_labels=True" in out.stdout and out.returncode == 2  # then stops at the missing data


def test_datm_run_on_experts_too_short_names_the_epochs_needed(tmp_path):
    # CIFAR-100 IPC 10 draws start epochs up to T+ - 1 = 49 with M = 2: 51 epochs, MTT's experts have 50
    out = run_in_process("run", "--method", "datm", "--dataset", "cifar100", "--ipc", "10", "--experts.epochs", "50",
                         "--run_dir", str(tmp_path))
    assert_one_line_error(out, "= 51 expert epochs", "experts.epochs is 50")


def test_sweep_space_keeps_the_window_valid():
    from ray import tune

    from ray_mtt.scale.tune import check_space, default_space
    cfg = apply_overrides(Config(), load_yaml(default_config_path("cifar10", 10, "datm")), "c10")
    space = default_space(cfg, 100)
    assert "distill.lr_y" in space and min(space["distill.max_start_epoch"].categories) >= 10
    check_space(space, cfg.distill, 100)
    with pytest.raises(UserError, match="T- < T <= T"):  # T+ = 5 lies below T = 10
        check_space({**space, "distill.max_start_epoch": tune.choice([5, 20])}, cfg.distill, 100)
    with pytest.raises(UserError, match="T- < T <= T"):
        check_space({**space, "distill.min_start_epoch": tune.choice([0, 30])}, cfg.distill, 100)
    with pytest.raises(UserError, match="= 42 but the experts have 30"):  # 40 - 1 + 3 (M up to 3)
        check_space({**space, "distill.max_start_epoch": tune.choice([20, 40])}, cfg.distill, 30)


@pytest.mark.parametrize("method", ["ftd", "pad"])
def test_ftd_and_pad_configs_ship_their_options_and_fit_their_experts(method):
    names = shipped_configs(method)
    assert "cifar10_ipc10" in names and len(names) >= 8
    for name in names:
        dataset, _, ipc = name.rpartition("_ipc")
        cfg = apply_overrides(Config(), load_yaml(default_config_path(dataset, int(ipc), method)), name).validate()
        d, e = cfg.distill, cfg.experts
        assert cfg.method == method and e.optimizer == "gsam" and e.gsam_rho == 0.01
        assert d.max_start_epoch - 1 + d.expert_epochs <= e.epochs
        if method == "ftd":
            assert 0.99 < d.ema < 1 and not d.soft_labels
        else:
            assert e.data_schedule == "pad" and e.schedule_ir == 0.75 and d.soft_labels and d.init == "correct"
    pad10 = apply_overrides(Config(), load_yaml(default_config_path("cifar10", 10, "pad")), "pad").distill
    assert (pad10.mask_ratio, pad10.first_max_start_epoch, pad10.max_start_epoch, pad10.expansion_iterations) == \
        (0.25, 10, 20, 1000)
