#!/usr/bin/env bash
# Fill the required values of cluster/aws.yaml and print the result:
#   RAY_MTT_SSH_CIDR=... RAY_MTT_BUCKET=... RAY_MTT_IMAGE=... RAY_MTT_AMI=... cluster/render.sh > cluster/aws.local.yaml
# A missing value stops here with its name, instead of a cluster open to the world or a half-made one.
set -euo pipefail
: "${RAY_MTT_SSH_CIDR:?set RAY_MTT_SSH_CIDR to the address range allowed to SSH in, e.g. your IP/32}"
: "${RAY_MTT_BUCKET:?set RAY_MTT_BUCKET to the S3 bucket that holds trajectories, sweeps and MLflow artifacts}"
: "${RAY_MTT_IMAGE:?set RAY_MTT_IMAGE to the image built from cluster/Dockerfile and pushed to your registry}"
: "${RAY_MTT_AMI:?set RAY_MTT_AMI to a Deep Learning Base GPU AMI id of the region (README shows the lookup)}"
case "$RAY_MTT_SSH_CIDR" in
    0.0.0.0/0|::/0) echo "RAY_MTT_SSH_CIDR=$RAY_MTT_SSH_CIDR opens SSH to the whole internet; give your own range" >&2; exit 2 ;;
esac
envsubst '${RAY_MTT_SSH_CIDR} ${RAY_MTT_BUCKET} ${RAY_MTT_IMAGE} ${RAY_MTT_AMI}' < "$(dirname "$0")/aws.yaml"
