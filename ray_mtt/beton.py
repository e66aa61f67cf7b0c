"""`python -m ray_mtt.beton`: see ray_mtt/cli/beton.py."""
from .cli import entry

entry("beton", __name__)
