"""`python -m ray_mtt.distill`: see ray_mtt/cli/distill.py."""
from .cli import entry

entry("distill", __name__)
