#!/usr/bin/env bash
# Install what the benchmark harnesses need (cowbench; perf for
# tools/concurrency-bench.sh), as Debian packages. Idempotent and quiet:
# packages already present are left alone; run as root.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have fio || need+=(fio)
have perf || need+=(linux-perf)
have mkfs.btrfs || need+=(btrfs-progs)
{ have qemu-img && have qemu-storage-daemon; } || need+=(qemu-utils)
have mkfs.ext4 || need+=(e2fsprogs)
have mkfs.xfs || need+=(xfsprogs)
have losetup || need+=(mount)
have du || need+=(coreutils)
have fusermount3 || have fusermount || need+=(fuse3)
# The containerd scenario (cowbench --containerd): a private containerd and
# registry, images built by tools/build-debian-image.sh and pushed with skopeo.
have containerd || need+=(containerd)
have runc || need+=(runc)
have docker-registry || need+=(docker-registry)
have skopeo || need+=(skopeo)
have umoci || need+=(umoci)
have debootstrap || need+=(debootstrap)
have curl || need+=(curl)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-setup: need root to install: ${need[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "bench-setup: installed ${need[*]}"
