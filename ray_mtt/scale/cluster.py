"""The Ray cluster a command runs on: joining it (or a fresh local one) without minutes of silent
retries, what it can offer (GPUs now, or node types its autoscaler can launch), and Ray-level
failures as one line."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import ray

from ..core.errors import UserError
from .places import autoscaler_node_types


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or ray://HOST:PORT")
    return host, int(port)


def answers(address: str, timeout_s: float = 5.0) -> bool:
    try:
        socket.create_connection(parse_address(address), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_reachable(address: str | None) -> None:
    """Ray's client retries a HOST:PORT that nobody answers for minutes; a TCP connect tells in seconds."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    if not answers(address):
        raise UserError(f"no Ray cluster answers at {address}; start one there with `ray start --head`, "
                        f"or drop --address to use the local one")


def recorded_address() -> tuple[str | None, Path]:
    """The cluster `ray start` recorded on this machine: what ray.init() joins when no address is given."""
    path = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    return (path.read_text().strip() or None if path.is_file() else None), path


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or the one running on this machine, or start a local one.
    A local cluster that died without cleaning up stays recorded, and ray.init() would sit in
    connect retries for minutes: a recorded address that does not answer starts a fresh one."""
    address = address or None  # "" (an unset flag) is no address, as None is
    if address is None and not os.environ.get("RAY_ADDRESS"):
        recorded, path = recorded_address()
        if recorded and not answers(recorded):
            print(f"the Ray cluster recorded in {path} ({recorded}) does not answer: starting a fresh local one",
                  flush=True)
            address = "local"
    check_reachable(address)
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                 configure_logging=False)
    except Exception as e:  # Ray raises a bare Exception when a local node's processes do not come up in time
        if "timed out during startup" not in str(e):
            raise
        raise UserError("the local Ray node timed out during startup (its raylet or GCS did not come up: an "
                        "overloaded machine); rerun when it is less busy, or pass --address of a running cluster "
                        "(`ray start --head`)") from None


def ray_failure(e: BaseException, what: str) -> UserError:
    """A Ray-level failure (a dead raylet or node, an actor the memory monitor killed) as one line."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return UserError(f"{what} failed in Ray ({type(e).__name__}: {first[:300]}); everything saved so far is kept: "
                     f"rerun the same command to resume")


def bootstrap_gpu_types() -> bool:
    """Whether the autoscaler's config on this head node (`ray up` writes it) has GPU node types."""
    return any((t.get("resources") or {}).get("GPU", 0) > 0 for t in autoscaler_node_types().values())


def want_gpus(use_gpu: str) -> bool:
    """--use-gpu yes|no|auto; auto = GPUs are up now, or the autoscaler can launch nodes that have them."""
    if use_gpu in ("yes", "no"):
        return use_gpu == "yes"
    return bool(ray.cluster_resources().get("GPU")) or bootstrap_gpu_types()
