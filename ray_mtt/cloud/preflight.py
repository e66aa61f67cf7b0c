"""What would otherwise fail at (or after) `ray up`, checked against the account in seconds: one
line per problem, with its fix. Reads the rendered config, so it checks what Ray will launch."""
from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from .render import DIGEST, ECR, ecr_repository_arn

G_SPOT_VCPU_QUOTA = "L-3819A6DF"  # EC2 "All G and VT Spot Instance Requests", in vCPUs; 0 on many new accounts
OPEN = ("0.0.0.0/0", "::/0")


def node_types(config: dict) -> dict:
    return config["available_node_types"]


def storage_bucket(config: dict) -> str:
    options = " ".join(config["docker"].get("run_options", []))
    match = re.search(r"RAY_MTT_STORAGE=s3://([^/\s]+)", options)
    return match.group(1) if match else ""


def check_credentials(session, config: dict) -> list[str]:
    try:
        session.client("sts", region_name=config["provider"]["region"]).get_caller_identity()
    except Exception as e:  # noqa: BLE001 - botocore raises several kinds here; each means "no usable credentials"
        return [f"no usable AWS credentials ({type(e).__name__}); run `aws configure` or set AWS_PROFILE"]
    regions = [r["RegionName"] for r in session.client("ec2", region_name="us-east-1").describe_regions()["Regions"]]
    if config["provider"]["region"] not in regions:
        return [f"region {config['provider']['region']} is not an EC2 region of this account; pass --region"]
    return []


def check_bucket(s3, bucket: str) -> list[str]:
    if not bucket:
        return ["the config sets no RAY_MTT_STORAGE=s3://BUCKET/...; render it again with --bucket"]
    try:
        s3.head_bucket(Bucket=bucket)
    except s3.exceptions.ClientError:
        return [f"bucket {bucket} does not exist or is not yours; `python -m ray_mtt.cluster provision` creates it"]
    try:
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    except s3.exceptions.ClientError:
        block = {}
    if not all(block.get(k) for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy",
                                      "RestrictPublicBuckets")):
        return [f"bucket {bucket} does not block public access; `aws s3api put-public-access-block --bucket {bucket} "
                f"--public-access-block-configuration BlockPublicAcls=true,IgnorePublicAcls=true,"
                f"BlockPublicPolicy=true,RestrictPublicBuckets=true` (provision does this)"]
    return []


def check_amis(ec2, config: dict) -> list[str]:
    problems = []
    for ami in sorted({t["node_config"]["ImageId"] for t in node_types(config).values()}):
        try:
            found = ec2.describe_images(ImageIds=[ami])["Images"]
        except ec2.exceptions.ClientError:
            found = []
        if not found:
            problems.append(f"AMI {ami} does not exist in {config['provider']['region']}; look up the region's "
                            f"Deep Learning Base GPU AMI (README step 1) and render again")
    return problems


def check_image(session, config: dict) -> list[str]:
    """Pinned by digest, present in ECR, and pullable by both node profiles (their policies name it)."""
    image = config["docker"]["image"]
    if not DIGEST.search(image):
        return [f"image {image} is a tag, not a digest; render with REGISTRY/REPO@sha256:..."]
    ecr = ECR.match(image)
    if not ecr:
        return []  # another registry: its login is the operator's (README)
    client = session.client("ecr", region_name=ecr["region"])
    try:
        client.describe_images(repositoryName=ecr["repository"], imageIds=[{"imageDigest": image.split("@", 1)[1]}])
    except client.exceptions.ClientError:
        return [f"image {image} is not in ECR; push it (README step 1) and render with the digest the push printed"]
    arn = ecr_repository_arn(ecr.groupdict())
    iam = session.client("iam")
    problems = []
    for profile in sorted({t["node_config"]["IamInstanceProfile"]["Name"] for t in node_types(config).values()}):
        if not allows(iam, profile, "ecr:BatchGetImage", arn):
            problems.append(f"instance profile {profile} may not pull {arn}; run provision again (it writes the "
                            f"ECR read actions into cluster/iam policies)")
    return problems


