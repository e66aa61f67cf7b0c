"""cluster/: the AWS cluster config renders only with its required values, passes Ray's own schema
(offline), runs token authentication for real, and scopes each node's permissions to one bucket."""
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from tests.cluster_bed import RAY, free_port  # noqa: E402

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
VALUES = {"RAY_MTT_SSH_CIDR": "203.0.113.7/32", "RAY_MTT_BUCKET": "my-mtt-bucket",
          "RAY_MTT_IMAGE": "123456789012.dkr.ecr.us-west-2.amazonaws.com/ray-mtt:0.1.0", "RAY_MTT_AMI": "ami-0abc"}


def render(**values) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_MTT_")}
    return subprocess.run([str(CLUSTER / "render.sh")], env={**env, **values}, capture_output=True, text=True)


@pytest.fixture
def aws():
    result = render(**VALUES)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_rendered_config_passes_rays_schema_and_a_typo_does_not(aws):
    validate_config(prepare_config(copy.deepcopy(aws)))
    assert "${" not in json.dumps(aws)  # every placeholder was filled
    aws["available_node_types"]["gpu_worker"]["min_wrkers"] = 1
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(aws))


def test_required_values_are_required_and_ssh_is_never_open_to_all():
    for missing in VALUES:
        result = render(**{k: v for k, v in VALUES.items() if k != missing})
        assert result.returncode != 0 and missing in result.stderr and not result.stdout
    result = render(**{**VALUES, "RAY_MTT_SSH_CIDR": "0.0.0.0/0"})
    assert result.returncode == 2 and "whole internet" in result.stderr


def test_nodes_run_the_pinned_image_on_spot_gpus_with_their_own_profiles(aws):
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile and "pip install" in dockerfile
    assert aws["docker"]["image"] == VALUES["RAY_MTT_IMAGE"] and not aws["setup_commands"]
    types = aws["available_node_types"]
    assert types["gpu_worker"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_worker"]["resources"]["GPU"] == 1  # the driver sees GPU node types before one is up
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()} == {"ray-mtt-head",
                                                                                       "ray-mtt-worker"}
    rules = aws["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpRanges"][0]["CidrIp"]) for r in rules] == [(22, 22, "203.0.113.7/32")]
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--artifacts-destination s3://my-mtt-bucket/" in head


def test_bucket_permissions_name_one_bucket_only():
    for name in ("head-policy.json", "worker-policy.json"):
        policy = json.loads((CLUSTER / "iam" / name).read_text())
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            if any(a.startswith("s3:") for a in actions):
                assert "s3:*" not in actions
                assert statement["Resource"] in ("arn:aws:s3:::${RAY_MTT_BUCKET}", "arn:aws:s3:::${RAY_MTT_BUCKET}/*")


def start_commands(aws) -> list[str]:
    return [c for c in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"] if "ray start" in c]


def test_every_node_starts_ray_with_token_auth_and_gets_the_token(aws):
    assert len(start_commands(aws)) == 2
    assert all(re.search(r"RAY_AUTH_MODE=token ray start", c) for c in start_commands(aws))
    assert aws["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path


@pytest.mark.slow
def test_the_head_start_command_refuses_a_client_without_the_token(aws, tmp_path):
    """The mechanism, not a string: the head's own start command (its env prefix, at a free port and
    without the autoscaler) with a token file; a wrong token is refused, the right one connects."""
    head = next(c for c in aws["head_start_ray_commands"] if "ray start" in c)
    prefix = dict(kv.split("=", 1) for kv in head.split("ray start")[0].split())
    token = tmp_path / "auth_token"
    token.write_text("a" * 64)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, **prefix,
           "RAY_AUTH_TOKEN_PATH": str(token)}
    node = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                             "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    probe = f"import ray; ray.init(address='127.0.0.1:{port}'); print('CONNECTED')"
    try:
        time.sleep(8)
        for given, connects in (("b" * 64, False), ("a" * 64, True)):
            client = {**env, "RAY_AUTH_TOKEN": given}
            client.pop("RAY_AUTH_TOKEN_PATH")
            out = subprocess.run([sys.executable, "-c", probe], env=client, capture_output=True, text=True,
                                 timeout=120)
            assert ("CONNECTED" in out.stdout) == connects, out.stderr[-2000:]
    finally:
        os.killpg(node.pid, 9)
        node.wait(timeout=30)
