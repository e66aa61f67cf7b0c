"""`python -m ray_mtt.cluster`: see ray_mtt/cli/cluster.py."""
from .cli import entry

entry("cluster", __name__)