def allows(iam, role: str, action: str, resource: str) -> bool:
    """Whether one of the role's inline policies allows `action` on `resource` (exact or '*')."""
    try:
        names = iam.list_role_policies(RoleName=role)["PolicyNames"]
    except iam.exceptions.NoSuchEntityException:
        return False
    for name in names:
        document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        document = json.loads(document) if isinstance(document, str) else document
        for statement in document["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            if statement["Effect"] == "Allow" and action in actions and (resource in resources or "*" in resources):
                return True
    return False


def check_profiles(iam, config: dict) -> list[str]:
    problems = []
    for profile in sorted({t["node_config"]["IamInstanceProfile"]["Name"] for t in node_types(config).values()}):
        try:
            iam.get_instance_profile(InstanceProfileName=profile)
        except iam.exceptions.NoSuchEntityException:
            problems.append(f"instance profile {profile} does not exist; `python -m ray_mtt.cluster provision` "
                            f"creates it")
    return problems


def check_spot_quota(session, config: dict) -> list[str]:
    """A worker type of G instances needs max_workers x vCPUs of spot quota, or the autoscaler waits
    forever with the reason only in monitor.log."""
    region = config["provider"]["region"]
    ec2 = session.client("ec2", region_name=region)
    needed = 0
    for t in node_types(config).values():
        node = t["node_config"]
        if node.get("InstanceMarketOptions", {}).get("MarketType") == "spot" and node["InstanceType"].startswith("g"):
            info = ec2.describe_instance_types(InstanceTypes=[node["InstanceType"]])["InstanceTypes"][0]
            needed += t.get("max_workers", 0) * info["VCpuInfo"]["DefaultVCpus"]
    if not needed:
        return []
    quotas = session.client("service-quotas", region_name=region)
    try:
        have = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=G_SPOT_VCPU_QUOTA)["Quota"]["Value"]
    except quotas.exceptions.ClientError as e:
        return [f"could not read the spot G-instance quota {G_SPOT_VCPU_QUOTA} in {region} "
                f"({e.response['Error']['Code']}); check it in the Service Quotas console: the workers need {needed} vCPUs"]
    if have < needed:
        return [f"the spot G-instance quota in {region} is {have:.0f} vCPUs but the workers need {needed}; ask for "
                f"more: aws service-quotas request-service-quota-increase --region {region} --service-code ec2 "
                f"--quota-code {G_SPOT_VCPU_QUOTA} --desired-value {needed}"]
    return []


def check_token(path: Path) -> list[str]:
    if not path.is_file():
        return [f"no Ray token at {path}; run `ray get-auth-token --generate && chmod 600 {path}`"]
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        return [f"the Ray token {path} is readable by others (mode {stat.S_IMODE(path.stat().st_mode):o}); "
                f"run `chmod 600 {path}`"]
    return []


def check_security_groups(ec2, config: dict, ssh_cidr: str | None) -> list[str]:
    """Every node type names groups; each admits SSH from the given range only, anything else only
    from the group itself, and nothing from the whole internet."""
    groups = {g for t in node_types(config).values() for g in t["node_config"].get("SecurityGroupIds", [])}
    problems = [f"node type {name} names no SecurityGroupIds, so Ray makes a group open to SSH from 0.0.0.0/0; "
                f"render with --security-group" for name, t in node_types(config).items()
                if not t["node_config"].get("SecurityGroupIds")]
    for group in sorted(groups):
        try:
            rules = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
        except ec2.exceptions.ClientError:
            problems.append(f"security group {group} does not exist; `python -m ray_mtt.cluster provision` makes it")
            continue
        for rule in rules:
            cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
            ssh = rule.get("FromPort") == 22 and rule.get("ToPort") == 22
            bad = [c for c in cidrs if c in OPEN or not ssh or (ssh_cidr and c != ssh_cidr)]
            others = [p["GroupId"] for p in rule.get("UserIdGroupPairs", []) if p["GroupId"] != group]
            if bad or others:
                problems.append(f"security group {group} admits {', '.join(bad + others)} on ports "
                                f"{rule.get('FromPort', 'all')}-{rule.get('ToPort', 'all')}; run provision again "
                                f"(it resets the rules to SSH from --ssh-cidr and the cluster's own traffic)")
    return problems


def check_tracking(ssm, config: dict) -> list[str]:
    command = " ".join(config["head_start_ray_commands"])
    match = re.search(r"--backend ssm:(\S+)", command)
    if not match:
        return []
    try:
        ssm.get_parameter(Name=match.group(1))
    except ssm.exceptions.ParameterNotFound:
        return [f"SSM parameter {match.group(1)} (the MLflow database URI) does not exist; provision creates the "
                f"database and the parameter"]
    return []


def preflight(session, config: dict, token: Path, ssh_cidr: str | None = None) -> list[str]:
    """Every problem found, one line each (empty: ready for `ray up`)."""
    problems = check_credentials(session, config) + check_token(token)
    if problems and "credentials" in problems[0]:
        return problems
    region = config["provider"]["region"]
    ec2 = session.client("ec2", region_name=region)
    return (problems + check_bucket(session.client("s3", region_name=region), storage_bucket(config))
            + check_amis(ec2, config) + check_profiles(session.client("iam"), config) + check_image(session, config)
            + check_spot_quota(session, config) + check_security_groups(ec2, config, ssh_cidr)
            + check_tracking(session.client("ssm", region_name=region), config))
