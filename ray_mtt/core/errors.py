"""The one exception type for mistakes a user can fix; the CLI prints it as one line (cli/common.py)."""


class UserError(Exception):
    """Bad input (config, data, trajectories). The message names the problem and the fix."""


class Interrupted(UserError):
    """The user stopped the command (Ctrl-C); the message says what was kept. Exit code 130."""
