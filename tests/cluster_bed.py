"""A test bed shaped like a real cluster, on one machine: a Ray head with token authentication and
the job API, worker nodes that share no disk with it or each other (each in its own mount namespace,
as root, with its own tmpfs over /tmp, its $HOME and Ray's temp dir on it, and over the driver's folders),
an S3 endpoint on loopback (moto) and an MLflow server on PostgreSQL. Worker nodes get the bucket's
credentials in their environment, as an instance profile gives each node on AWS, and Ray's token in
their own ~/.ray/auth_token (mode 0600), as cluster/aws.yaml mounts it; they may declare GPUs they
lack, so GPU requests are scheduled for real (the code inside trains on the CPU).
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "mtt-bucket"


def use_token_auth() -> Path:
    """Make this process a token-authenticated Ray client, with one token file of mode 0600 (kept if
    already set). Ray reads RAY_AUTH_MODE when it is imported: call this before anything imports ray."""
    if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(tempfile.mkdtemp(prefix="ray_mtt_token_")) / "auth_token"
        atexit.register(shutil.rmtree, token.parent, ignore_errors=True)  # one per test session, not kept
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ["RAY_AUTH_MODE"] = "token"
    return Path(os.environ["RAY_AUTH_TOKEN_PATH"])


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
    """A head node (no CPUs, so all work lands on workers; the dashboard's job API on loopback) in the
    driver's namespace, and worker nodes that see none of its files. Token auth is on: `env` is what
    a client on the head needs (the test process sets it in its own environment too)."""


    def __init__(self, workdir: Path, hidden: list[Path], env: dict[str, str], job_api: bool = False):
        self.workdir, self.hidden = workdir, [p.resolve() for p in hidden]
        # This process is a client too (probes, node watch): the process's token (use_token_auth,
        # which tests/conftest.py and the benchmarks call before ray loads) is the cluster's.
        self.token = use_token_auth()
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token)}
        self.saved_env = {k: os.environ.get(k) for k in self.auth}
        os.environ.update(self.auth)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env, **self.auth}  # no calls off this machine
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.job_api = f"http://127.0.0.1:{self.dashboard_port}"
        self.workers: list[Node] = []
        dashboard = ([f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1"] if job_api
                     else ["--include-dashboard=false"])
        self.head = self._start("head", [RAY, "start", "--head", f"--port={self.port}", "--num-cpus=0",
                                         *dashboard, "--block"])
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
        if job_api:
            self._wait_for_job_api()

    def _wait_for_job_api(self, timeout_s: float = 90) -> None:
        deadline = time.time() + timeout_s
        while subprocess.run([RAY, "job", "list", "--address", self.job_api], env=self.env,
                             capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError(f"the head's job API did not answer; see {self.workdir / 'head.log'}")
            time.sleep(1)

    def submit(self, *command: str, timeout_s: float = 900, **popen) -> subprocess.Popen:
        """`ray job submit` of `command`, with the token, as the README tells a user to; the job's
        driver runs on the head. Returns the client process (it follows the job's logs to the end)."""
        return subprocess.Popen([RAY, "job", "submit", "--address", self.job_api, "--", *command], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)

    def _start(self, name: str, command: list[str]) -> Node:
        log = self.workdir / f"{name}.log"
        process = subprocess.Popen(command, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        return Node(process, log)

    def add_worker(self, cpus: int = 1, gpus: int = 0) -> Node:
        """A node in its own mount namespace: a fresh tmpfs over /tmp (so Ray's session dir, trial
        folders and caches are its own) and over every hidden folder; $HOME is a folder on that
        tmpfs (the real one also holds the Python install); the token is copied into its ~/.ray
        before the test's /tmp, where the token file is, disappears."""
        private = ["/tmp", *(str(p) for p in self.hidden if not str(p).startswith("/tmp/"))]
        mounts = " && ".join(f"mount -t tmpfs none {p}" for p in private)
        token = (f'token=$(cat {self.token}) && {mounts} && export HOME=/tmp/home && mkdir -m 700 -p "$HOME/.ray" '
                 f'&& (umask 077 && printf %s "$token" > "$HOME/.ray/auth_token")')
        start = (f"exec env -u RAY_AUTH_TOKEN_PATH {RAY} start --address={self.address} --num-cpus={cpus} "
                 f"--num-gpus={gpus} --block")
        node = self._start(f"worker{len(self.workers)}", ["unshare", "-m", "sh", "-c", f"{token} && {start}"])
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
        for k, v in self.saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def postgres_bin() -> Path:
    """Debian's PostgreSQL programs (the newest installed major version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    return found[-1].parent


class PostgreSQL:
    """Debian's PostgreSQL on loopback, as the RDS instance of cluster/aws.yaml: a database `mlflow`
    owned by user `mlflow`. It refuses to run as root, so its folder belongs to user postgres."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="ray_mtt_pg_", dir="/tmp"))  # pytest's tmp dirs are root-only
        shutil.chown(self.dir, "postgres")
        self.port, pg = free_port(), postgres_bin()
        as_postgres = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*as_postgres, str(pg / "initdb"), "-D", str(self.dir / "data"), "-A", "trust",
                        "-U", "mlflow"], check=True, capture_output=True)
        subprocess.run([*as_postgres, str(pg / "pg_ctl"), "-D", str(self.dir / "data"), "-l",
                        str(self.dir / "log"), "-w", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
                        "start"], check=True, capture_output=True)
        subprocess.run([*as_postgres, str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                        "mlflow", "mlflow"], check=True, capture_output=True)
        self.uri = f"postgresql://mlflow@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(postgres_bin() / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class TrackingServer:
    """The head's MLflow server, started by the head's own command (`python -m ray_mtt.cluster
    tracking-server`): the database URI read from an SSM parameter (moto), records in PostgreSQL,
    artifacts in the bucket. `restart` is what a second `ray up` does."""

    PARAMETER = "/ray-mtt/mlflow-db"

    def __init__(self, workdir: Path, s3: S3Endpoint):
        self.workdir, self.s3 = workdir, s3
        self.database = PostgreSQL()
        import boto3
        boto3.client("ssm", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").put_parameter(
            Name=self.PARAMETER, Type="SecureString", Value=self.database.uri, Overwrite=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.home = workdir / "head_home"  # the server's pid file lives in the head's $HOME
        self.home.mkdir(exist_ok=True)
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        command = [sys.executable, "-m", "ray_mtt.cluster", "tracking-server", "--backend", f"ssm:{self.PARAMETER}",
                   "--artifacts", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(self.port)]
        log = open(self.workdir / "mlflow-server.log", "a")
        process = subprocess.Popen(command, env={**os.environ, **self.s3.env, "HOME": str(self.home)},
                                   stdout=log, stderr=subprocess.STDOUT)
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=1).status == 200:
                    return process
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        raise RuntimeError(f"the MLflow server did not answer /health; see {self.workdir}/mlflow-server.log")

    def restart(self) -> None:
        """Run the command again, as a second `ray up` does: it ends the server the first one left
        (found by its pid file) and serves the same records."""
        old = self.process
        reaper = threading.Thread(target=old.wait, daemon=True)  # the test is its parent: reap it when it ends
        reaper.start()
        self.process = self._start()
        reaper.join(timeout=60)
        assert old.returncode is not None, "the earlier server still runs beside the new one"

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        except ProcessLookupError:
            pass
        self.database.stop()
