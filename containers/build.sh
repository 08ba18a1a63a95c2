#!/usr/bin/env bash
# Build (and optionally push) the GPU image; then turn it into an enroot squashfs for pyxis.
#   containers/build.sh                         -> nemo-reasoning-recipes:<git sha>
#   IMAGE=nvcr.io/myorg/nrr TAG=25.10 PUSH=1 containers/build.sh
# Registry credentials come from `docker login` (never from this script or its arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-nemo-reasoning-recipes}"
TAG="${TAG:-$(git rev-parse --short HEAD 2>/dev/null || echo dev)}"
docker build -f containers/Dockerfile -t "${IMAGE}:${TAG}" .
if [[ "${PUSH:-0}" == "1" ]]; then
  docker push "${IMAGE}:${TAG}"
fi
if [[ "${SQSH:-0}" == "1" ]]; then
  # For pyxis: executor.container_image=/lustre/images/nrr.sqsh
  enroot import -o "nrr-${TAG}.sqsh" "dockerd://${IMAGE}:${TAG}"
fi
echo "${IMAGE}:${TAG}"
