#!/usr/bin/env bash
# The full comparison in one command, on a fresh machine of this kind (root):
# install the tools, build thinpool and cowbench in release mode, run every
# backend and regenerate docs/bench/ (JSON, tables, plots) and the generated
# section of docs/BENCHMARKS.md. Extra arguments go to cowbench.
#
#   tools/bench.sh                 # ~15-25 min on 2 vCPUs
#   tools/bench.sh --backends thinpool,qcow2
#   tools/bench.sh --containerd    # the containerd scenario instead (~10-15 min):
#                                  # a Debian image pulled and run on thinpool,
#                                  # overlayfs and native snapshotters
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tools/bench-setup.sh
cargo build --release --workspace
if [ "${1:-}" = "--containerd" ]; then
    exec target/release/cowbench "$@"
fi
exec target/release/cowbench --full --out docs/bench "$@"
