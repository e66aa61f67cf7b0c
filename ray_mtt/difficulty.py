"""`python -m ray_mtt.difficulty`: see ray_mtt/cli/difficulty.py."""
from .cli import entry

entry("difficulty", __name__)
