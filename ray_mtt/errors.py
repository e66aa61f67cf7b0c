"""One exception type for mistakes a user can fix, and the CLI wrapper that prints it in one line."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input (config, data, trajectories). The message names the problem and the fix."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a CLI entry point; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
