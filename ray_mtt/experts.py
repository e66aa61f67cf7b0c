"""`python -m ray_mtt.experts`: see ray_mtt/cli/experts.py."""
from .cli import entry

entry("experts", __name__)
