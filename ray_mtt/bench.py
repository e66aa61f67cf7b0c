"""`python -m ray_mtt.bench`: see ray_mtt/cli/bench.py."""
from .cli import entry

entry("bench", __name__)
