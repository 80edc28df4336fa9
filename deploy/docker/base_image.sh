#!/usr/bin/env bash
# A local stand-in for Docker Hub's python:3.11-slim, for hosts that cannot pull images.
#
#   sudo bash deploy/docker/base_image.sh            # builds orthserve-base:bookworm-py3.11, tags it python:3.11-slim
#
# Debian bookworm (minbase, debootstrap from deb.debian.org) with Debian's python3.11 + pip and the bookworm
# security and point-release updates, imported with `docker import`.  It is tagged `python:3.11-slim` as well, so
# that `bentoml containerize` uses the Dockerfile BentoML generates from bentofile.yaml unchanged (docker.distro
# debian + python_version 3.11 => `FROM python:3.11-slim`).  An existing python:3.11-slim that this script did
# not make (e.g. the real one, pulled) is left alone unless FORCE_TAG=1.
# Differences from the real python:3.11-slim: Python is Debian's 3.11 in /usr/bin (not a python.org build in
# /usr/local), pip is Debian's, without the EXTERNALLY-MANAGED marker (as in python:3.11-slim).
# Host CA certificates under /usr/local/share/ca-certificates (a TLS-intercepting egress proxy's, here) are
# added to the image's trust store so pip/uv work during the build; HOST_CAS=0 leaves them out.
# Needs root, debootstrap and a running dockerd.  About 2-4 minutes and 300 MB of downloads.
set -euo pipefail

TAG=${TAG:-orthserve-base:bookworm-py3.11}
ALIAS=${ALIAS:-python:3.11-slim}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
HOST_CAS=${HOST_CAS:-1}
LABEL=org.orthserve.base

[ "$(id -u)" = 0 ] || { echo "base_image.sh: needs root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "base_image.sh: apt-get install debootstrap" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "base_image.sh: no docker daemon (start dockerd)" >&2; exit 2; }

ROOT=$(mktemp -d /var/tmp/orthserve-base.XXXXXX)
cleanup() {
    for m in proc sys dev/pts dev; do umount "$ROOT/$m" 2>/dev/null || true; done
    rm -rf "$ROOT"
}
trap cleanup EXIT

nice debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOT" "$MIRROR"
cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
EOF
if [ "$HOST_CAS" = 1 ] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    echo "base_image.sh: added host CAs: $(ls /usr/local/share/ca-certificates/*.crt | xargs -n1 basename | tr '\n' ' ')"
fi
mount -t proc proc "$ROOT/proc"
chroot "$ROOT" /bin/sh -eu -c '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get upgrade -q -y
    apt-get install -q -y --no-install-recommends python3.11 python3-pip python-is-python3
    update-ca-certificates
    rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log /tmp/*
'
umount "$ROOT/proc"
PYV=$(chroot "$ROOT" python3 -c 'import platform; print(platform.python_version())')

tar --numeric-owner -C "$ROOT" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change "LABEL $LABEL=1 org.orthserve.python=$PYV" \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null

existing=$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$ALIAS" 2>/dev/null || true)
if docker image inspect "$ALIAS" >/dev/null 2>&1 && [ "$existing" != 1 ] && [ "${FORCE_TAG:-0}" != 1 ]; then
    echo "base_image.sh: $ALIAS exists and is not ours: not re-tagged (FORCE_TAG=1 to do it)" >&2
else
    docker tag "$TAG" "$ALIAS"
fi
docker run --rm --network host "$TAG" python3 -c 'import sys, ssl; print("python", sys.version.split()[0], "ok")'
echo "base_image.sh: $TAG ($ALIAS) python $PYV, $(docker image inspect -f '{{.Size}}' "$TAG") bytes"
