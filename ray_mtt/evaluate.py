"""`python -m ray_mtt.evaluate`: see ray_mtt/cli/evaluate.py."""
from .cli import entry

entry("evaluate", __name__)
