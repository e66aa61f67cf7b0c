"""The AWS cluster: provision what cluster/aws.yaml names, render it, check the account before
`ray up`, and (on the head) run the MLflow server.

    python -m ray_mtt.cluster provision --ssh-cidr IP/32 --bucket B --image REPO@sha256:... --ami ami-...
    python -m ray_mtt.cluster preflight --ssh-cidr IP/32
    ray up cluster/aws.local.yaml

`render` writes the config from values alone (offline); `provision` creates or updates the bucket,
the nodes' security group, the instance profiles and the MLflow database, then renders.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..cloud.render import ClusterValues, render
from ..core.errors import UserError
from .common import add_options, new_parser, options_from_args

LOCAL_CONFIG = "cluster/aws.local.yaml"


def session():
    try:
        import boto3
    except ImportError:
        raise UserError("this needs boto3: pip install -e '.[aws]'") from None
    return boto3.Session()


def write_config(config: dict, out: str) -> None:
    text = yaml.safe_dump(config, sort_keys=False, width=120)
    if out == "-":
        sys.stdout.write(text)
        return
    Path(out).write_text(text)
    print(f"wrote {out}; start it with `ray up {out}`")


def provision_command(args) -> None:
    from ..cloud.provision import provision
    values = provision(session(), options_from_args(ClusterValues, args), args.ssh_cidr, args.vpc)
    print(f"security group {values.security_group}: SSH from {args.ssh_cidr}, all traffic within the cluster")
    write_config(render(values), args.out)


def preflight_command(args) -> None:
    from ..cloud.preflight import preflight
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"{path} not found; write it with `python -m ray_mtt.cluster provision` (or render)")
    problems = preflight(session(), yaml.safe_load(path.read_text()), Path(args.token).expanduser(), args.ssh_cidr)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        raise UserError(f"preflight found {len(problems)} problem(s) above; fix them before `ray up {path}`")
    print(f"preflight: {path} is ready for `ray up`")


def tracking_server_command(args) -> None:
    from ..cloud.tracking_server import serve
    serve(args.backend, args.artifacts, args.host, args.port, args.region)


def parser() -> argparse.ArgumentParser:
    top = new_parser("python -m ray_mtt.cluster", __doc__)
    commands = top.add_subparsers(dest="command", required=True)
    render_cmd = commands.add_parser("render", help="write the cluster config from values (no AWS call)")
    add_options(render_cmd, ClusterValues, "cluster")
    render_cmd.add_argument("--out", default="-", help="file to write (default: standard output)")
    render_cmd.set_defaults(run=lambda a: write_config(render(options_from_args(ClusterValues, a)), a.out))
    prov = commands.add_parser("provision", help="create or update the account resources, then render")
    add_options(prov, ClusterValues, "cluster")
    prov.add_argument("--ssh-cidr", required=True, help="the one address range allowed to SSH in, e.g. your IP/32")
    prov.add_argument("--vpc", default="", help="VPC of the cluster (default: the region's default VPC)")
    prov.add_argument("--out", default=LOCAL_CONFIG, help=f"file to write (default: {LOCAL_CONFIG})")
    prov.set_defaults(run=provision_command)
    check = commands.add_parser("preflight", help="check the account against the rendered config")
    check.add_argument("--config", default=LOCAL_CONFIG, help=f"the rendered config (default: {LOCAL_CONFIG})")
    check.add_argument("--token", default="~/.ray/auth_token", help="Ray's token file that the nodes get")
    check.add_argument("--ssh-cidr", help="the range SSH must be limited to (default: any one range, never all)")
    check.set_defaults(run=preflight_command)
    serve_cmd = commands.add_parser("tracking-server", help="on the head: MLflow with its backend resolved")
    serve_cmd.add_argument("--backend", required=True,
                           help="ssm:/PARAMETER (its value), postgresql://... or sqlite:///...")
    serve_cmd.add_argument("--artifacts", required=True, help="where artifacts go, e.g. s3://BUCKET/mlflow/artifacts")
    serve_cmd.add_argument("--host", default="0.0.0.0")
    serve_cmd.add_argument("--port", type=int, default=5000)
    serve_cmd.add_argument("--region", default=None, help="the SSM parameter's region (default: the node's)")
    serve_cmd.set_defaults(run=tracking_server_command)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)
