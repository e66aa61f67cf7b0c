"""Phase 3: score a distilled set with the paper's protocol, on any registered architectures.

`python -m ray_mtt.evaluate --synthetic FILE.pt --data-dir DATA` needs nothing but the file: it
holds the config it was made with and its preprocessing (ZCA matrices included), and flags such as
`--eval.models convnet,resnet18` override that config. Without --synthetic the set is
<distill dir>/best.pt of the config given (best_ema.pt holds the EMA set of a run with distill.ema).
A set with learned soft labels trains on softmax(labels) and gets a second row, the same images
with hard labels. `--baseline` adds a random-real row of the same IPC.
"""
from __future__ import annotations

from ..core.config import config_from_dict
from ..core.data import load_dataset
from ..core.errors import UserError
from ..core.evaluate import format_table, load_synthetic, score_with_baseline
from ..core.train import resolve_device
from .common import add_config_args, config_from_args, new_parser


def mismatch(saved: dict, path, dataset: str, shape: str) -> UserError:
    """A set made for other data is a one-line error, not a shape error deep inside a network."""
    return UserError(f"{path} holds {saved.get('dataset', 'unknown-dataset')} images of shape "
                     f"{tuple(saved['images'].shape[1:])}, but {dataset} images are {shape}; "
                     f"pick the matching --dataset or set file")


def main(argv: list[str] | None = None) -> None:
    parser = new_parser("python -m ray_mtt.evaluate", __doc__)
    parser.add_argument("--synthetic", help="distilled set (.pt from distill or a sweep); default <distill dir>/best.pt")
    parser.add_argument("--baseline", action="store_true", help="also score a random real subset of the same IPC")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.synthetic:
        saved = load_synthetic(args.synthetic, "cpu")
        base = config_from_dict(saved["config"]) if "config" in saved else None
        cfg = config_from_args(args, base=base)
        path = args.synthetic
    else:
        cfg = config_from_args(args)
        path = cfg.distill_dir / "best.pt"
        saved = load_synthetic(path, "cpu")
    if saved.get("dataset", cfg.data.dataset) != cfg.data.dataset:  # before reading any data
        raise mismatch(saved, path, cfg.data.dataset, "another shape")
    device = resolve_device(cfg.device)
    zca = (saved.get("preprocess") or {}).get("zca")
    data = load_dataset(cfg.data, device, zca=tuple(zca[k] for k in ("mean", "transform", "inverse")) if zca else None)
    want = (data.spec.channels, data.spec.size, data.spec.size)
    if tuple(saved["images"].shape[1:]) != want:
        raise mismatch(saved, path, data.spec.name, "x".join(map(str, want)))
    saved = {k: v.to(device) if hasattr(v, "to") else v for k, v in saved.items()}
    lr = float(saved["lr"])
    rows = score_with_baseline(saved, cfg, data, progress=True, baseline=args.baseline)
    labels = "its learned soft labels" if saved.get("label_logits") is not None else "its labels"
    kind = ", the EMA of its images" if saved.get("images_kind") == "ema" else ""
    print(f"test accuracy over {cfg.eval.num_runs} networks each (distilled set{kind} trained on {labels} with its "
          f"learned lr {lr:.4g})")
    print(format_table(rows))
