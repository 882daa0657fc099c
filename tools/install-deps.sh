#!/bin/sh
# Host tools the test suite uses: losetup/mount (util-linux), mkfs.ext4/e2fsck
# (e2fsprogs), mkfs.xfs (xfsprogs), fio; umoci and skopeo for the image tests
# (tools/install-image-tools.sh); containerd, runc, Debian's docker-registry and
# busybox-static for the containerd snapshotter tests (a private containerd and
# registry, images built from busybox).
# Idempotent and quiet: installs only what is missing (Debian/Ubuntu, as root).
set -eu

need=""
have() { command -v "$1" >/dev/null 2>&1; }
have losetup || need="$need util-linux"
have fstrim || need="$need util-linux"
have fsfreeze || need="$need util-linux"
have mkfs.ext4 || need="$need e2fsprogs"
have e2fsck || need="$need e2fsprogs"
have mkfs.xfs || need="$need xfsprogs"
have fio || need="$need fio"
have sha256sum || need="$need coreutils"
have containerd || need="$need containerd"
have ctr || need="$need containerd"
have runc || need="$need runc"
have docker-registry || need="$need docker-registry"
dpkg -s busybox-static >/dev/null 2>&1 || need="$need busybox-static"

here=$(dirname "$0")
if [ -z "$need" ]; then
    exec "$here/install-image-tools.sh"
fi
# shellcheck disable=SC2086 # word splitting wanted
need=$(printf '%s\n' $need | sort -u | tr '\n' ' ')
if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: missing $need; run as root to install" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
exec "$here/install-image-tools.sh"
