#!/usr/bin/env bash
# Make the pool files of tests/fixtures/, each with the build of an earlier
# commit, so that tests/compat.rs opens pools that older code really wrote.
#
#   tools/make-fixtures.sh [v1|v2]...      (default: both)
#
# v1: format version 1, made by the last commit on main before format 2
#     (dced184, the first parent of bcbb3c6 "Merge issue-9: ... (format 2)").
# v2: format version 2, made by main at 55114b3 (before the intent log).
#
# Each binary is built from its commit in a temporary git worktree with its
# own target directory (seeded from $SEED_TARGET if set, e.g.
# SEED_TARGET=/work/main/target, to reuse compiled dependencies); the
# worktree is removed afterwards. To skip the build, point V1_BIN / V2_BIN at
# a `thinpool` binary built from exactly that commit.
#
# The pools are 4 KiB-block pools of about 300 KiB, stored gzipped
# (pool-vN.tp.gz) with the sha256 of every volume's whole content as the
# old build reads it (pool-vN.sha256, `sha256sum` format: HASH  NAME) and the
# old build's `list` output (pool-vN.list: the test compares the layers' chain ids).
#
# Volumes (both):
#   base       1 MiB writable, written, changed after base-snap was taken
#   base-snap  snapshot of base before the change
#   layer0     committed base layer (`commit`)
#   layer1     committed layer cloned from layer0, with changes
#   app        writable clone of layer1 with changes (partial-block ones too)
# v2 only (what format 2 added: annotations), made by `thinpool snapshotter`
# for a private containerd (`ctr snapshots prepare/commit`):
#   ctrd-template   the snapshotter's 8 MiB ext4 template
#   ctrd-<hash>     committed snapshot "layer-a" (annotation: TPSN record)
#   ctrd-<hash>     active snapshot "ctr1" on layer-a (annotation: TPSN record)
#
# Needs: git, cargo, gzip, sha256sum, seq; for v2 also root, containerd, ctr
# and mkfs.ext4 (the snapshotter formats its template).
set -euo pipefail

V1_COMMIT=dced18470b3785681c80fb0e4caf3095e7e9466a
V2_COMMIT=55114b34055f6242dbe63dd50b6ea0a12d659e89

repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
out=$repo/tests/fixtures
mkdir -p "$out"
work=$(mktemp -d /tmp/tp-fixtures.XXXXXX)
worktrees=()
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if mountpoint -q "$work/ctrd/export" 2>/dev/null; then
        umount -l "$work/ctrd/export"
    fi
    for wt in "${worktrees[@]}"; do
        git -C "$repo" worktree remove --force "$wt" 2>/dev/null || true
    done
    rm -rf "$work"
    # A build that failed inside $(...) leaves its worktree registered.
    git -C "$repo" worktree prune
}
trap cleanup EXIT

# build COMMIT -> prints the path of its thinpool binary
build() {
    local commit=$1 wt=$work/wt-${1:0:7}
    git -C "$repo" worktree add --detach "$wt" "$commit" >&2
    worktrees+=("$wt")
    if [ -n "${SEED_TARGET:-}" ]; then
        cp -a "$SEED_TARGET" "$wt/target"
    fi
    (cd "$wt" && cargo build --profile test --bin thinpool >&2)
    cp "$wt/target/debug/thinpool" "$work/thinpool-${commit:0:7}"
    git -C "$repo" worktree remove --force "$wt" >&2
    echo "$work/thinpool-${commit:0:7}"
}

# data FIRST LAST BYTES -> a file of that many bytes of `seq FIRST LAST`
# (every 4 KiB block differs, so a misplaced block cannot go unnoticed)
data() {
    local f=$work/data-$1-$3
    seq "$1" "$2" >"$f.all"
    head -c "$3" "$f.all" >"$f"
    [ "$(stat -c %s "$f")" -eq "$3" ] || { echo "seq $1 $2 is short of $3 bytes" >&2; exit 1; }
    echo "$f"
}

