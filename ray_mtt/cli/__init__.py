"""Every command's `main`: argparse, printing, engine choice, one-line errors.

`python -m ray_mtt[.experts|.distill|.evaluate|.tune|.bench|.beton|.export|.cluster|.difficulty]` and the `ray-mtt`
console script (`ray-mtt [run|experts|distill|...] FLAGS`) all land here.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": "main", "experts": "experts", "distill": "distill", "evaluate": "evaluate", "tune": "tune",
    "bench": "bench", "beton": "beton", "export": "export", "cluster": "cluster", "difficulty": "difficulty",
}


def run_command(command: str, argv: list[str] | None = None) -> None:
    """Import only the command asked for (tune pulls in Ray and MLflow; bench needs only torch)."""
    from .common import run_cli
    module = importlib.import_module(f"{__name__}.{COMMANDS[command]}")
    run_cli(module.main, argv)


def entry(command: str, module_name: str) -> None:
    """What `python -m ray_mtt.<command>` runs: the command, when its module is the one executed."""
    if module_name == "__main__":
        run_command(command)


def console() -> None:
    """The `ray-mtt` script: a command name first (default: run, the whole job), then its flags."""
    argv = sys.argv[1:]
    if argv and argv[0] in COMMANDS:
        run_command(argv[0], argv[1:])
    elif argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(f"usage: ray-mtt [{'|'.join(COMMANDS)}] [FLAGS]; `ray-mtt COMMAND --help` lists a command's flags")
    else:
        run_command("run", argv)
