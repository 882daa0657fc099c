#!/bin/sh
# fio through a thinpool loop device, next to a plain file and a loop device
# over a plain file, in one run (the machine is noisy: compare side by side).
#
#   sudo tools/fio-export.sh [WORKDIR] [SIZE] [RUNTIME_SECONDS]
#
# Jobs (direct I/O, libaio): sequential 1 MiB write and read, random 4 KiB
# read and write, iodepth 16. The sequential write runs first, so every
# target is fully written when read (a thin volume reads unwritten blocks as
# zeros without touching the disk, which would flatter it).
# Prints a Markdown table; raw fio JSON is kept in WORKDIR/results.
set -eu

WORK=${1:-/var/tmp/thinpool-fio}
SIZE=${2:-1G}
RUNTIME=${3:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TP="$ROOT/target/release/thinpool"

[ "$(id -u)" = 0 ] || { echo "fio-export.sh: needs root (FUSE, loop devices)" >&2; exit 1; }
command -v fio >/dev/null || { echo "fio-export.sh: install fio (tools/install-deps.sh)" >&2; exit 1; }
(cd "$ROOT" && cargo build --release --quiet --bin thinpool)

LOOP_PLAIN=""
TP_DEV=""
cleanup() {
    [ -n "$TP_DEV" ] && "$TP" detach "$TP_DEV" 2>/dev/null || true
    [ -n "$LOOP_PLAIN" ] && losetup -d "$LOOP_PLAIN" 2>/dev/null || true
    rm -f "$WORK/plain.img" "$WORK/loop.img" "$WORK/pool" "$WORK/pool.sock"
}
trap cleanup EXIT INT TERM

rm -rf "$WORK"
mkdir -p "$WORK/results"

# Targets: a plain file, a loop device over a plain file, a thinpool volume.
truncate -s "$SIZE" "$WORK/plain.img"
truncate -s "$SIZE" "$WORK/loop.img"
LOOP_PLAIN=$(losetup --find --show --direct-io=on "$WORK/loop.img")
"$TP" create "$WORK/pool" --size 8G >/dev/null
"$TP" volume create "$WORK/pool" bench --size "$SIZE" >/dev/null
TP_DEV=$("$TP" attach "$WORK/pool" bench)

run() { # name target rw bs
    fio --name="$3" --filename="$2" --rw="$3" --bs="$4" --iodepth=16 --direct=1 \
        --ioengine=libaio --size="$SIZE" --runtime="$RUNTIME" --time_based=1 \
        --group_reporting=1 --output-format=json >"$WORK/results/$1-$3.json"
}

for t in plain:"$WORK/plain.img" loop:"$LOOP_PLAIN" thinpool:"$TP_DEV"; do
    name=${t%%:*}
    target=${t#*:}
    # First fill the target sequentially (timed, as the seq write figure).
    fio --name=fill --filename="$target" --rw=write --bs=1M --iodepth=16 --direct=1 \
        --ioengine=libaio --size="$SIZE" --output-format=json >"$WORK/results/$name-fill.json"
    run "$name" "$target" write 1M
    run "$name" "$target" read 1M
    run "$name" "$target" randread 4k
    run "$name" "$target" randwrite 4k
done

python3 - "$WORK/results" <<'EOF'
import json, sys, os
d = sys.argv[1]
def get(name, rw):
    j = json.load(open(os.path.join(d, f"{name}-{rw}.json")))["jobs"][0]
    side = j["write"] if "write" in rw else j["read"]
    return side["bw"] / 1024, side["iops"]
rows = [("plain file on ext4", "plain"), ("loop device (--direct-io=on) over a plain file", "loop"),
        ("thinpool volume: FUSE file + loop device", "thinpool")]
print("| target | seq write 1M MiB/s | seq read 1M MiB/s | rand read 4K IOPS | rand write 4K IOPS |")
print("|---|---|---|---|---|")
for label, n in rows:
    sw, _ = get(n, "write"); sr, _ = get(n, "read")
    _, rr = get(n, "randread"); _, rw = get(n, "randwrite")
    print(f"| {label} | {sw:.0f} | {sr:.0f} | {rr/1000:.1f}k | {rw/1000:.1f}k |")
EOF
