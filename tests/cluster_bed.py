"""A test bed shaped like a real cluster, on one machine: a Ray head, worker nodes whose filesystems
hide the driver's folders (each in its own mount namespace with a tmpfs over them, as root), and an
S3 endpoint on loopback (moto). Worker nodes get the bucket's credentials in their environment, as
an instance profile gives each node on AWS; they may declare GPUs they lack, so GPU requests are
scheduled for real (the code inside trains on the CPU).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "mtt-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    """moto in server mode on 127.0.0.1; `env` is what a process needs to use it (pyarrow, boto3, MLflow)."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url}
        # moto keeps its buckets per process, across servers: start every endpoint empty.
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=30)
        import boto3
        self.s3 = boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                               aws_secret_access_key="testing", region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()


@dataclass
class Node:
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL to the node's whole process group: the raylet and its workers die at once, as when a
        spot instance is taken away (SIGTERM to `ray start --block` leaves its children running)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


class SharedNothingCluster:
    """A head node (no CPUs, so all work lands on workers) in the driver's namespace, and worker
    nodes that cannot see `hidden` folders of the driver's filesystem."""

    def __init__(self, workdir: Path, hidden: list[Path], env: dict[str, str]):
        self.workdir, self.hidden = workdir, [p.resolve() for p in hidden]
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", **env}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers: list[Node] = []
        self.head = self._start("head", [RAY, "start", "--head", f"--port={self.port}", "--num-cpus=0",
                                         "--include-dashboard=false", "--block"])
        import ray
        deadline = time.time() + 60
        while True:  # the test process is a driver of this cluster too: it watches nodes and places probes
            try:
                ray.init(address=self.address, log_to_driver=False)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)

    def _start(self, name: str, command: list[str]) -> Node:
        log = self.workdir / f"{name}.log"
        process = subprocess.Popen(command, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        return Node(process, log)

    def add_worker(self, cpus: int = 1, gpus: int = 0) -> Node:
        mounts = " && ".join(f"mount -t tmpfs none {p}" for p in self.hidden)
        start = f"exec {RAY} start --address={self.address} --num-cpus={cpus} --num-gpus={gpus} --block"
        node = self._start(f"worker{len(self.workers)}", ["unshare", "-m", "sh", "-c", f"{mounts} && {start}"])
        self.workers.append(node)
        self._wait_for_nodes(1 + len([w for w in self.workers if w.process.poll() is None]))
        return node

    def alive(self) -> list[dict]:
        import ray
        return [n for n in ray.nodes() if n["Alive"]]

    def _wait_for_nodes(self, count: int, timeout_s: float = 90) -> None:
        deadline = time.time() + timeout_s
        while len(self.alive()) < count:
            if time.time() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} live nodes; see the logs in {self.workdir}")
            time.sleep(0.5)

    def sees(self, path: Path, node_id: str) -> bool:
        """Whether a task placed on node `node_id` finds `path` (a worker node must not)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        probe = ray.remote(num_cpus=0)(os.path.exists).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        return ray.get(probe.remote(str(path)), timeout=60)

    def worker_node_ids(self) -> list[str]:
        return [n["NodeID"] for n in self.alive() if n["Resources"].get("CPU", 0) > 0]

    def shutdown(self) -> None:
        import ray
        ray.shutdown()
        for node in [*self.workers, self.head]:
            node.kill()
