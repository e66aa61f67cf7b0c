"""`python -m ray_mtt`: the whole job (ray_mtt/cli/main.py)."""
from .cli import run_command

run_command("run")
