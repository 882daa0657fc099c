#!/bin/sh
# Set up containerd with thinpool's snapshotter on a Debian host, as root:
#  1. installs containerd and runc (Debian's packages) if missing;
#  2. installs the thinpool binary (from target/release) to /usr/local/bin;
#  3. adds the proxy plugin to /etc/containerd/config.toml (version 2):
#       [proxy_plugins.thinpool]
#         type = "snapshot"
#         address = "/run/thinpool/snapshotter.sock"
#  4. installs and starts tools/systemd/thinpool-snapshotter.service (pool
#     /var/lib/thinpool/pool.tp, 100G sparse, made on first start), then
#     restarts containerd.
# Afterwards: ctr image pull --snapshotter thinpool REF.
# Idempotent: a second run changes nothing that is already in place.
# Options: --config-only FILE  only add the proxy plugin to FILE (step 3).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
socket=${SOCKET:-/run/thinpool/snapshotter.sock}

add_proxy() { # FILE
    if grep -q '^\[proxy_plugins\.thinpool\]' "$1" 2>/dev/null; then
        echo "$1: proxy plugin thinpool already configured"
        return
    fi
    if [ ! -s "$1" ]; then
        echo 'version = 2' >"$1"
    fi
    cat >>"$1" <<CONF

[proxy_plugins.thinpool]
  type = "snapshot"
  address = "$socket"
CONF
    echo "$1: added proxy plugin thinpool ($socket)"
}

if [ "${1:-}" = "--config-only" ]; then
    add_proxy "$2"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "setup-containerd.sh: run as root" >&2
    exit 1
fi
need=""
command -v containerd >/dev/null 2>&1 || need="$need containerd"
command -v runc >/dev/null 2>&1 || need="$need runc"
if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

bin="$here/../target/release/thinpool"
if [ -x "$bin" ]; then
    install -m 0755 "$bin" /usr/local/bin/thinpool
elif ! command -v thinpool >/dev/null 2>&1; then
    echo "setup-containerd.sh: build thinpool first (cargo build --release)" >&2
    exit 1
fi

mkdir -p /etc/containerd
if [ ! -s /etc/containerd/config.toml ]; then
    containerd config default >/etc/containerd/config.toml
fi
add_proxy /etc/containerd/config.toml

install -m 0644 "$here/systemd/thinpool-snapshotter.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now thinpool-snapshotter.service
systemctl restart containerd.service
echo "containerd now offers the snapshotter 'thinpool':"
ctr plugins ls | grep -E 'TYPE|thinpool' || true
