"""s/iter and peak RSS of one distillation iteration: the authors' distill.py against ray_mtt.

The authors' code (github.com/GeorgeCazenavette/mtt-distillation, checked out anywhere outside
this repository) runs unmodified on disk; this script patches it at run time only:
  * `wandb` is a no-op module whose `log` also stamps the time of every "Grand_Loss" entry (their
    loop logs it once per iteration, after the optimizer steps): s/iter = time between stamps;
  * `utils.get_dataset` reads CIFAR-10 from the project's .npz (mean/std normalised, no ZCA: it
    is applied once before the loop and does not enter the iteration's cost);
  * `utils.get_eval_pool` returns no model, so no evaluation runs, and `Tensor.cuda` is the
    identity on a CPU-only box (their iteration-0 save calls it);
  * the replay buffer is fake: experts of their own ConvNet with random parameters.
ray_mtt runs `python -m ray_mtt.distill` as shipped (the config's grad mode, the CPU allocator
setting) on a real (tiny) expert store, with `Distiller.step` wrapped to stamp the wall time of each
iteration. Every run is a fresh child process, one after
the other, with the same thread count; peak RSS is the child's VmHWM.

  python benchmarks/side_by_side.py --authors ../mtt-distillation --data-dir ../shared/data \
      --configs ipc1:20,ipc1:50,ipc10:30 --iterations 6 --json benchmarks/results/side_by_side_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ray_mtt.core.config import default_config_path, load_yaml  # noqa: E402

STAMPS: list[float] = []


def fake_wandb() -> types.ModuleType:
    wandb = types.ModuleType("wandb")
    config = types.SimpleNamespace(_items={})

    def init(config=None, **_):
        wandb.config._items.update(vars(config))

    def log(entry, step=None):
        if "Grand_Loss" in entry:
            STAMPS.append(time.perf_counter())

    wandb.config, wandb.init, wandb.log, wandb.finish = config, init, log, lambda: None
    wandb.run = types.SimpleNamespace(name="side_by_side")
    wandb.Histogram = wandb.Image = lambda *a, **k: None
    return wandb


def npz_dataset(data_dir: str):
    """What their get_dataset returns for CIFAR10, from the project's .npz."""
    raw = np.load(Path(data_dir) / "cifar10.npz")
    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]  # their CIFAR10 constants

    def tensors(split):
        x = torch.from_numpy(raw[f"x_{split}"]).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return torch.utils.data.TensorDataset(x, torch.from_numpy(raw[f"y_{split}"]))

    def get_dataset(dataset, data_path, batch_size=1, subset=None, args=None):
        train, test = tensors("train"), tensors("test")
        loader = torch.utils.data.DataLoader(test, batch_size=256)
        classes = [str(c) for c in raw["classes"]]
        return 3, (32, 32), 10, classes, mean, std, train, test, loader, None, {i: i for i in range(10)}, None
    return get_dataset


def write_fake_buffer(authors: Path, buffer_dir: Path, snapshots: int, experts: int = 2) -> None:
    sys.path.insert(0, str(authors))
    from utils import get_network  # their ConvNet, so shapes and order are theirs
    out = buffer_dir / "CIFAR10_NO_ZCA" / "ConvNet"
    out.mkdir(parents=True, exist_ok=True)
    net = get_network("ConvNet", 3, 10, (32, 32), dist=False)
    torch.save([[[torch.randn_like(p) * 0.05 for p in net.parameters()] for _ in range(snapshots)]
                for _ in range(experts)], out / "replay_buffer_0.pt")


def authors_child(authors: Path, data_dir: str, ipc: int, steps: int, iterations: int) -> list[float]:
    sys.modules["wandb"] = fake_wandb()
    sys.path.insert(0, str(authors))
    import utils
    utils.get_dataset = npz_dataset(data_dir)
    utils.get_eval_pool = lambda *a, **k: []
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
    with tempfile.TemporaryDirectory() as tmp:
        write_fake_buffer(authors, Path(tmp), snapshots=2 + 2 + 1)
        sys.argv = ["distill.py", "--dataset", "CIFAR10", "--ipc", str(ipc), "--syn_steps", str(steps),
                    "--expert_epochs", "2", "--max_start_epoch", "2", "--lr_img", "1000", "--lr_lr", "1e-07",
                    "--lr_teacher", "0.01", "--Iteration", str(iterations - 1), "--eval_it", str(10 ** 6),
                    "--buffer_path", tmp, "--data_path", data_dir]
        cwd = os.getcwd()
        os.chdir(tmp)  # their iteration-0 save writes ./logged_files
        try:
            runpy.run_path(str(authors / "distill.py"), run_name="__main__")
        finally:
            os.chdir(cwd)
    return [b - a for a, b in zip(STAMPS, STAMPS[1:])]  # the first iteration has no predecessor


