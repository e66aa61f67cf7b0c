"""`python -m ray_mtt.export`: see ray_mtt/cli/export.py."""
from .cli import entry

entry("export", __name__)
