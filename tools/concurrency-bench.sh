#!/usr/bin/env bash
# Containers side by side on one served pool (issue 13): how much one container's
# fsyncs slow another's reads, how four containers scale against one, the server's
# CPU per request and its flushes per second. One or more thinpool binaries and
# plain loop devices over plain files (the baseline) are measured in one run,
# interleaved repetition by repetition, so the machine's noise hits them alike.
#
#   sudo tools/concurrency-bench.sh [OPTIONS] NAME=THINPOOL_BIN [NAME=THINPOOL_BIN ...]
#   sudo tools/concurrency-bench.sh --out docs/bench/concurrency main=/tmp/thinpool-main
#
# Options: --runs N (3), --runtime SECONDS per fio job (10), --size SIZE of the
# image (1G), --workdir DIR (/var/tmp; not a tmpfs), --out DIR (results.json and
# results.md; default: a temp dir, printed).
#
# Every fio job: libaio, direct=1, 4 KiB, iodepth 16, time-based. Containers of a
# thinpool binary are clones of one 1 GiB snapshot ("base", filled with fio's
# data) in a pool served by `thinpool serve` in the foreground (its PID is the
# process measured), each attached as a loop device (--direct-io=on) over its
# served file, as `thinpool attach` does. Plain containers are five copies of a
# plain 1 GiB file, each under a loop device with --direct-io=on. Each
# repetition, per target:
#   read1  random read, one container alone (server CPU measured around it)
#   intf   random read of the same container while a fifth one writes 4 KiB and
#          fsyncs after each write
#   read1b read1 again (the "alone" figure is the mean of read1 and read1b, which
#          bracket intf, so a change of the machine's load during them cancels)
#   read4  random read, four containers at once (aggregate IOPS)
#   flush4 four containers each in a write+fsync loop; the server's fdatasync and
#          fsync calls are counted with `perf stat` (syscall tracepoints), and its
#          flushes and commits through `info --json` when the binary reports
#          them ("commits": {"flushes", "commits", "data_syncs", ...})
#   write1 random write, one container alone (server CPU measured around it)
#   write4 random write, four containers at once (right after write1)
# A thinpool test gets fresh clones, so each repetition starts alike: reads and
# fsync writes hit blocks still shared with the image (fsync writes copy them);
# write1/write4 run on clones first overwritten sequentially (1 MiB), so they
# measure overwrites of owned blocks. Plain containers get the same overwrite.
# `sync` runs before each target's tests and after that overwrite, so the host's
# writeback of earlier writes to the pool file does not land in a measurement.
# Figures are medians over the repetitions, (min-max); ratios are taken within
# one repetition, then the median. `uptime` load is recorded around each target.
set -euo pipefail

RUNS=3
RUNTIME=10
SIZE=1G
WORKROOT=/var/tmp
OUT=""
TARGETS=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "concurrency-bench: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --workdir) WORKROOT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *=*) TARGETS+=("$1"); shift ;;
    *) die "expected NAME=THINPOOL_BIN, got '$1' (see --help)" ;;
    esac
