"""cluster/ and ray_mtt/cloud: the AWS launch, tested against what Ray itself does. `provision`
creates the account resources and renders cluster/aws.yaml; Ray's own AWS bootstrap
(`bootstrap_aws`, what `ray up` runs before it launches anything) then runs on that config under
moto, and `preflight` checks the account. Nothing here sends traffic to an address moto hands out:
Ray's config and bootstrap steps only, never its SSH updater."""
import copy
import json
import os
import re
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
moto = pytest.importorskip("moto")
import boto3  # noqa: E402
from ray.autoscaler._private.aws.config import bootstrap_aws  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from ray_mtt.cloud import preflight as checks  # noqa: E402
from ray_mtt.cloud.provision import provision  # noqa: E402
from ray_mtt.cloud.render import ClusterValues, policy, render  # noqa: E402
from ray_mtt.cloud.tracking_server import resolve_backend  # noqa: E402
from ray_mtt.core.errors import UserError  # noqa: E402
from tests.cluster_bed import RAY, free_port  # noqa: E402
from tests.helpers import REPO  # noqa: E402

CLUSTER = REPO / "cluster"
REGION, CIDR = "us-west-2", "203.0.113.7/32"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                       "config": {}, "layers": []})


class Account:
    """A fresh AWS account in moto (in process): an ECR image pushed, a region AMI, a spot quota."""

    def __init__(self, spot_vcpus: float):
        self.session = boto3.Session(region_name=REGION)
        ecr = self.session.client("ecr")
        uri = ecr.create_repository(repositoryName="ray-mtt")["repository"]["repositoryUri"]
        digest = ecr.put_image(repositoryName="ray-mtt", imageManifest=MANIFEST, imageTag="0.1.0")["image"]["imageId"]
        self.image = f"{uri}@{digest['imageDigest']}"
        self.ami = self.session.client("ec2").describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        self.spot_vcpus = spot_vcpus

    def values(self, **changes) -> ClusterValues:
        return ClusterValues(bucket="my-mtt-bucket", image=self.image, ami=self.ami, region=REGION, **changes)

    def ingress(self) -> dict[str, list[dict]]:
        groups = self.session.client("ec2").describe_security_groups()["SecurityGroups"]
        return {g["GroupId"]: g["IpPermissions"] for g in groups}


@pytest.fixture
def account(monkeypatch, tmp_path):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION, "HOME": str(tmp_path)}.items():  # Ray writes its SSH key under ~
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    from moto.servicequotas.models import ServiceQuotasBackend
    with moto.mock_aws():
        account = Account(spot_vcpus=64)
        # moto serves no EC2 quotas: the account's "All G and VT Spot Instance Requests" value.
        monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", lambda self, service_code, quota_code: {
            "QuotaCode": quota_code, "ServiceCode": service_code, "Value": account.spot_vcpus})
        yield account


def open_rules(ingress: dict[str, list[dict]]) -> list[tuple[str, int]]:
    return [(group, rule.get("FromPort")) for group, rules in ingress.items() for rule in rules
            for r in rule.get("IpRanges", []) if r["CidrIp"] == "0.0.0.0/0"]


def test_rays_own_bootstrap_of_the_provisioned_config_opens_nothing_to_the_internet(account):
    values = provision(account.session, account.values(), CIDR)
    config = render(values)
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's schema
    launched = bootstrap_aws(prepare_config(copy.deepcopy(config)))  # what `ray up` does before launching
    for name, node_type in launched["available_node_types"].items():
        assert node_type["node_config"]["SecurityGroupIds"] == [values.security_group], name
        assert node_type["node_config"]["IamInstanceProfile"]["Name"] == f"ray-mtt-{name.split('_')[-1]}"
    assert open_rules(account.ingress()) == []
    rules = account.ingress()[values.security_group]
    assert sorted(checks_rule(r) for r in rules) == sorted([("tcp", 22, CIDR), ("-1", None, values.security_group)])
    # The same bootstrap on a node type without the group: Ray makes one, with SSH from 0.0.0.0/0.
    del config["available_node_types"]["gpu_worker"]["node_config"]["SecurityGroupIds"]
    bootstrap_aws(prepare_config(config))
    assert [port for _, port in open_rules(account.ingress())] == [22]


def checks_rule(rule: dict) -> tuple:
    source = [r["CidrIp"] for r in rule["IpRanges"]] + [p["GroupId"] for p in rule["UserIdGroupPairs"]]
    return rule["IpProtocol"], rule.get("FromPort"), *source


