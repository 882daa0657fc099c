#!/usr/bin/env bash
# A short end-to-end tour of thinpool, in a temporary directory that is
# removed afterwards: create a pool and a volume, write a "base layer",
# freeze it as a read-only snapshot, start two writable clones from it,
# write into one, and look at what each uses.
#
#   cargo build --release && tools/demo.sh
#
# Uses target/release/thinpool, or the binary named by $THINPOOL.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${THINPOOL:-$root/target/release/thinpool}
if [ ! -x "$bin" ]; then
    echo "demo: $bin not found; run 'cargo build --release' first (or set THINPOOL)" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/thinpool-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
pool=$work/demo.pool

run() {
    printf '\n$ thinpool %s\n' "$*"
    "$bin" "$@"
}

on_disk() {
    printf '%s: %s bytes long, %s KiB on disk\n' "$(basename "$1")" \
        "$(stat -c %s "$1")" "$(du -k "$1" | cut -f1)"
}

echo "== a 10G pool is a sparse file: it grows only as blocks are written"
run create "$pool" --size 10G
on_disk "$pool"

echo
echo "== a 1G thin volume, and an 8 MiB base layer written into it"
run volume create "$pool" base --size 1G
head -c 8M /dev/urandom >"$work/layer.bin"
run write "$pool" base --offset 0 "$work/layer.bin"

echo
echo "== freeze it (read-only snapshot), then start two writable clones: O(1), no copying"
run snapshot "$pool" base image-v1
run clone "$pool" image-v1 container-1
run clone "$pool" image-v1 container-2

echo
echo "== a small write into one clone copies one 64K block, not the layer"
printf 'hello from container-1\n' >"$work/hello.txt"
run write "$pool" container-1 --offset 4096 "$work/hello.txt"
run read "$pool" container-1 --offset 4096 --length 23
run list "$pool"

echo
echo "== the snapshot still holds the base layer bit for bit"
run export "$pool" image-v1 "$work/image-v1.img"
cmp -n 8388608 "$work/layer.bin" "$work/image-v1.img" && echo "image-v1 == base layer"
on_disk "$work/image-v1.img"

echo
echo "== removing a clone frees only the block it alone held"
run remove "$pool" container-1
run list "$pool"
run info "$pool"
on_disk "$pool"

echo
echo "demo done (cleaning up $work)"
