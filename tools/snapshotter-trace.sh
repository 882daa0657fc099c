#!/usr/bin/env bash
# What a container's ext4 writes into the pool, and how long each step of its
# life takes, without containerd (as root; docs/CONTAINERD.md has the figures):
#
#   tools/snapshotter-trace.sh [--block-size 4K] [--runs N] [--idle]
#
# A fresh pool in a temp dir under /var/tmp, `thinpool snapshotter` on it (which
# formats the ext4 template as for containerd), then a container's life by hand:
# clone of the template (through the control socket), loop device, mount with
# the snapshotter's options, `printf hello > /hello.txt` (not with --idle),
# umount, detach.
#
# 1. Times: the life N times (default 10), each step in ms; then the pool's
#    used data and metadata per container (the N clones are kept).
# 2. Blocks: once more, with a read-only snapshot of the clone after mount,
#    after the write (flushed) and after umount, and the pool's generation
#    (commits) and used bytes after each step; then the snapshotter is stopped
#    and `thinpool diff` shows each snapshot's changes against the template
#    (ranges in pool blocks).
#
# THINPOOL overrides the binary (default target/release/thinpool).
set -euo pipefail

bs=4K
runs=10
idle=0
while [ $# -gt 0 ]; do
    case "$1" in
    --block-size) bs=$2; shift ;;
    --runs) runs=$2; shift ;;
    --idle) idle=1 ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "snapshotter-trace: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
B=${THINPOOL:-$root/target/release/thinpool}
opts=rw,noatime,noinit_itable # the snapshotter's RW_OPTIONS

w=$(mktemp -d /var/tmp/snapshotter-trace.XXXXXX)
p=$w/pool.tp
sp=""
dev=""
cleanup() {
    mountpoint -q "$w/mnt" 2>/dev/null && umount "$w/mnt"
    [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null
    [ -n "$sp" ] && kill -TERM "$sp" 2>/dev/null && wait "$sp" 2>/dev/null
    rm -rf "$w"
}
trap cleanup EXIT

"$B" create "$p" --size 20G --block-size "$bs" >/dev/null
"$B" snapshotter "$p" --address "$w/s.sock" --export-dir "$w/export" --volume-size 10G >"$w/log" 2>&1 &
sp=$!
for _ in $(seq 600); do grep -q answering "$w/log" && break; sleep 0.1; done
grep -q answering "$w/log" || { cat "$w/log"; exit 1; }
mkdir "$w/mnt"

state() {
    "$B" info "$p" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print('  %-7s generation %d, data used %d B, metadata used %d B' % ('$1', d['generation'], d['data_used_bytes'], d['metadata_used_bytes']))"
}

used() {
    "$B" info "$p" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['data_used_bytes'], d['metadata_used_bytes'])"
}
read -r data0 meta0 < <(used)
echo "== times (ms; clone through the control socket, so a CLI process start included)"
printf '  %-4s %8s %8s %8s %8s %8s %8s\n' run clone attach mount write umount detach
now() { date +%s%N; }
for i in $(seq "$runs"); do
    t0=$(now)
    "$B" clone "$p" ctrd-template "c$i" >/dev/null
    t1=$(now)
    dev=$(losetup --find --show --direct-io=on "$w/export/c$i")
    t2=$(now)
    mount -t ext4 -o "$opts" "$dev" "$w/mnt"
    t3=$(now)
    [ "$idle" = 1 ] || printf hello >"$w/mnt/hello.txt"
    t4=$(now)
    umount "$w/mnt"
    t5=$(now)
    losetup -d "$dev"
    dev=""
    t6=$(now)
    awk -v i="$i" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v e="$t4" -v f="$t5" -v g="$t6" \
        'BEGIN { printf "  %-4s %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f\n", i, (b-a)/1e6, (c-b)/1e6, (d-c)/1e6, (e-d)/1e6, (f-e)/1e6, (g-f)/1e6 }'
done
read -r data1 meta1 < <(used)
echo "== space: the $runs containers above (kept, no snapshots of them), per container"
awk -v n="$runs" -v d="$((data1 - data0))" -v m="$((meta1 - meta0))" \
    'BEGIN { printf "  data %.1f KiB, map and other metadata %.1f KiB, together %.1f KiB\n", d/n/1024, m/n/1024, (d+m)/n/1024 }'
echo "== blocks ($bs pool blocks)"
state start
"$B" clone "$p" ctrd-template c0 >/dev/null
state clone
dev=$(losetup --find --show --direct-io=on "$w/export/c0")
mount -t ext4 -o "$opts" "$dev" "$w/mnt"
state mount
"$B" snapshot "$p" c0 after-mount >/dev/null
[ "$idle" = 1 ] || printf hello >"$w/mnt/hello.txt"
sync -f "$w/mnt"
state write
"$B" snapshot "$p" c0 after-write >/dev/null
umount "$w/mnt"
state umount
"$B" snapshot "$p" c0 after-umount >/dev/null
losetup -d "$dev"
dev=""
# `thinpool diff` reads the pool itself: stop the snapshotter first.
kill -TERM "$sp"
wait "$sp" || true
sp=""
for s in after-mount after-write after-umount; do
    echo "  -- ctrd-template -> $s"
    "$B" diff "$p" ctrd-template "$s" | sed 's/^/     /'
done

