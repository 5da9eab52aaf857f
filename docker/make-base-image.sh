#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim when no image registry is reachable: Debian bookworm (debootstrap,
# minbase) with python3, venv and pip, and `python` as a command, imported as $MINEDRAFT_BASE_IMAGE
# (default minedraft-base:local). Cached: does nothing when that image exists (pass --force to rebuild).
#
#   docker/make-base-image.sh [--force]
#   docker/build.sh --build-arg BASE_IMAGE=minedraft-base:local     (docker/build.sh picks it up by itself)
#
# Needs root, debootstrap and a Debian mirror ($MINEDRAFT_DEBIAN_MIRROR, default http://deb.debian.org/debian).
# CA certificates in the host's /usr/local/share/ca-certificates (e.g. of a TLS-intercepting proxy in front of the
# package registries) are added to the image's trust store, so pip inside the build can reach PyPI.
set -euo pipefail

IMAGE=${MINEDRAFT_BASE_IMAGE:-minedraft-base:local}
MIRROR=${MINEDRAFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

if [ "${1:-}" != --force ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE exists (cached); --force rebuilds it"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "make-base-image.sh needs root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

start=$(date +%s)
rootfs=$(mktemp -d /var/tmp/minedraft-rootfs.XXXXXX)
cleanup() {
  for m in proc dev/pts dev; do umount "$rootfs/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

echo "debootstrap $SUITE into $rootfs (mirror $MIRROR)"
debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.debootstrap.log" 2>&1 || {
  tail -n 30 "$rootfs.debootstrap.log" >&2; rm -f "$rootfs.debootstrap.log"; exit 1; }
rm -f "$rootfs.debootstrap.log"

if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
fi
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" /bin/sh -ec '
  export DEBIAN_FRONTEND=noninteractive LC_ALL=C
  apt-get -o APT::Sandbox::User=root update -qq
  apt-get -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0 install -y -qq --no-install-recommends python3 python3-venv python3-pip python-is-python3 ca-certificates \
    >/dev/null
  update-ca-certificates >/dev/null
  apt-get clean
  rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/locale/* /var/cache/debconf/*-old \
    /var/log/*.log /tmp/*
  python --version
'
umount "$rootfs/proc"
: >"$rootfs/etc/resolv.conf"  # docker provides its own at run time

tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
echo "base image $IMAGE built in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
