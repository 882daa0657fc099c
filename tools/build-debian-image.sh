#!/usr/bin/env bash
# Build a realistic two-layer Debian image as an OCI layout (root; needs the
# Debian mirror of the apt sources):
#
#   layer 1  `debootstrap --variant=minbase bookworm` (the base; no device nodes,
#            resolv.conf or hostname of the build host, as in Docker's debian images)
#   layer 2  `apt-get install --no-install-recommends python3-minimal sqlite3`
#            in that root, then apt lists and docs (/usr/share/doc, man, info) deleted
#
# Tags in the layout: `base` (layer 1 only) and `app` (both layers).
#
#   tools/build-debian-image.sh OUT_OCI_DIR            # cached: cheap when built once
#   tools/build-debian-image.sh --rebuild OUT_OCI_DIR  # build again from the mirror
#
# The finished layout is kept in a cache (default: target/debian-image in the
# repository; BUILD_DEBIAN_IMAGE_CACHE overrides it) and copied to OUT_OCI_DIR,
# so a second call takes a second or two. DEBIAN_MIRROR overrides the mirror.
# Concurrent calls wait for each other (flock on the cache).
set -euo pipefail

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

rebuild=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage 0 ;;
    --rebuild) rebuild=1 ;;
    -*) echo "build-debian-image: unknown option $1" >&2; usage 2 >&2 ;;
    *)
        [ -z "$out" ] || { echo "build-debian-image: one output directory only" >&2; exit 2; }
        out=$1
        ;;
    esac
    shift
done
[ -n "$out" ] || usage 2 >&2
if [ "$(id -u)" -ne 0 ]; then
    echo "build-debian-image: needs root (debootstrap, chroot, mount)" >&2
    exit 1
fi

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${BUILD_DEBIAN_IMAGE_CACHE:-$root/target/debian-image}
suite=bookworm
packages="python3-minimal sqlite3"

need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The mirror the host's apt uses for the suite (deb822 or one-line format).
mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local m=""
    if [ -r /etc/apt/sources.list ]; then
        m=$(awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }' /etc/apt/sources.list)
    fi
    if [ -z "$m" ]; then
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -r "$f" ] || continue
            m=$(awk -v s="$suite" '
                /^URIs:/ { u = $2 }
                /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) found = u }
                /^$/ { if (found) { print found; exit } u = "" }
                END { if (found) print found }' "$f" | head -n1)
            [ -n "$m" ] && break
        done
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

layout=$cache/oci
if [ "$rebuild" = 1 ] || [ ! -f "$cache/oci.complete" ]; then
    rm -f "$cache/oci.complete"
    work=$(mktemp -d "$cache/build.XXXXXX")
    mounted=()
    cleanup() {
        local i
        for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
            umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}" 2>/dev/null || true
        done
        # Never through a mount that failed to come off (the chroot binds /dev).
        rm -rf --one-file-system "$work"
    }
    trap cleanup EXIT
    m=$(mirror)
    echo "build-debian-image: debootstrap --variant=minbase $suite from $m" >&2
    debootstrap --variant=minbase "$suite" "$work/rootfs" "$m" >"$work/debootstrap.log" 2>&1 ||
        { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
    # An image carries no device nodes (the runtime mounts /dev) and none of the
    # build host's name or resolver (debootstrap copies them in).
    find "$work/rootfs/dev" -mindepth 1 -delete
    rm -f "$work/rootfs/etc/resolv.conf" "$work/rootfs/etc/hostname"
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*_*

    cd "$work"
    umoci init --layout img
    umoci new --image img:base
    umoci unpack --image img:base b1 >/dev/null
    # umoci made an empty rootfs; the debootstrap tree becomes layer 1.
    rmdir b1/rootfs
    mv rootfs b1/rootfs
    umoci repack --image img:base b1 >/dev/null
    rm -rf b1

    # Layer 2: unpack the image again (repacking b1 twice would replace layer 1).
    umoci unpack --image img:base b2 >/dev/null
    r=$work/b2/rootfs
    cp /etc/resolv.conf "$r/etc/resolv.conf"
    mount --bind /dev "$r/dev" && mounted+=("$r/dev")
    mount -t proc proc "$r/proc" && mounted+=("$r/proc")
    printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
    chmod 755 "$r/usr/sbin/policy-rc.d"
    echo "build-debian-image: installing $packages in layer 2" >&2
    # shellcheck disable=SC2086 # word splitting wanted
    chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages && apt-get clean" \
        >"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; exit 1; }
    umount "$r/proc"
    umount "$r/dev"
    mounted=()
    rm -f "$r/usr/sbin/policy-rc.d"
    rm -f "$r/etc/resolv.conf"
    rm -rf "$r/var/lib/apt/lists/"* "$r/var/cache/apt/"*.bin \
        "$r/usr/share/doc" "$r/usr/share/man" "$r/usr/share/info"
    mkdir -p "$r/var/lib/apt/lists/partial"
    umoci repack --image img:app b2 >/dev/null
    rm -rf --one-file-system b2
    umoci gc --layout img
    cd "$cache"
    rm -rf "$layout"
    mv "$work/img" "$layout"
    touch "$cache/oci.complete"
    trap - EXIT
    cleanup
fi

if [ "$(cd "$out" 2>/dev/null && pwd)" != "$(cd "$layout" && pwd)" ]; then
    if [ -e "$out" ] && [ ! -f "$out/oci-layout" ] && [ -n "$(ls -A "$out")" ]; then
        echo "build-debian-image: $out exists and is not an OCI layout; not overwriting it" >&2
        exit 1
    fi
    rm -rf "$out"
    mkdir -p "$(dirname "$out")"
    cp -a "$layout" "$out"
fi
echo "build-debian-image: $out: tags base (1 layer), app (2 layers: + $packages, no docs)" >&2
