"""Where a command's outputs go on a cluster, and the check that every node can reach them.

A cluster sets its shared places once, in every node's environment (cluster/aws.yaml renders them):
  RAY_MTT_STORAGE       a URI root every node can write (s3://BUCKET/ray_mtt): the default
                        trajectory store is <root>/<dataset>/experts_<model>[_zca], sweeps <root>/sweeps
  RAY_MTT_TRACKING_URI  the MLflow server (http://HEAD_IP:5000), the default --tracking-uri
Flags still win. Imports no ray at module level: every command's start reads this.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.config import Config
from ..core.errors import UserError
from ..core.storage import is_uri

STORAGE_ENV = "RAY_MTT_STORAGE"
TRACKING_ENV = "RAY_MTT_TRACKING_URI"


def storage_root() -> str:
    return os.environ.get(STORAGE_ENV, "").rstrip("/")


def apply_storage_default(cfg: Config) -> Config:
    """An unset trajectory store goes under the cluster's storage root, when one is set."""
    if not cfg.experts.dir and storage_root():
        cfg.experts.dir = f"{storage_root()}/{cfg.store_name}"
    return cfg


def default_sweep_storage(run_dir: str) -> str:
    return f"{storage_root()}/sweeps" if storage_root() else str(Path(run_dir) / "tune" / "ray")


def default_tracking_uri(run_dir: str | Path) -> str:
    return os.environ.get(TRACKING_ENV) or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def autoscaler_config() -> dict:
    """The autoscaler's config on this head node (`ray up` writes it to ~/ray_bootstrap_config.yaml),
    or {} off a `ray up` head."""
    path = Path.home() / "ray_bootstrap_config.yaml"
    if not path.is_file():
        return {}
    import yaml
    return yaml.safe_load(path.read_text()) or {}


def autoscaler_node_types() -> dict:
    return autoscaler_config().get("available_node_types", {}) or {}


def autoscaler_can_add_nodes() -> bool:
    """Whether the autoscaler may launch worker nodes (a fresh cluster is just its head)."""
    config = autoscaler_config()
    head = config.get("head_node_type")
    return any(name != head and (t.get("max_workers", config.get("max_workers", 0)) or 0) > 0
               for name, t in autoscaler_node_types().items())


def cluster_can_span_nodes() -> bool:
    """More than one node now, or an autoscaler that may add some: a local folder or file is then
    a place other nodes cannot reach (now, or once they are up)."""
    import ray
    return len([n for n in ray.nodes() if n["Alive"]]) > 1 or autoscaler_can_add_nodes()


def check_shared(places: dict[str, str], tracking_uri: str | None = None) -> None:
    """Every place in `places` (what -> path or URI) must be a URI, and tracking a server: on a
    cluster that spans nodes, one line naming the first that is not, and the fix."""
    if tracking_uri is not None and not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise UserError(f"--tracking-uri {tracking_uri} is a file on this node, which work on other nodes cannot "
                        f"write; run `mlflow server` on the head and pass --tracking-uri http://HEAD_IP:5000 "
                        f"(or set {TRACKING_ENV})")
    for what, location in places.items():
        if not is_uri(location):
            raise UserError(f"the {what} {location} is a local folder, which other nodes of this cluster cannot "
                            f"reach (or, on an autoscaling cluster, nodes not yet up); pass a URI every node can "
                            f"write, e.g. s3://BUCKET/..., or set {STORAGE_ENV}=s3://BUCKET/ray_mtt")