# snapshots BIN POOL: containerd snapshots (annotated volumes) in POOL
snapshots() {
    local tp=$1 pool=$2 d=$work/ctrd i
    [ "$(id -u)" -eq 0 ] || { echo "the v2 fixture needs root (snapshotter, loop devices)" >&2; exit 1; }
    mkdir -p "$d/export" "$d/root" "$d/state" "$d/opt"
    "$tp" snapshotter "$pool" --address "$d/snap.sock" --export-dir "$d/export" \
        --volume-size 8M >"$d/snap.log" 2>&1 &
    local snap_pid=$!
    pids+=("$snap_pid")
    printf '%s\n' \
        'version = 2' \
        "root = \"$d/root\"" \
        "state = \"$d/state\"" \
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]' \
        '[grpc]' "  address = \"$d/ctrd.sock\"" \
        '[ttrpc]' "  address = \"$d/ctrd.ttrpc.sock\"" \
        '[debug]' '  address = ""' \
        '[metrics]' '  address = ""' \
        '[plugins."io.containerd.internal.v1.opt"]' "  path = \"$d/opt\"" \
        '[proxy_plugins.thinpool]' '  type = "snapshot"' "  address = \"$d/snap.sock\"" \
        >"$d/config.toml"
    containerd --config "$d/config.toml" >"$d/ctrd.log" 2>&1 &
    local ctrd_pid=$!
    pids+=("$ctrd_pid")
    for i in $(seq 200); do
        [ -S "$d/snap.sock" ] && ctr -a "$d/ctrd.sock" version >/dev/null 2>&1 && break
        sleep 0.1
    done
    local c=(ctr -a "$d/ctrd.sock" -n fixture snapshots --snapshotter thinpool)
    "${c[@]}" prepare active1
    "${c[@]}" commit layer-a active1
    "${c[@]}" prepare ctr1 layer-a
    "${c[@]}" ls >&2
    kill "$ctrd_pid"
    wait "$ctrd_pid" || true
    # SIGTERM: the snapshotter commits and exits 0.
    kill "$snap_pid"
    wait "$snap_pid"
    pids=()
}

# make BIN NAME: the pool, its sums and listing under tests/fixtures/
make() {
    local tp=$1 name=$2
    local pool=$work/$name.tp
    rm -f "$pool"
    "$tp" create "$pool" --size 64M --block-size 4K
    "$tp" volume create "$pool" base --size 1M
    "$tp" write "$pool" base --offset 0 "$(data 1 100000 49152)"
    "$tp" write "$pool" base --offset 512K "$(data 200000 300000 32768)"
    "$tp" snapshot "$pool" base base-snap
    "$tp" write "$pool" base --offset 40K "$(data 400000 500000 10000)"

    "$tp" volume create "$pool" layer0w --size 1M
    "$tp" write "$pool" layer0w --offset 0 "$(data 600000 700000 65536)"
    "$tp" commit "$pool" layer0w --as layer0
    "$tp" clone "$pool" layer0 layer1w
    "$tp" write "$pool" layer1w --offset 32K "$(data 800000 900000 16384)"
    "$tp" write "$pool" layer1w --offset 900K "$(data 900000 950000 4096)"
    "$tp" commit "$pool" layer1w --as layer1
    "$tp" clone "$pool" layer1 app
    "$tp" write "$pool" app --offset 5000 "$(data 1000000 1001000 3000)"
    "$tp" write "$pool" app --offset 256K "$(data 1100000 1200000 16384)"

    if [ "$name" = pool-v2 ]; then
        snapshots "$tp" "$pool"
    fi

    "$tp" check "$pool"
    : >"$out/$name.sha256"
    local vols
    vols=$("$tp" list "$pool" | awk 'NR > 1 { print $1 }')
    for v in $vols; do
        echo "$("$tp" read "$pool" "$v" | sha256sum | cut -d' ' -f1)  $v" >>"$out/$name.sha256"
    done
    "$tp" list "$pool" >"$out/$name.list"
    gzip -9 -n -c "$pool" >"$out/$name.tp.gz"
    echo "$name: $(stat -c %s "$pool") bytes, $(stat -c %s "$out/$name.tp.gz") gzipped" >&2
}

what=("$@")
[ ${#what[@]} -eq 0 ] && what=(v1 v2)
for w in "${what[@]}"; do
    case $w in
    v1) make "${V1_BIN:-$(build $V1_COMMIT)}" pool-v1 ;;
    v2) make "${V2_BIN:-$(build $V2_COMMIT)}" pool-v2 ;;
    *) echo "unknown fixture '$w' (v1 or v2)" >&2; exit 2 ;;
    esac
done
