"""Write the training split into an FFCV .beton ahead of an expert job (see core/beton.py)."""
from __future__ import annotations

from ..core.beton import beton_file, write_beton
from .common import parse_command


def main(argv: list[str] | None = None) -> None:
    _, cfg = parse_command("python -m ray_mtt.beton", __doc__, argv)
    path = beton_file(cfg)
    if path.is_file():
        print(f"{path} exists; delete it to write it again")
        return
    write_beton(cfg)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
