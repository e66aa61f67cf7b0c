"""The head's MLflow server: its backend resolved (an SSM parameter holds the database URI, so the
URI is never in a file), a server an earlier `ray up` started replaced, then `mlflow server`."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path



def pid_file() -> Path:
    return Path.home() / ".ray_mtt_mlflow.pid"


def resolve_backend(backend: str, region: str | None = None) -> str:
    """`ssm:/name` -> the parameter's decrypted value; any other backend URI as given."""
    if not backend.startswith("ssm:"):
        return backend
    import boto3
    ssm = boto3.client("ssm", region_name=region)
    return ssm.get_parameter(Name=backend[len("ssm:"):], WithDecryption=True)["Parameter"]["Value"]


def stop_earlier_server() -> None:
    """`ray up` reruns the head's start commands: end the server the last run started (its
    records are in the backend, so nothing is lost)."""
    try:
        pid = int(pid_file().read_text())
        os.killpg(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return
    deadline = time.time() + 60
    while time.time() < deadline:  # its port is free once its group is gone
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def serve(backend: str, artifacts: str, host: str, port: int, region: str | None = None) -> None:
    """Replace this process with `mlflow server` (its pid, in its own process group, is recorded)."""
    uri = resolve_backend(backend, region)
    if uri.startswith("sqlite:"):
        print(f"tracking in {uri}: a file on this node, lost at `ray down`; use a PostgreSQL backend to keep "
              f"run records", file=sys.stderr, flush=True)
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    stop_earlier_server()
    try:
        os.setpgrp()  # the server's uvicorn workers stay in this group: one signal ends them all
    except PermissionError:  # already a session leader, hence a group leader
        pass
    pid_file().write_text(str(os.getpid()))
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--artifacts-destination", artifacts, "--host", host, "--port", str(port)])
