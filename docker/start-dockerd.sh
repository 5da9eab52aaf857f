#!/usr/bin/env bash
# Make a Docker engine available: use a running one, else (root only) install Debian's docker.io / docker-compose /
# debootstrap if missing and start dockerd in the background, logging to $MINEDRAFT_DOCKERD_LOG.
#
#   docker/start-dockerd.sh            # exit 0 once `docker info` answers; non-zero (and why) if it cannot be had
#
# Environment:
#   MINEDRAFT_DOCKER_INSTALL=0           never apt-get install (default 1: install what is missing, as root)
#   MINEDRAFT_DOCKER_STORAGE_DRIVER=...  overlay2 or vfs (default: overlay2 if an overlay mount works here, else vfs)
#   MINEDRAFT_DOCKERD_LOG=...            default /var/log/minedraft-dockerd.log
# Prints "started" on the last line when it started dockerd itself (docker/stop-dockerd.sh stops it again).
set -euo pipefail

LOG=${MINEDRAFT_DOCKERD_LOG:-/var/log/minedraft-dockerd.log}
PIDFILE=/var/run/minedraft-dockerd.pid

if docker info >/dev/null 2>&1; then
  echo "docker engine already running"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "no running docker engine, and not root: cannot start one" >&2
  exit 1
fi

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "${MINEDRAFT_DOCKER_INSTALL:-1}" = 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing ${need[*]} and not installing them (MINEDRAFT_DOCKER_INSTALL=0 or no apt-get)" >&2
    exit 1
  fi
  echo "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" iptables ca-certificates >/dev/null
fi
command -v dockerd >/dev/null 2>&1 || { echo "dockerd not found after install" >&2; exit 1; }

driver=${MINEDRAFT_DOCKER_STORAGE_DRIVER:-}
if [ -z "$driver" ]; then
  # overlay2 needs an overlay mount on the filesystem of /var/lib/docker (fails on overlay-in-overlay, some sandboxes)
  mkdir -p /var/lib/docker
  probe=$(mktemp -d /var/lib/docker/.overlay-probe.XXXXXX)
  mkdir -p "$probe"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
    umount "$probe/m"
    driver=overlay2
  else
    driver=vfs
  fi
  rm -rf "$probe"
fi

args=(--storage-driver="$driver")
if ! iptables -t nat -L -n >/dev/null 2>&1; then
  # No NAT here: containers still reach each other and published ports (docker-proxy), builds use --network host.
  args+=(--iptables=false --ip-masq=false)
fi

echo "starting dockerd ${args[*]} (log: $LOG)"
mkdir -p "$(dirname "$LOG")"
nohup dockerd "${args[@]}" >>"$LOG" 2>&1 &
echo $! >"$PIDFILE"
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    echo "dockerd up (pid $(cat "$PIDFILE"), storage driver $driver)"
    echo started
    exit 0
  fi
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "dockerd exited; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  sleep 1
done
echo "dockerd did not answer within 60 s; last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
