"""`python -m ray_mtt.tune`: see ray_mtt/cli/tune.py."""
from .cli import entry

entry("tune", __name__)