done
[ ${#TARGETS[@]} -gt 0 ] || die "give at least one NAME=THINPOOL_BIN (see --help)"
[ "$(id -u)" = 0 ] || die "needs root (FUSE, loop devices)"
case "$RUNS$RUNTIME" in *[!0-9]*) die "--runs and --runtime take whole numbers" ;; esac
if [ "$RUNS" -lt 1 ] || [ "$RUNTIME" -lt 1 ]; then die "--runs and --runtime must be at least 1"; fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/tools/bench-setup.sh"
for t in "${TARGETS[@]}"; do
    name=${t%%=*}
    bin=${t#*=}
    case "$name" in '' | plain | *[!A-Za-z0-9_.-]*) die "bad target name '$name' (letters, digits, _.-; not 'plain')" ;; esac
    [ -x "$bin" ] || die "$bin: not an executable"
done

W=$(mktemp -d "$WORKROOT/concurrency-bench.XXXXXX")
[ -n "$OUT" ] || OUT="$W.out"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Everything started or attached is recorded here and undone on any exit.
LOOPS=()
SERVER_PIDS=()
SERVED_DIRS=()
PERF_PID=""
cleanup() {
    set +e
    [ -n "$PERF_PID" ] && kill -INT "$PERF_PID" 2>/dev/null && wait "$PERF_PID" 2>/dev/null
    for d in "${LOOPS[@]}"; do losetup -d "$d" 2>/dev/null; done
    for p in "${SERVER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${SERVER_PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        # A second signal commits and exits at once; then no more waiting.
        kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null && sleep 1
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    for d in "${SERVED_DIRS[@]}"; do mountpoint -q "$d" && umount -l "$d"; done
    rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
CLK_TCK=$(getconf CLK_TCK)
# utime + stime (clock ticks) of a process, all its threads included; the
# fields after the ")" that closes the command name start at field 3 (state).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

attach() { # FILE -> prints /dev/loopN (recorded for cleanup)
    local dev
    dev=$(losetup --find --show --direct-io=on "$1")
    LOOPS+=("$dev")
    echo "$dev"
}
detach() { # DEV
    local d keep=()
    losetup -d "$1"
    for d in "${LOOPS[@]}"; do [ "$d" = "$1" ] || keep+=("$d"); done
    LOOPS=("${keep[@]}")
}

FIO_COMMON=(--ioengine=libaio --direct=1 --iodepth=16 --output-format=json)
fio_timed() { # OUT.json JOBARGS...: time-based 4 KiB jobs
    local out=$1
    shift
    fio "${FIO_COMMON[@]}" --bs=4k --time_based=1 --runtime="$RUNTIME" --output="$out" "$@" >/dev/null
}
fill() { # sequential 1 MiB write over whole targets, concurrently: FILE...
    local args=() i=0 f
    for f in "$@"; do args+=(--name="fill$i" --filename="$f"); i=$((i + 1)); done
    fio "${FIO_COMMON[@]}" --bs=1M --rw=write --size="$SIZE" --output=/dev/null "${args[@]}" >/dev/null
}
JOBS=()
jobs_on() { # RW EXTRA DEV... -> JOBS: fio arguments of one job per device
    local rw=$1 extra=$2 i=0 d
    shift 2
    JOBS=()
    for d in "$@"; do
        JOBS+=("--name=c$i" "--filename=$d" "--rw=$rw")
        [ -z "$extra" ] || JOBS+=("$extra")
        i=$((i + 1))
    done
}

# --- targets ---------------------------------------------------------------

declare -A BIN POOL DIR PID
NAMES=()
setup_thinpool() { # NAME BIN
    local n=$1 b=$2 d
    d="$W/$n"
    mkdir -p "$d/export"
    BIN[$n]=$b
    POOL[$n]="$d/pool"
    DIR[$n]="$d/export"
    "$b" create "${POOL[$n]}" --size 64G >/dev/null
    "$b" volume create "${POOL[$n]}" image --size "$SIZE" >/dev/null
    "$b" serve "${POOL[$n]}" "${DIR[$n]}" >"$d/serve.log" 2>&1 &
    PID[$n]=$!
    SERVER_PIDS+=("${PID[$n]}")
    SERVED_DIRS+=("${DIR[$n]}")
    for _ in $(seq 200); do [ -e "${DIR[$n]}/image" ] && break; sleep 0.05; done
    [ -e "${DIR[$n]}/image" ] || die "$n: server did not come up: $(cat "$d/serve.log")"
    fill "${DIR[$n]}/image"
    "$b" snapshot "${POOL[$n]}" image base >/dev/null
    NAMES+=("$n")
}
setup_plain() {
    local i
    mkdir -p "$W/plain"
    truncate -s "$SIZE" "$W/plain/image"
    fill "$W/plain/image"
    for i in 0 1 2 3 4; do cp "$W/plain/image" "$W/plain/c$i"; done
    sync
    NAMES+=(plain)
}

SEQ=0
DEVS=()
containers() { # NAME COUNT -> DEVS: fresh clones (thinpool) or the plain copies
    local n=$1 k=$2 i v
    DEVS=()
    for i in $(seq 0 $((k - 1))); do
        if [ "$n" = plain ]; then
            DEVS+=("$(attach "$W/plain/c$i")")
        else
            SEQ=$((SEQ + 1))
            v="ct$SEQ"
            "${BIN[$n]}" clone "${POOL[$n]}" base "$v" >/dev/null
            DEVS+=("$(attach "${DIR[$n]}/$v")")
        fi
    done
}
release() { # NAME: detach DEVS; remove the clones behind them
    local n=$1 dev file v
    for dev in "${DEVS[@]}"; do
        file=$(losetup -n -O BACK-FILE "$dev")
        detach "$dev"
        [ "$n" = plain ] && continue
        v=$(basename "$file")
        # The loop device lets go of its file asynchronously.
        local tries=0
        until "${BIN[$n]}" remove "${POOL[$n]}" "$v" >/dev/null 2>&1; do
            tries=$((tries + 1))
            [ $tries -lt 100 ] || die "$n: cannot remove clone $v: $("${BIN[$n]}" remove "${POOL[$n]}" "$v" 2>&1)"
            sleep 0.1
        done
    done
    DEVS=()
}

counters() { # NAME OUT: the pool's flush/commit counters, if the binary reports them
    # (`info --json` of a served pool: "commits": {"flushes": N, "commits": N, ...})
    [ "$1" = plain ] && return 0
    "${BIN[$1]}" info "${POOL[$1]}" --json 2>/dev/null >"$2" || true
}

alone() { # RESDIR TEST RW DEV [SERVER_PID]: one container; the server's CPU ticks around it
    local r=$1 test=$2 rw=$3 dev=$4 pid=${5:-} c0=0 c1
    jobs_on "$rw" "" "$dev"
    [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
    fio_timed "$r/$test.json" "${JOBS[@]}"
    if [ -n "$pid" ]; then
        c1=$(cpu_ticks "$pid")
        echo "cpu_$test=$((c1 - c0))" >>"$r/meta"
    fi
}

run_target() { # REP NAME
    local rep=$1 n=$2 r
    r="$W/res/$rep/$n"
    mkdir -p "$r"
    # Dirty pool-file pages of earlier tests are written back now, not during these.
    sync
    echo "load_before=$(loadavg)" >"$r/meta"
    local pid=${PID[$n]:-}

    # Five fresh containers: 0-3 only read, 4 writes + fsyncs. The runs whose
    # ratio is taken follow each other: read1, intf, read1b, read4.
    containers "$n" 5
    alone "$r" read1 randread "${DEVS[0]}" "$pid"
    fio_timed "$r/intf.json" --name=reader --filename="${DEVS[0]}" --rw=randread \
        --name=fsyncer --filename="${DEVS[4]}" --rw=randwrite --fsync=1
    alone "$r" read1b randread "${DEVS[0]}" "$pid"
    jobs_on randread "" "${DEVS[@]:0:4}"
    fio_timed "$r/read4.json" "${JOBS[@]}"
    release "$n"

    containers "$n" 4
    counters "$n" "$r/info-before.json"
    if [ -n "$pid" ]; then
        perf stat -x, -o "$r/perf.csv" -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync \
            -p "$pid" >/dev/null 2>&1 &
        PERF_PID=$!
        sleep 0.5 # let perf attach before the load starts
    fi
    jobs_on randwrite --fsync=1 "${DEVS[@]}"
    fio_timed "$r/flush4.json" "${JOBS[@]}"
    if [ -n "$PERF_PID" ]; then
        kill -INT "$PERF_PID"
        wait "$PERF_PID" || true
        PERF_PID=""
    fi
    counters "$n" "$r/info-after.json"
    release "$n"

    containers "$n" 4
    fill "${DEVS[@]}"
    sync
    alone "$r" write1 randwrite "${DEVS[0]}" "$pid"
    jobs_on randwrite "" "${DEVS[@]}"
    fio_timed "$r/write4.json" "${JOBS[@]}"
    release "$n"
    echo "load_after=$(loadavg)" >>"$r/meta"
}

# --- run -------------------------------------------------------------------

log "work dir $W; results to $OUT; load $(loadavg)"
for t in "${TARGETS[@]}"; do
    log "setting up ${t%%=*} (${t#*=})"
    setup_thinpool "${t%%=*}" "${t#*=}"
done
log "setting up plain (5 copies of a $SIZE file)"
setup_plain
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for rep in $(seq "$RUNS"); do
    for n in "${NAMES[@]}"; do
        log "repetition $rep/$RUNS: $n (load $(loadavg))"
        run_target "$rep" "$n"
    done
done
END=$(date -u +%Y-%m-%dT%H:%M:%SZ)

{
    echo "start=$START"
    echo "end=$END"
    echo "runs=$RUNS"
    echo "runtime=$RUNTIME"
    echo "size=$SIZE"
    echo "clk_tck=$CLK_TCK"
    echo "machine=$(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), $(fio --version), work dir on $(df --output=fstype "$W" | tail -1) $(df --output=source "$W" | tail -1)"
    echo "targets=${NAMES[*]}"
    for t in "${TARGETS[@]}"; do
        echo "bin_${t%%=*}=${t#*=} ($("${t#*=}" --version 2>/dev/null | head -1), sha256 $(sha256sum "${t#*=}" | cut -c1-12))"
    done
} >"$W/res/run"

python3 - "$W/res" "$OUT" <<'EOF'
import json, os, statistics, sys

res, out = sys.argv[1], sys.argv[2]
run = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(res, "run")))
names = run["targets"].split()
runs, runtime, tck = int(run["runs"]), int(run["runtime"]), int(run["clk_tck"])

def fio(rep, n, test):
    return json.load(open(os.path.join(res, str(rep), n, test + ".json")))["jobs"]

def iops(jobs, side, which=None):
    return sum(j[side]["iops"] for j in jobs if which is None or j["jobname"] == which)

def ios(jobs, side):
    return sum(j[side]["total_ios"] for j in jobs)

def perf(rep, n):
    p = os.path.join(res, str(rep), n, "perf.csv")
    if not os.path.exists(p):
        return None
    total = 0
    for line in open(p):
        f = line.split(",")
        if len(f) > 2 and f[2].startswith("syscalls:"):
            if not f[0].strip().isdigit():
                return None  # "<not counted>"
            total += int(f[0])
    return total

def counters(rep, n):
    """Deltas of the pool's flush/commit counters over flush4, if it has them."""
    def load(which):
        try:
            c = json.load(open(os.path.join(res, str(rep), n, f"info-{which}.json"))).get("commits")
        except (OSError, ValueError):
            return {}
        if isinstance(c, int):
            return {"commits": c}
        return {k: v for k, v in c.items() if isinstance(v, int)} if isinstance(c, dict) else {}
    a, b = load("before"), load("after")
    return {k: b[k] - a[k] for k in a if k in b}

per_run = []
for rep in range(1, runs + 1):
    for n in names:
        meta = dict(l.rstrip("\n").split("=", 1)
                    for l in open(os.path.join(res, str(rep), n, "meta")))
        r1, r1b, r4 = fio(rep, n, "read1"), fio(rep, n, "read1b"), fio(rep, n, "read4")
        it, f4 = fio(rep, n, "intf"), fio(rep, n, "flush4")
        w1, w4 = fio(rep, n, "write1"), fio(rep, n, "write4")
        f4_secs = max(j["job_runtime"] for j in f4) / 1000
        d = {
            "rep": rep, "target": n,
            "load_before": meta["load_before"], "load_after": meta["load_after"],
            "read1_iops": (iops(r1, "read") + iops(r1b, "read")) / 2,
            "read4_iops": iops(r4, "read"),
            "read_alone_iops": (iops(r1, "read") + iops(r1b, "read")) / 2,
            "read_beside_fsync_iops": iops(it, "read", "reader"),
            "fsyncer_fsyncs_per_s": sum(j["sync"]["total_ios"] for j in it if j["jobname"] == "fsyncer") / runtime,
            "write1_iops": iops(w1, "write"),
            "write4_iops": iops(w4, "write"),
            "flush4_fsyncs_per_s": sum(j["sync"]["total_ios"] for j in f4) / f4_secs,
            "flush4_write_iops": iops(f4, "write"),
        }
        d["fsync_interference"] = d["read_beside_fsync_iops"] / d["read_alone_iops"]
        d["read_scaling"] = d["read4_iops"] / d["read1_iops"]
        d["write_scaling"] = d["write4_iops"] / d["write1_iops"]
        if "cpu_read1" in meta:
            ticks = int(meta["cpu_read1"]) + int(meta["cpu_read1b"])
            d["cpu_us_per_read"] = ticks / tck * 1e6 / (ios(r1, "read") + ios(r1b, "read"))
            d["cpu_us_per_write"] = int(meta["cpu_write1"]) / tck * 1e6 / ios(w1, "write")
        calls = perf(rep, n)
        if calls is not None:
            d["flush4_server_fdatasync_fsync_per_s"] = calls / f4_secs
        for k, v in counters(rep, n).items():
            d["flush4_" + k + "_per_s"] = v / f4_secs
        per_run.append(d)

def stat(n, key):
    v = [d[key] for d in per_run if d["target"] == n and key in d]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}

rows = [
    ("fsync interference: read IOPS beside an fsyncing container / alone", "fsync_interference", "{:.2f}"),
    ("  random read IOPS, one container alone (mean of the runs before and after)", "read_alone_iops", "{:,.0f}"),
    ("  random read IOPS beside a container fsyncing every 4 KiB write", "read_beside_fsync_iops", "{:,.0f}"),
    ("  fsyncs/s of that container", "fsyncer_fsyncs_per_s", "{:,.0f}"),
    ("four containers vs one, random read (aggregate IOPS ratio; one = read1, read1b)", "read_scaling", "×{:.2f}"),
    ("  random read IOPS, four containers", "read4_iops", "{:,.0f}"),
    ("four containers vs one, random write (aggregate IOPS ratio)", "write_scaling", "×{:.2f}"),
    ("  random write IOPS, one container", "write1_iops", "{:,.0f}"),
    ("  random write IOPS, four containers", "write4_iops", "{:,.0f}"),
    ("server CPU per 4 KiB random read (µs)", "cpu_us_per_read", "{:.1f}"),
    ("server CPU per 4 KiB random write (µs)", "cpu_us_per_write", "{:.1f}"),
    ("four write+fsync loops: fsyncs/s seen by fio (sum)", "flush4_fsyncs_per_s", "{:,.0f}"),
    ("  fdatasync+fsync calls/s of the server (perf)", "flush4_server_fdatasync_fsync_per_s", "{:,.0f}"),
    ("  flushes/s the pool received (its counters, where it has them)", "flush4_flushes_per_s", "{:,.0f}"),
    ("  … of which shared another flush's commit", "flush4_flushes_shared_per_s", "{:,.0f}"),
    ("  … of which had nothing to wait for", "flush4_flushes_free_per_s", "{:,.0f}"),
    ("  metadata commits/s of the pool (two fdatasyncs each)", "flush4_commits_per_s", "{:,.0f}"),
    ("  data-only syncs/s of the pool (one fdatasync each)", "flush4_data_syncs_per_s", "{:,.0f}"),
    ("  fdatasyncs/s by the pool's count", "flush4_fdatasyncs_per_s", "{:,.0f}"),
]
summary = {n: {k: stat(n, k) for _, k, _ in rows} for n in names}

def cell(s, fmt):
    if s is None:
        return "—"
    m = fmt.format(s["median"])
    if len(s["values"]) > 1 and fmt.format(s["min"]) != fmt.format(s["max"]):
        m += " ({}–{})".format(fmt.format(s["min"]).lstrip("×"), fmt.format(s["max"]).lstrip("×"))
    return m

label = {n: ("plain loop devices" if n == "plain" else "thinpool " + n) for n in names}
md = []
md.append(f"Run {run['start']} – {run['end']}: {runs} repetitions, {runtime} s per fio job, {run['size']} image; medians (min–max).")
md.append("")
md.append(f"Machine: {run['machine']}.")
md.append("")
for n in names:
    if "bin_" + n in run:
        md.append(f"- thinpool {n}: `{run['bin_' + n]}`")
md.append("")
md.append("| figure | " + " | ".join(label[n] for n in names) + " |")
md.append("|---|" + "---|" * len(names))
for title, key, fmt in rows:
    md.append(f"| {title} | " + " | ".join(cell(summary[n][key], fmt) for n in names) + " |")
md.append("")
md.append("Load average (1, 5, 15 min) before / after each target's tests, per repetition:")
md.append("")
for d in per_run:
    md.append(f"- rep {d['rep']} {d['target']}: {d['load_before']} / {d['load_after']}")
text = "\n".join(md) + "\n"

json.dump({"run": run, "summary": summary, "per_run": per_run},
          open(os.path.join(out, "results.json"), "w"), indent=1)
open(os.path.join(out, "results.md"), "w").write(text)
print(text)
EOF
log "results: $OUT/results.json, $OUT/results.md"
