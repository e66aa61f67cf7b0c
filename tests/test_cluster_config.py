"""cluster/aws.yaml passes Ray's own cluster-config validation (offline) and keeps the cluster closed."""
import copy
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

AWS = Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml"


@pytest.fixture
def aws():
    return yaml.safe_load(AWS.read_text())


def test_aws_yaml_passes_rays_schema_and_a_typo_does_not(aws):
    validate_config(prepare_config(copy.deepcopy(aws)))
    aws["available_node_types"]["gpu_worker"]["min_wrkers"] = 1
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(aws))


def test_aws_yaml_uses_the_pinned_ray_and_admits_ssh_only(aws):
    assert aws["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-") and "gpu" in aws["docker"]["image"]
    rules = aws["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "mlflow server" in head_start
    assert "RAY_AUTH_MODE" not in AWS.read_text()  # token authentication stays on
