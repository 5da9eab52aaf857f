#!/usr/bin/env bash
# The Docker stage of .ci/run (also fine to run by hand, as root, in the repository's venv):
#   1. a Docker engine: a running one, else install Debian's docker.io/docker-compose/debootstrap and start dockerd
#      (docker/start-dockerd.sh); if none can be had, print why and exit 0 (stage skipped);
#   2. a base image: $MINEDRAFT_BASE_IMAGE if set, else minedraft-base:local built by debootstrap (cached);
#   3. python -m pytest -m docker (tests/test_docker.py): build, compose up, Generate, scale 2+2, down, and the same
#      on a one-node Swarm (docker stack deploy).
# Once the engine is up, any failure fails the stage. MINEDRAFT_DOCKER_STAGE=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${MINEDRAFT_DOCKER_STAGE:-1}" = 0 ]; then
  echo "docker stage skipped: MINEDRAFT_DOCKER_STAGE=0"
  exit 0
fi

t0=$(date +%s)
if ! engine=$(bash docker/start-dockerd.sh 2>&1); then
  echo "$engine"
  echo "docker stage skipped: no Docker engine could be started (see above)"
  exit 0
fi
echo "$engine"
if [ "$(tail -n 1 <<<"$engine")" = started ]; then
  trap 'bash docker/stop-dockerd.sh' EXIT
fi

if [ -z "${MINEDRAFT_BASE_IMAGE:-}" ]; then
  # Building the base image needs Debian's mirrors; an environment that cannot reach them skips the stage (loudly)
  # rather than failing CI for a reason that is not ours. Everything after this point fails the stage on error.
  if ! bash docker/make-base-image.sh; then
    echo "docker stage skipped: could not build the local base image (debootstrap); see above"
    exit 0
  fi
  export MINEDRAFT_BASE_IMAGE=minedraft-base:local
fi
t1=$(date +%s)

# The Swarm test (docker stack deploy on a one-node swarm advertised on loopback) runs too unless
# MINEDRAFT_DOCKER_SWARM=0; it skips itself when this engine is already part of a swarm.
MINEDRAFT_DOCKER_SWARM=${MINEDRAFT_DOCKER_SWARM:-1} python -m pytest -m docker -q -s -p no:cacheprovider tests/test_docker.py
echo "docker stage passed: engine + base image $(( t1 - t0 )) s, tests $(( $(date +%s) - t1 )) s"
