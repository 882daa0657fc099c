#!/bin/bash
# First writes to a thin vs a preallocated volume, pool file buffered vs --direct:
# 4 KiB random writes, each followed by fsync (a database's pattern), on the
# volume's loop device. Root; usage: tools/prealloc-direct-fio.sh [WORKDIR]
# (THINPOOL=path/to/thinpool; default target/release/thinpool).
set -e
T=${THINPOOL:-target/release/thinpool}
T=$(realpath "$T")
WORK=${1:-/var/tmp/tp-prealloc-bench}; mkdir -p "$WORK"; cd "$WORK"
for mode in buffered direct; do
  rm -f b.tp; $T create b.tp --size 4G >/dev/null
  $T volume create b.tp thin --size 1G
  $T volume create b.tp pre --size 1G --preallocate
  extra=""; [ $mode = direct ] && extra="--direct"
  for v in thin pre; do
    dev=$($T attach b.tp $v $extra)
    fio --name=w --filename=$dev --rw=randwrite --bs=4k --size=512M --fsync=1 --runtime=10 --time_based --ioengine=psync --direct=1 --randrepeat=0 --output-format=json > fio-$mode-$v.json
    iops=$(python3 -c "import json;print(round(json.load(open('fio-$mode-$v.json'))['jobs'][0]['write']['iops']))")
    echo "$mode $v randwrite4k+fsync iops=$iops"
    $T detach $dev
    # The background server exits once idle: the next attach starts its own.
    for _ in $(seq 100); do [ -e b.tp.sock ] || break; sleep 0.1; done
  done
  $T info b.tp --json | python3 -c "import json,sys;d=json.load(sys.stdin);print('data_used',d['data_used_bytes'])"
  sleep 1
done
rm -f b.tp
