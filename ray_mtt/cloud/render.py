"""cluster/aws.yaml filled in: the values a cluster needs, checked, and the registry login."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from ..core.errors import UserError

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"  # the checkout's cluster/ (ray up runs from one)
PLACEHOLDER = re.compile(r"\$\{(RAY_MTT_[A-Z_]+)\}")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
ECR = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/(?P<repository>[^@:]+)@")
SQLITE_BACKEND = "sqlite:////home/ray/mlflow/mlflow.db"


def ecr_repository_arn(ecr: dict) -> str:
    """The repository of an ECR image (ECR.match(...).groupdict()), as IAM names it."""
    return f"arn:aws:ecr:{ecr['region']}:{ecr['account']}:repository/{ecr['repository']}"


@dataclass
class ClusterValues:
    bucket: str = ""  # the S3 bucket of trajectories, sweeps and MLflow artifacts
    image: str = ""  # the node image by digest: REGISTRY/REPO@sha256:...
    ami: str = ""  # a Deep Learning Base GPU AMI id of the region (README step 1 looks it up)
    security_group: str = ""  # sg-...: the project's group (provision creates it)
    region: str = "us-west-2"  # the AWS region of the cluster, its bucket and its database
    cluster: str = "ray-mtt"  # Ray's cluster_name: the tag the head may manage instances by
    # MLflow's records: RDS PostgreSQL, or sqlite, a file on the head that is LOST at `ray down` (a quick trial)
    tracking: Literal["postgres", "sqlite"] = "postgres"

    @property
    def tracking_parameter(self) -> str:
        """The SSM parameter holding the database URI (a SecureString: never in a file in git)."""
        return f"/{self.cluster}/mlflow-db"

    @property
    def tracking_backend(self) -> str:
        return f"ssm:{self.tracking_parameter}" if self.tracking == "postgres" else SQLITE_BACKEND

    @property
    def ecr(self) -> dict | None:
        """account, region and repository of an ECR image; None for any other registry."""
        match = ECR.match(self.image)
        return match.groupdict() if match else None

    def check(self, with_group: bool = True) -> "ClusterValues":
        """Every value present and usable (before provision creates anything: `with_group=False`)."""
        needed = ("bucket", "image", "ami", "security_group") if with_group else ("bucket", "image", "ami")
        missing = [f"--{name.replace('_', '-')}" for name in needed if not getattr(self, name)]
        if missing:
            raise UserError(f"the cluster config needs {', '.join(missing)}")
        if not DIGEST.search(self.image):
            raise UserError(f"image {self.image!r} is not pinned by digest; pass REGISTRY/REPO@sha256:... "
                            f"(`docker inspect --format '{{{{index .RepoDigests 0}}}}' IMAGE` after the push)")
        if with_group and not self.security_group.startswith("sg-"):
            raise UserError(f"security group {self.security_group!r} is not an id (sg-...); "
                            f"`python -m ray_mtt.cluster provision` creates it and prints it")
        if self.ecr and self.ecr["region"] != self.region:
            raise UserError(f"the image is in ECR region {self.ecr['region']} but the cluster is in {self.region}; "
                            f"push it to the cluster's region or pass --region {self.ecr['region']}")
        return self

    def placeholders(self, account: str = "") -> dict[str, str]:
        ecr = self.ecr
        return {"RAY_MTT_BUCKET": self.bucket, "RAY_MTT_IMAGE": self.image, "RAY_MTT_AMI": self.ami,
                "RAY_MTT_SECURITY_GROUP": self.security_group, "RAY_MTT_REGION": self.region,
                "RAY_MTT_CLUSTER": self.cluster, "RAY_MTT_TRACKING_BACKEND": self.tracking_backend,
                "RAY_MTT_TRACKING_PARAMETER": self.tracking_parameter, "RAY_MTT_ACCOUNT": account,
                "RAY_MTT_ECR_REPOSITORY_ARN": ecr_repository_arn(ecr) if ecr else ""}


def fill(text: str, values: dict[str, str], source: str) -> str:
    missing = sorted({name for name in PLACEHOLDER.findall(text) if not values.get(name)})
    if missing:
        raise UserError(f"{source} needs {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def template(name: str) -> str:
    path = CLUSTER_DIR / name
    if not path.is_file():
        raise UserError(f"{path} not found: run this from a checkout of ray_mtt (cluster/ holds the templates)")
    return path.read_text()


def registry_login(values: ClusterValues) -> list[str]:
    """What each host runs before its first pull: an ECR login with the node's own profile; a public
    image needs none, another private registry its own `docker login` (README)."""
    ecr = values.ecr
    if not ecr:
        return []
    host = values.image.split("/", 1)[0]
    return [f"aws ecr get-login-password --region {ecr['region']} | docker login --username AWS --password-stdin {host}"]


def render(values: ClusterValues) -> dict:
    """The config `ray up` starts: cluster/aws.yaml with every value in place."""
    config = yaml.safe_load(fill(template("aws.yaml"), values.check().placeholders(), "cluster/aws.yaml"))
    config["initialization_commands"] = registry_login(values)
    return config


def policy(role: str, values: ClusterValues, account: str) -> dict:
    """cluster/iam/<role>-policy.json for this cluster; without an ECR image, no ECR statements."""
    placeholders = values.placeholders(account)
    placeholders["RAY_MTT_ECR_REPOSITORY_ARN"] = placeholders["RAY_MTT_ECR_REPOSITORY_ARN"] or "none"  # dropped below
    document = json.loads(fill(template(f"iam/{role}-policy.json"), placeholders, f"cluster/iam/{role}-policy.json"))
    if not values.ecr:
        document["Statement"] = [s for s in document["Statement"] if not s["Sid"].startswith("PullImage")]
    return document
