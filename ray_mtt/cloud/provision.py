"""The account resources cluster/aws.yaml names, created or brought up to date (boto3): the
bucket, the security group, the two instance profiles and, for PostgreSQL tracking, the RDS
database with its URI in SSM. Running it again changes only what differs."""
from __future__ import annotations

import dataclasses
import json
import secrets

from ..core.errors import UserError
from .render import ClusterValues, policy

EC2_TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
DB_CLASS, DB_GB = "db.t4g.micro", 20  # MLflow's records of thousands of runs fit with room to spare


def ensure_bucket(s3, bucket: str, region: str) -> None:
    """The bucket, private (every public access blocked) and encrypted at rest."""
    try:
        s3.head_bucket(Bucket=bucket)
    except s3.exceptions.ClientError:
        where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **where)
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})


def default_vpc(ec2) -> str:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise UserError("this region has no default VPC; pass --vpc vpc-... (one whose subnets give public IPs)")
    return vpcs[0]["VpcId"]


def group_id(ec2, name: str, vpc: str, description: str) -> str:
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]},
                                                  {"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
    if found:
        return found[0]["GroupId"]
    return ec2.create_security_group(GroupName=name, Description=description, VpcId=vpc)["GroupId"]


def set_ingress(ec2, group: str, wanted: list[dict]) -> None:
    """Make the group's inbound rules exactly `wanted`: rules added by hand or a former CIDR go."""
    current = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
    stale = [r for r in current if normal(r) not in [normal(w) for w in wanted]]
    if stale:
        ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=stale)
    new = [w for w in wanted if normal(w) not in [normal(r) for r in current]]
    if new:
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=new)


def normal(rule: dict) -> tuple:
    """A rule as a comparable value (AWS adds empty lists and fields it was not given)."""
    return (rule["IpProtocol"], rule.get("FromPort"), rule.get("ToPort"),
            tuple(sorted(r["CidrIp"] for r in rule.get("IpRanges", []))),
            tuple(sorted(p["GroupId"] for p in rule.get("UserIdGroupPairs", []))))


def ensure_node_group(ec2, vpc: str, cluster: str, ssh_cidr: str) -> str:
    """The nodes' group: SSH from `ssh_cidr` only, and all traffic between the group's members
    (Ray's ports, the object store, MLflow). Named in every node type, so Ray adds nothing."""
    if ssh_cidr in ("0.0.0.0/0", "::/0") or "/" not in ssh_cidr:
        raise UserError(f"--ssh-cidr {ssh_cidr!r} must be your own range, e.g. 203.0.113.7/32; "
                        f"never the whole internet")
    group = group_id(ec2, f"{cluster}-nodes", vpc, f"{cluster}: SSH from one range, all traffic within the cluster")
    set_ingress(ec2, group, [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": ssh_cidr}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
    return group


def ensure_profile(iam, name: str, document: dict) -> None:
    """Role + inline policy (rewritten every time, so a change lands) + instance profile."""
    try:
        iam.get_role(RoleName=name)
    except iam.exceptions.NoSuchEntityException:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST))
    iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=json.dumps(document))
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if name not in [r["RoleName"] for r in profile["Roles"]]:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)


def ensure_database(session, values: ClusterValues, vpc: str, node_group: str) -> str:
    """RDS PostgreSQL reachable from the nodes' group only, its URI as an SSM SecureString that the
    head's profile may read. Returns the database's address."""
    ec2, rds, ssm = (session.client(name, region_name=values.region) for name in ("ec2", "rds", "ssm"))
    db_group = group_id(ec2, f"{values.cluster}-mlflow-db", vpc, f"{values.cluster}: PostgreSQL from the nodes only")
    set_ingress(ec2, db_group, [{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432,
                                 "UserIdGroupPairs": [{"GroupId": node_group}]}])
    name = f"{values.cluster}-mlflow"
    try:
        rds.describe_db_instances(DBInstanceIdentifier=name)
        created, password = False, None
    except rds.exceptions.DBInstanceNotFoundFault:
        password = secrets.token_hex(24)
        rds.create_db_instance(
            DBInstanceIdentifier=name, Engine="postgres", DBInstanceClass=DB_CLASS, AllocatedStorage=DB_GB,
            DBName="mlflow", MasterUsername="mlflow", MasterUserPassword=password, VpcSecurityGroupIds=[db_group],
            PubliclyAccessible=False, StorageEncrypted=True, BackupRetentionPeriod=7, DeletionProtection=True)
        created = True
    print(f"waiting for database {name} (5-10 min when new)", flush=True)
    rds.get_waiter("db_instance_available").wait(DBInstanceIdentifier=name)
    address = rds.describe_db_instances(DBInstanceIdentifier=name)["DBInstances"][0]["Endpoint"]["Address"]
    if created:
        ssm.put_parameter(Name=values.tracking_parameter, Type="SecureString", Overwrite=True,
                          Value=f"postgresql://mlflow:{password}@{address}:5432/mlflow")
    else:
        try:
            ssm.get_parameter(Name=values.tracking_parameter)
        except ssm.exceptions.ParameterNotFound:
            raise UserError(f"database {name} exists but SSM parameter {values.tracking_parameter} does not; put its "
                            f"URI there: aws ssm put-parameter --type SecureString --name {values.tracking_parameter} "
                            f"--value postgresql://mlflow:PASSWORD@{address}:5432/mlflow") from None
    return address


def provision(session, values: ClusterValues, ssh_cidr: str, vpc: str = "") -> ClusterValues:
    """Everything the cluster config names; returns the values with the security group filled in."""
    values.check(with_group=False)  # a bad value stops here, before anything is created
    account = session.client("sts", region_name=values.region).get_caller_identity()["Account"]
    ensure_bucket(session.client("s3", region_name=values.region), values.bucket, values.region)
    ec2 = session.client("ec2", region_name=values.region)
    vpc = vpc or default_vpc(ec2)
    values = dataclasses.replace(values, security_group=ensure_node_group(ec2, vpc, values.cluster, ssh_cidr))
    iam = session.client("iam")
    for role in ("head", "worker"):
        ensure_profile(iam, f"ray-mtt-{role}", policy(role, values, account))
    if values.tracking == "postgres":
        ensure_database(session, values, vpc, values.security_group)
    return values
