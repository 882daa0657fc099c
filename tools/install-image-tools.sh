#!/bin/sh
# Install the tools the image tests build real OCI images with: umoci
# (init/new/unpack/repack) and skopeo (copy between layouts and archives),
# from Debian's packages. Idempotent: does nothing when both are there.
set -eu
need=""
command -v umoci >/dev/null 2>&1 || need="$need umoci"
command -v skopeo >/dev/null 2>&1 || need="$need skopeo"
command -v mkfs.ext4 >/dev/null 2>&1 || need="$need e2fsprogs"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-image-tools.sh: need root to install:$need" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