def ours_child(data_dir: str, ipc: int, steps: int, iterations: int) -> list[float]:
    from ray_mtt.cli import distill as cli_distill, experts as cli_experts
    from ray_mtt.core.distill import Distiller
    common = ["--dataset", "cifar10", "--ipc", str(ipc), "--data-dir", data_dir, "--data.train_per_class", "60",
              "--data.zca", "false", "--experts.num_experts", "1", "--experts.epochs", "4"]
    with tempfile.TemporaryDirectory() as tmp:
        common += ["--run_dir", tmp]
        cli_experts.main(common + ["--engine", "local"])
        step = Distiller.step

        def timed(self, it):
            t0 = time.perf_counter()
            try:
                return step(self, it)
            finally:
                STAMPS.append(time.perf_counter() - t0)
        Distiller.step = timed
        cli_distill.main(common + ["--distill.syn_steps", str(steps), "--distill.expert_epochs", "2",
                                   "--distill.max_start_epoch", "2", "--distill.lr_img", "1000",
                                   "--distill.lr_lr", "1e-07", "--distill.lr_teacher", "0.01",
                                   "--distill.iterations", str(iterations), "--distill.eval_every", "0",
                                   "--distill.eval_epochs", "1", "--distill.eval_runs", "1",
                                   "--tracking-uri", "none"])
    return STAMPS[1:]  # as for the authors: iterations 1, 2, ...


def child_main(argv: list[str]) -> None:
    """One measured run in this (fresh) process; prints its iteration times and peak RSS as JSON."""
    who, authors, data_dir, ipc, steps, iterations = argv
    if who == "authors":
        times = authors_child(Path(authors), data_dir, int(ipc), int(steps), int(iterations))
    else:
        times = ours_child(data_dir, int(ipc), int(steps), int(iterations))
    with open("/proc/self/status") as f:  # VmHWM, not ru_maxrss: Linux carries that across exec
        peak_gb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    print("SIDE_BY_SIDE " + json.dumps({"times": times, "peak_rss_gb": peak_gb}))


def measure(who: str, args, ipc: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--_child", who, str(args.authors), args.data_dir, str(ipc), str(steps),
           str(args.iterations)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in out.stdout.splitlines() if l.startswith("SIDE_BY_SIDE ")]
    if out.returncode or not lines:
        sys.exit(f"error: the {who} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    steady = result["times"][args.skip:]  # times[k] is iteration k + 1; the first ones warm caches up
    result["median_s"] = statistics.median(steady)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", type=Path, help="a checkout of the authors' mtt-distillation repository")
    parser.add_argument("--data-dir", help="the folder holding cifar10.npz")
    parser.add_argument("--configs", default="ipc1:20,ipc1:50,ipc10:30", help="comma-separated ipc<k>:<N>")
    parser.add_argument("--iterations", type=int, default=6, help="iterations per run")
    parser.add_argument("--skip", type=int, default=2, help="first iterations left out of the median")
    parser.add_argument("--json", help="also write the raw times here")
    parser.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        return child_main(args._child)
    if not args.data_dir or not (Path(args.data_dir) / "cifar10.npz").is_file():
        sys.exit("error: --data-dir must name the folder holding cifar10.npz")
    if not args.authors or not (args.authors / "distill.py").is_file():
        sys.exit("error: --authors must name a checkout of GeorgeCazenavette/mtt-distillation (holding distill.py)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median s/iter over iterations "
          f"{args.skip + 1}..{args.iterations - 1}; ratio = ray_mtt / authors")
    print("| config | authors s/iter | ray_mtt s/iter | ratio | peak RSS authors / ray_mtt |\n|---|---|---|---|---|")
    raw = {}
    for config in args.configs.split(","):
        ipc, steps = (int(v) for v in config.removeprefix("ipc").split(":"))
        runs = {who: measure(who, args, ipc, steps) for who in ("authors", "ray_mtt")}
        raw[config] = runs
        a, o = runs["authors"], runs["ray_mtt"]
        mode = load_yaml(default_config_path("cifar10", ipc)).get("distill.grad_mode", "unrolled")
        runs["ray_mtt"]["grad_mode"] = mode
        print(f"| IPC {ipc}, N={steps} | {a['median_s']:.2f} | {o['median_s']:.2f} ({mode}) | "
              f"{o['median_s'] / a['median_s']:.2f} | {a['peak_rss_gb']:.2f} / {o['peak_rss_gb']:.2f} GB |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