def test_provision_again_leaves_exactly_the_rules_asked_for(account):
    first = provision(account.session, account.values(), CIDR)
    ec2 = account.session.client("ec2")
    ec2.authorize_security_group_ingress(GroupId=first.security_group, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    again = provision(account.session, account.values(), "198.51.100.9/32")  # a new laptop address
    assert again.security_group == first.security_group
    assert sorted(checks_rule(r) for r in account.ingress()[first.security_group]) == sorted(
        [("tcp", 22, "198.51.100.9/32"), ("-1", None, first.security_group)])
    with pytest.raises(UserError, match="never the whole internet"):
        provision(account.session, account.values(), "0.0.0.0/0")


def test_the_tracking_database_is_private_and_its_uri_only_in_ssm(account):
    values = provision(account.session, account.values(), CIDR)
    db = account.session.client("rds").describe_db_instances(DBInstanceIdentifier="ray-mtt-mlflow")["DBInstances"][0]
    assert db["Engine"] == "postgres" and not db["PubliclyAccessible"] and db["StorageEncrypted"]
    db_group = db["VpcSecurityGroups"][0]["VpcSecurityGroupId"]
    assert [checks_rule(r) for r in account.ingress()[db_group]] == [("tcp", 5432, values.security_group)]
    uri = resolve_backend(values.tracking_backend, REGION)  # what the head's tracking-server command reads
    assert re.fullmatch(rf"postgresql://mlflow:[0-9a-f]{{48}}@{db['Endpoint']['Address']}:5432/mlflow", uri)
    assert "ssm:/ray-mtt/mlflow-db" in " ".join(render(values)["head_start_ray_commands"])
    assert uri.split("@")[0] not in json.dumps(render(values))  # the password is nowhere in the config


def test_preflight_passes_a_provisioned_account_and_names_each_problem(account, tmp_path):
    values = provision(account.session, account.values(), CIDR)
    config = render(values)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o600)
    assert checks.preflight(account.session, config, token, CIDR) == []
    token.chmod(0o644)  # what `ray get-auth-token --generate` leaves
    account.spot_vcpus = 0  # a new account's spot G quota
    account.session.client("s3").delete_public_access_block(Bucket="my-mtt-bucket")
    account.session.client("ec2").authorize_security_group_ingress(GroupId=values.security_group, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    tagged = {**config, "docker": {**config["docker"], "image": account.image.split("@")[0] + ":0.1.0"}}
    problems = checks.preflight(account.session, tagged, token, CIDR)
    expected = ["chmod 600", "does not block public access", "is a tag, not a digest",
                "quota in us-west-2 is 0 vCPUs but the workers need 64", "admits 0.0.0.0/0 on ports 5000-5000"]
    assert len(problems) == len(expected) and all(any(e in p for p in problems) for e in expected), problems
    account.session.client("iam").delete_role_policy(RoleName="ray-mtt-worker", PolicyName="ray-mtt-worker")
    assert any("ray-mtt-worker may not pull" in p for p in checks.preflight(account.session, config, token))


def test_rendering_pins_the_image_logs_in_to_its_registry_and_needs_every_value():
    ecr = "123456789012.dkr.ecr.us-west-2.amazonaws.com/ray-mtt@sha256:" + "0" * 64
    values = ClusterValues(bucket="b-mtt", image=ecr, ami="ami-0abc", security_group="sg-0abc")
    config = render(values)
    assert "${" not in json.dumps(config)
    assert config["initialization_commands"] == [
        "aws ecr get-login-password --region us-west-2 | docker login --username AWS --password-stdin "
        "123456789012.dkr.ecr.us-west-2.amazonaws.com"]
    assert "--env RAY_MTT_STORAGE=s3://b-mtt/ray_mtt" in config["docker"]["run_options"]
    public = ClusterValues(bucket="b-mtt", image="docker.io/me/ray-mtt@sha256:" + "1" * 64, ami="ami-0abc",
                           security_group="sg-0abc")
    assert render(public)["initialization_commands"] == []
    assert not [s for s in policy("worker", public, "123456789012")["Statement"] if "ecr" in json.dumps(s)]
    for broken, message in [({"image": ecr.split("@")[0] + ":0.1.0"}, "not pinned by digest"),
                            ({"security_group": ""}, "needs --security-group"),
                            ({"region": "eu-west-1"}, "is in ECR region us-west-2")]:
        with pytest.raises(UserError, match=message):
            render(ClusterValues(**{**values.__dict__, **broken}))
    sqlite = render(ClusterValues(**{**values.__dict__, "tracking": "sqlite"}))
    assert "--backend sqlite:////home/ray/mlflow/mlflow.db" in " ".join(sqlite["head_start_ray_commands"])


def test_the_heads_ec2_actions_reach_only_this_clusters_instances():
    values = ClusterValues(bucket="b-mtt", image="1" * 12 + ".dkr.ecr.us-west-2.amazonaws.com/r@sha256:" + "0" * 64,
                           ami="ami-0abc", security_group="sg-0abc")
    for role in ("head", "worker"):
        document = policy(role, values, "123456789012")
        assert "${" not in json.dumps(document)
        pulls = [s for s in document["Statement"] if "ecr:BatchGetImage" in s["Action"]]
        assert [s["Resource"] for s in pulls] == ["arn:aws:ecr:us-west-2:111111111111:repository/r"]
        for statement in document["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert not any(a.endswith(":*") for a in actions)
            if any(a.startswith("s3:") for a in actions):
                assert statement["Resource"] in ("arn:aws:s3:::b-mtt", "arn:aws:s3:::b-mtt/*")
            changes = [a for a in actions if a.startswith("ec2:") and not a.startswith("ec2:Describe")]
            if changes and str(statement["Resource"]).endswith("instance/*"):
                condition = json.dumps(statement["Condition"])
                assert 'Tag/ray-cluster-name": "ray-mtt"' in condition, statement["Sid"]
            elif changes:  # what a launch uses or creates, never an existing instance
                assert "instance/*" not in json.dumps(statement["Resource"]), statement["Sid"]


def test_the_image_sets_token_auth_for_every_client_and_installs_the_cluster_extra():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert "ENV RAY_AUTH_MODE=token" in dockerfile and "'.[ffcv,aws]'" in dockerfile
    assert "COPY --chown=ray:users configs ./configs" in dockerfile  # the package's configs/ (package-dir)


@pytest.fixture
def aws():
    ecr = "123456789012.dkr.ecr.us-west-2.amazonaws.com/ray-mtt@sha256:" + "0" * 64
    return render(ClusterValues(bucket="my-mtt-bucket", image=ecr, ami="ami-0abc", security_group="sg-0abc"))


def test_a_typo_in_the_config_fails_rays_schema(aws):
    aws["available_node_types"]["gpu_worker"]["min_wrkers"] = 1
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(aws))


def test_the_head_sets_the_default_tracking_and_every_node_the_token_mode(aws):
    head = aws["head_start_ray_commands"]
    assert "RAY_MTT_TRACKING_URI=http://" in head[1] and ". ~/.ray_mtt_env && RAY_AUTH_MODE=token ray start" in head[2]
    assert "--dashboard-host=127.0.0.1" in head[2]
    assert aws["setup_commands"] == ["chmod 600 ~/.ray/auth_token"]
    types = aws["available_node_types"]
    assert types["gpu_worker"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_worker"]["resources"]["GPU"] == 1  # the driver sees GPU node types before one is up


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
    prefix = dict(kv.split("=", 1) for kv in head.split("ray start")[0].split("&&")[-1].split())
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


@pytest.mark.slow
def test_the_commands_a_user_types_against_an_aws_endpoint(tmp_path):
    """provision, then preflight, as processes against moto's server on loopback (boto3 follows
    AWS_ENDPOINT_URL); that server serves no EC2 quotas, which preflight reports as its one problem."""
    from tests.cluster_bed import S3Endpoint
    endpoint = S3Endpoint()
    try:
        env = {**os.environ, **endpoint.env, "AWS_DEFAULT_REGION": REGION, "HOME": str(tmp_path)}
        session = boto3.Session(region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
        ecr = session.client("ecr", endpoint_url=endpoint.url)
        uri = ecr.create_repository(repositoryName="ray-mtt")["repository"]["repositoryUri"]
        digest = ecr.put_image(repositoryName="ray-mtt", imageManifest=MANIFEST)["image"]["imageId"]["imageDigest"]
        ami = session.client("ec2", endpoint_url=endpoint.url).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        out = tmp_path / "aws.local.yaml"
        cli = [sys.executable, "-m", "ray_mtt.cluster"]
        made = subprocess.run([*cli, "provision", "--ssh-cidr", CIDR, "--bucket", "my-mtt-bucket", "--image",
                               f"{uri}@{digest}", "--ami", ami, "--region", REGION, "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0 and out.is_file(), made.stderr[-2000:]
        assert "security group sg-" in made.stdout
        token = tmp_path / ".ray" / "auth_token"
        token.parent.mkdir()
        token.write_text("a" * 64)
        token.chmod(0o600)
        checked = subprocess.run([*cli, "preflight", "--config", str(out), "--ssh-cidr", CIDR], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
        problems = [line for line in checked.stdout.splitlines() if line.startswith("problem: ")]
        assert checked.returncode == 2 and len(problems) == 1, checked.stdout + checked.stderr[-2000:]
        assert "could not read the spot G-instance quota" in problems[0]
    finally:
        endpoint.stop()
