#!/usr/bin/env bash
# Runs `csi-bench` against this driver the way BENCHMARKS.md was measured:
# a release build, a fresh pool under $BASE, the driver started (and
# restarted, and stopped) by the bench itself. Needs root (bind mounts).
# Usage: scripts/bench-reference.sh [COUNT] [extra csi-bench flags...]
# DRIVER=/path/to/hostpath-csi measures another build of the driver (an
# A/B comparison) with this tree's csi-bench.
set -euo pipefail
count="${1:-1000}"
shift || true
base="${BASE:-/tmp/hostpath-csi-bench-ref}"
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin hostpath-csi --bin csi-bench
bench="$PWD/target/release/csi-bench"
bin="${DRIVER:-$PWD/target/release/hostpath-csi}"
if [ -e "$base" ]; then
    echo "$base exists; remove it or set BASE" >&2
    exit 2
fi
mkdir -p "$base"
trap 'rmdir "$base/pool" "$base" 2>/dev/null || true' EXIT
"$bench" \
    --endpoint "unix://$base/csi.sock" \
    --driver-cmd "$bin --endpoint unix://$base/csi.sock --node-id n1 --pool default=$base/pool" \
    --workdir "$base/work" \
    --count "$count" \
    --json "bench-$count.json" \
    "$@"
